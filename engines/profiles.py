"""Optimization profiles from the manifest's input shapes and the build flags.

Every dynamic dimension of an exported graph is named (``fsr-export`` names them);
a profile gives each input a (min, opt, max) shape:

=================  ==========================  =====================================
dimension          prefill / any other graph   decode (graphs with a KV cache only)
=================  ==========================  =====================================
``batch``          1, 1, max_batch             1, 1, max_batch
``sequence``       1, S, max_seq               1, 1, 1
``past_sequence``  0, 0, 0                     0, P, max_seq - 1
``total_sequence`` 1, S, max_seq               1, P + 1, max_seq
``num_tokens``     32, crop tokens, image tokens (prune graphs of multi-crop families: tokens per row)
static ``n``       n, n, n                     n, n, n
=================  ==========================  =====================================

The vision graph's ``batch`` is its rows: up to ``ceil(image tokens / crop tokens)`` per image
(one for a one-crop family, the most crops for a multi-crop one).
``max_seq`` is the longest context (prompt with its image tokens, plus generated
tokens). The opt lengths come from the export: ``S = min(max_seq, kept image tokens +
64)`` (a typical prompt), ``P = min(max_seq - 1, S)``.

A graph with ``past_sequence`` (the decoder) gets two profiles, so TensorRT tunes
prefill (many new tokens, empty cache) and decode (one new token, a growing cache)
separately; ``total = past + sequence`` holds at each profile's min, opt and max.
The runtime picks the first profile that contains a call's shapes.
"""

from __future__ import annotations

import dataclasses

from fsr.errors import FsrError
from fsr.manifest import Manifest, TensorInfo

KNOWN_DIMS = ("batch", "sequence", "past_sequence", "total_sequence", "num_tokens")
#: other names of a known dim: the Transformers.js layout names the batch ``batch_size`` (fsr.export.transformers_js)
DIM_ALIASES = {"batch_size": "batch"}
TYPICAL_TEXT_TOKENS = 64
MIN_ROW_TOKENS = 32  # the least tokens per row a prune graph's engine takes


class ProfileError(FsrError, ValueError):
    """The flags or a graph's shapes cannot make a valid profile; the message says which."""


@dataclasses.dataclass
class Profile:
    name: str
    shapes: dict[str, tuple[list[int], list[int], list[int]]]  # input -> (min, opt, max)
    dims: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # named dim -> [min, opt, max]

    def to_json(self) -> dict:
        return {"name": self.name, "dims": self.dims,
                "shapes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        return cls(data["name"], {k: (v["min"], v["opt"], v["max"]) for k, v in data["shapes"].items()},
                   dict(data.get("dims") or {}))

    def contains(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        return True

    def describe(self) -> str:
        """``prefill: batch 1..2 (opt 1), sequence 1..128 (opt 128), ...`` (static-only graphs: the shapes)."""
        if self.dims:
            parts = [f"{d} {lo}" if lo == hi else f"{d} {lo}..{hi} (opt {opt})"
                     for d, (lo, opt, hi) in self.dims.items()]
        else:
            parts = [f"{n} {lo}" for n, (lo, _, _) in self.shapes.items()]
        return f"{self.name}: " + ", ".join(parts)


def check_limits(max_batch: int, max_seq: int) -> None:
    if max_batch < 1:
        raise ProfileError(f"--max-batch must be >= 1 (got {max_batch})")
    if max_seq < 2:
        raise ProfileError(f"--max-seq must be >= 2 (got {max_seq}): a prompt token plus one generated token")


def graph_image_tokens(manifest: Manifest, graph: str) -> int:
    """Image tokens per image in ``graph``'s sequences: a decoder segment's own (a method that prunes
    inside the LLM gives each segment its count), a pruning graph's input (the segment before it),
    else the export's kept image tokens."""
    segments = manifest.decoder_segments
    for index, segment in enumerate(segments):
        if segment.graph == graph and segment.image_tokens is not None:
            return segment.image_tokens
        if segment.prune_before == graph and index and segments[index - 1].image_tokens is not None:
            return segments[index - 1].image_tokens
    return manifest.image.kept_image_tokens


def typical_sequence(manifest: Manifest, max_seq: int, graph: str | None = None) -> int:
    image_tokens = manifest.image.kept_image_tokens if graph is None else graph_image_tokens(manifest, graph)
    return max(1, min(max_seq, image_tokens + TYPICAL_TEXT_TOKENS))


def graph_profiles(manifest: Manifest, graph: str, max_batch: int, max_seq: int) -> list[Profile]:
    """The profiles of ``graph`` (a graph of the manifest) for these limits. A pruning graph's
    sequence holds at least its image tokens and two more (the graph's own minimum)."""
    check_limits(max_batch, max_seq)
    entry = manifest.graph(graph)
    s = typical_sequence(manifest, max_seq, graph)
    p = min(max_seq - 1, s)
    shortest = graph_image_tokens(manifest, graph) + 2 if graph in manifest.pruning_graphs else 1
    if shortest > max_seq:
        raise ProfileError(f"graph {graph!r} needs sequences of at least {shortest} tokens (its image tokens and "
                           f"two more); --max-seq {max_seq} is shorter: raise it")
    s = max(s, shortest)
    prefill = {"batch": (1, 1, max_batch), "sequence": (shortest, s, max_seq),
               "past_sequence": (0, 0, 0), "total_sequence": (1, s, max_seq)}
    decode = {"batch": (1, 1, max_batch), "sequence": (1, 1, 1),
              "past_sequence": (0, p, max_seq - 1), "total_sequence": (1, p + 1, max_seq)}
    # a multi-crop family's vision graph runs one row per crop; its prune graphs any token count per row
    rows = max(1, -(-manifest.image.num_image_tokens // manifest.vision.tokens_per_crop)) if graph == "vision" else 1
    # (from 32: TensorRT-RTX 1.7 fails to build the FocusScanRefine body for a range starting lower)
    tokens = (MIN_ROW_TOKENS, manifest.vision.tokens_per_crop, max(manifest.vision.tokens_per_crop, manifest.image.num_image_tokens))
    prefill["batch"] = (1, 1, max_batch * rows)
    prefill["num_tokens"] = decode["num_tokens"] = tokens
    has_cache = any(d == "past_sequence" for i in entry.inputs for d in i.shape)
    ranges = [("prefill", prefill), ("decode", decode)] if has_cache else [("default", prefill)]
    used = [d for d in KNOWN_DIMS if any(d in [DIM_ALIASES.get(x, x) for x in i.shape] for i in entry.inputs)]
    return [Profile(name, {i.name: _input_range(graph, i, r) for i in entry.inputs},
                    {d: list(r[d]) for d in used})
            for name, r in ranges]


def _input_range(graph: str, spec: TensorInfo, ranges: dict) -> tuple[list[int], list[int], list[int]]:
    lo, opt, hi = [], [], []
    for dim in spec.shape:
        dim = DIM_ALIASES.get(dim, dim) if isinstance(dim, str) else dim
        if isinstance(dim, int) and dim > 0:
            a = b = c = dim
        elif dim in ranges:
            a, b, c = ranges[dim]
        else:
            raise ProfileError(
                f"graph {graph!r}, input {spec.name!r}: dimension {dim!r} is neither static nor one fsr-build "
                f"knows ({', '.join(KNOWN_DIMS)}); export the graph again with fsr-export")
        lo.append(a), opt.append(b), hi.append(c)
    return lo, opt, hi
