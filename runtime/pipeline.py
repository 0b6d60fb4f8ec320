"""End-to-end generation from an export: image + prompt -> text, on any backend, in steps.

    pipe = Pipeline("exports/llava-tiny-fsr-b64")            # ONNX Runtime
    [result] = pipe.generate(["cat.png"], ["What is this?"], max_new_tokens=16)
    result.token_ids, result.text, result.kept_indices

`generate` is these steps, each a public method that ``fsr-bench`` times and
``fsr-compare`` reuses (the family's spec does the host-side work):

1. `prepare`: images and prompts -> a `Request` (pixels for the vision graph, chat-formatted
   token rows, the instruction text of each row);
2. `instruction_embeds`: the embedding a method's relevance term needs (CLIP text graph, or
   the mean LLM input embedding of the instruction; None when the vision graph takes none);
3. `vision`: the vision graph (tower + the method's op) -> each row's image embeddings;
4. `assemble`: prompt embeddings (embedding graph) with the image embeddings in place of the
   image tokens, left padding, mask, positions, image spans -> `PrefillInputs`;
5. `prefill`: the decoder segments over the whole prompt -> a `DecodeState`;
6. `decode`: one token per row through the segments, the KV caches carried in the state.

Each decoder segment keeps its own attention mask and position offset in the state, so a
method that prunes between segments (``DecoderSegment.prune_before``, run by the method's
``between_segments`` hook) gives later segments shorter caches.

Requests are checked against the model's context (``manifest.llm.max_positions``) before
anything runs: a prompt whose tokens (the image counted as the tokens the LLM sees) do not
fit is refused (`InputError`); a ``max_new_tokens`` beyond what is left is shortened to fit,
with a `fsr.errors.Note` saying so. ``generate(on_tokens=...)`` hands each step's new
tokens to the caller as they come (``fsr-run`` prints them: an interrupt loses nothing).

What the backend may do for speed, behind these steps (the KV cache stays opaque here):
keep the cache in preallocated buffers that the decoder updates in place
(`Backend.empty_cache` gets the generation's capacity; ONNX Runtime's fused decoder form),
and hand out the token-embedding table so that ids are looked up on the host instead of
running the embed graph per decode step (`Backend.embedding_table`). The prefill returns
the last position's logits only unless ``all_logits`` is asked for.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from transformers import AutoProcessor, AutoTokenizer

from fsr.errors import InputError, Note
from fsr.manifest import Manifest, read_manifest
from fsr.models import get_spec
from fsr.models.parts import LOGITS_INDEX
from fsr.models.spec import (
    CLIP_RELEVANCE, NP_DTYPES, CropPruning, HostPruning, ImageFeatures, PrefillInputs, Request, prune_graph_name,
)
from fsr.pruning.methods import get_method
from fsr.runtime.backend import Backend, BackendError, get_backend
from fsr.runtime.inputs import clip_chunks, eos_token_ids, load_image


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    kept_indices: list | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    #: why generation stopped: "eos" (an end-of-sequence token, included in ``token_ids``),
    #: "length" (``max_new_tokens`` reached) or "interrupted" (a partial result)
    stop: str = "length"

    def to_json(self) -> dict:
        """One result of ``fsr-run --json``: ``{"token_ids", "text", "kept_indices", "stop"}``."""
        return {"token_ids": self.token_ids, "text": self.text, "kept_indices": _plain(self.kept_indices),
                "stop": self.stop}


def _plain(value):
    """Kept indices as JSON values: a multi-crop family's per-crop arrays become lists of ints."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass
class SegmentState:
    """One decoder segment's part of the decode state: its KV cache (backend arrays), its
    attention mask [B, P] and the offset subtracted from the rows' positions (non-zero after a
    method dropped tokens before this segment)."""

    cache: list[Any]
    attention_mask: np.ndarray
    position_offset: np.ndarray


@dataclasses.dataclass
class DecodeState:
    """What a decode step needs: the last logits (backend array), the last position of each row,
    and each segment's state. ``image_spans`` are the prefill's (start, length) per row and image."""

    logits: Any
    last_positions: np.ndarray
    segments: list[SegmentState]
    image_spans: list[list[tuple[int, int]]]
    #: per pruning stage inside the LLM, [B, keep] int64: the kept visual tokens as indices of the
    #: image span that entered the LLM (composed over the stages)
    llm_kept: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def batch(self) -> int:
        return int(self.last_positions.shape[0])


class HostSteps:
    """The host-side steps every pipeline shares (this one and the PyTorch reference pipeline):
    preprocessing, the instruction embedding, the prefill assembly. A subclass says how it
    embeds token ids (`embed`) and CLIP text chunks (`encode_text`)."""

    def _init_host(self, manifest: Manifest, processor, clip_tokenizer, eos: set[int]) -> None:
        self.manifest = manifest
        self.spec = get_spec(manifest.family)
        self.method = get_method(manifest.method.name)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.eos = eos
        self.dtype = NP_DTYPES[manifest.dtype]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def relevance(self) -> str | None:
        return self.manifest.relevance.source

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [B,S] -> LLM input embeddings [B,S,H] (host array)."""
        raise NotImplementedError

    def encode_text(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """CLIP text chunks [C,T] -> joint-space embeddings [C,P] (host array)."""
        raise NotImplementedError

    def prepare(self, images: list, prompts: list[str], raw: bool = False) -> Request:
        """Validate and preprocess: pixels, token rows, instructions."""
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} image(s) for {len(prompts)} prompt(s); pass one image per prompt")
        if not prompts:
            raise InputError("no prompt given")
        pil = [load_image(im) for im in images]
        texts = [self.spec.format_prompt(self.processor, p, raw) for p in prompts]
        rows = self.spec.tokenize(self.processor, texts, self.manifest.image.image_token_id)
        self.fit_new_tokens(rows, 1)  # a prompt longer than the context is refused before anything runs
        return Request(self.spec.preprocess_images(self.processor, pil), rows,
                       [self.spec.instruction_text(self.processor, p) for p in prompts])

    def prompt_positions(self, row: list[int]) -> int:
        """Positions a token row takes in the LLM: its text tokens plus, for each image token,
        the image tokens the LLM sees (``manifest.image.kept_image_tokens``, an upper bound; a
        method that prunes inside the LLM: the first decoder segment's, which sees them all)."""
        image = self.manifest.image
        n_images = row.count(image.image_token_id)
        per_image = max([image.kept_image_tokens, *(s.image_tokens for s in self.manifest.decoder_segments
                                                    if s.image_tokens is not None)])
        return len(row) - n_images + n_images * per_image

    def fit_new_tokens(self, rows: list[list[int]], max_new_tokens: int) -> int:
        """``max_new_tokens`` shortened to what the context leaves after the longest prompt
        (a `Note` says so); `InputError` when a prompt alone does not fit."""
        context = self.manifest.llm.max_positions
        if not context:
            return max_new_tokens
        row = max(rows, key=self.prompt_positions)
        longest = self.prompt_positions(row)
        if longest > context:
            n_images = row.count(self.manifest.image.image_token_id)
            image = longest - (len(row) - n_images)
            raise InputError(
                f"the prompt takes {longest} positions ({len(row) - n_images} text tokens + {image} image tokens), "
                f"more than the model's context of {context}: shorten the prompt to at most "
                f"{max(context - image, 0)} text tokens")
        # the prefill gives the first new token; each further one is fed back at the next position
        room = context - longest + 1
        if max_new_tokens > room:
            warnings.warn(Note(f"max_new_tokens {max_new_tokens} does not fit in the model's context ({context} "
                               f"positions, the prompt takes {longest}): generating at most {room} tokens"),
                          stacklevel=2)
            return room
        return max_new_tokens

    def instruction_embeds(self, instructions: list[str], relevance: str | None = None) -> np.ndarray | None:
        """[B, E] in the export's dtype: the mean CLIP text embedding of the instruction's chunks, or
        the mean LLM input embedding of its tokens; None when the export computes no relevance."""
        relevance = relevance or self.relevance
        if relevance is None:
            return None
        rows = []
        for text in instructions:
            if relevance == CLIP_RELEVANCE:
                ids, mask = clip_chunks(self.clip_tokenizer, text, self.manifest.relevance.text_max_tokens
                                        or self.spec.clip_max_tokens)
                rows.append(self.encode_text(ids, mask).astype(np.float32).mean(axis=0))
                continue
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                rows.append(self.embed(np.asarray([ids]))[0].astype(np.float32).mean(axis=0))
            else:
                rows.append(np.zeros(self.manifest.llm.hidden_size, np.float32))
        return np.stack(rows).astype(self.dtype)

    def host_pruning(self) -> HostPruning | None:
        """How the method's op runs on host-gathered rows (families with ``host_pruning``), or None."""
        if not self.spec.prunes_on_host(self.method):
            return None
        settings = self.method.settings_from_json(self.manifest.method.settings)
        return HostPruning(self.prune_rows, self.method.inputs(settings, self.relevance is not None),
                           self.method.budget(settings), self.method.scope(settings))

    def pruning_plan(self) -> HostPruning | CropPruning | None:
        """What the family's `image_features` gets beside the vision outputs: the op on host-gathered
        rows (`host_pruning`), the method's layout of crops it pruned in the vision graph (a ``PER_CROP``
        method on a multi-crop family), or None."""
        return self.host_pruning() or self.spec.crop_pruning(self.manifest)

    def prune_rows(self, budget: int, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def assemble(self, rows: list[list[int]], features: ImageFeatures) -> PrefillInputs:
        """Embed the prompts (one left-padded call) and put each row's image embeddings in
        place of its image tokens."""
        width = max(len(r) for r in rows)
        padded = np.asarray([[self.pad_id] * (width - len(r)) + r for r in rows])
        text_embeds = self.embed(padded)
        text_rows = [text_embeds[b, width - len(r):] for b, r in enumerate(rows)]
        pad_embed = self.embed(np.asarray([[self.pad_id]]))[0, 0]
        images = [[np.asarray(e).astype(self.dtype) for e in row] for row in features.embeddings]
        return self.spec.assemble_prefill(rows, text_rows, images, self.manifest.image.image_token_id, pad_embed)


class Pipeline(HostSteps):
    """Runs an export's graphs on one backend (``ort``, ``trt`` or ``torch``)."""

    def __init__(self, export_dir, backend: str = "ort", verify: bool = True, **backend_options):
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        backend_obj = get_backend(backend, export_dir, manifest, **backend_options)
        if verify:  # what this backend loads is what the manifest hashed
            graphs = pipeline_graphs(manifest) if backend_obj.loads_graph_files else []
            manifest.verify(export_dir, graphs=graphs, source="all" if backend_obj.loads_weights else "processor")
        source = manifest.resolve(export_dir, manifest.source.folder)
        processor = AutoProcessor.from_pretrained(source)
        clip_tokenizer = None
        if manifest.relevance.source == CLIP_RELEVANCE:
            clip_tokenizer = AutoTokenizer.from_pretrained(manifest.resolve(export_dir, manifest.relevance.clip_model))
        self.export_dir = export_dir
        self._setup(backend_obj, processor, clip_tokenizer, eos_token_ids(source, processor.tokenizer))

    @classmethod
    def from_backend(cls, backend: Backend, processor, *, clip_tokenizer=None, eos: set[int] | None = None
                     ) -> "Pipeline":
        """A pipeline over a backend made directly (a model in memory: no export folder)."""
        pipe = cls.__new__(cls)
        pipe.export_dir = backend.export_dir
        tokenizer = processor.tokenizer
        pipe._setup(backend, processor, clip_tokenizer, eos if eos is not None else {tokenizer.eos_token_id})
        return pipe

    def _setup(self, backend: Backend, processor, clip_tokenizer, eos: set[int]) -> None:
        self.backend = backend
        self._init_host(backend.manifest, processor, clip_tokenizer, eos)
        self.segments = self.manifest.segment_graphs
        self.runners = {}
        #: the token-embedding table when the backend hands it out: ids are looked up, the graph never runs
        self.embedding_table = backend.embedding_table("embed")
        try:
            for name in pipeline_graphs(self.manifest):
                if name == "embed" and self.embedding_table is not None:
                    continue
                self.runners[name] = backend.runner(name).activate()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run_graph(self, graph: str, feeds: dict) -> dict:
        """Run one graph of the export: host arrays are moved to the backend; outputs are backend arrays,
        by the names our tools use (`fsr.manifest.GraphEntry.aliases`)."""
        out = self.runners[graph].infer({k: self.backend.from_host(v) if isinstance(v, np.ndarray) else v
                                         for k, v in feeds.items()})
        entry = self.manifest.graphs.get(graph)
        return entry.our_names(out) if entry is not None else out

    _run = run_graph

    # -- 1./2. preprocessing and the instruction embedding: HostSteps --------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        table = self.embedding_table
        if table is None:
            return self.backend.to_host(self._run("embed", {"input_ids": ids})["inputs_embeds"])
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise InputError(f"token ids must lie in [0, {table.shape[0]}) (got {ids.min()}..{ids.max()})")
        return table[ids]

    def encode_text(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.backend.to_host(self._run("text_encoder", {"input_ids": ids, "attention_mask": mask})["text_embeds"])

    # -- 3. vision --------------------------------------------------------------------------

    def vision_outputs(self, request: Request, instruction_embeds: np.ndarray | None) -> dict[str, np.ndarray]:
        """The vision graph's outputs (host arrays), by name."""
        feeds = self.spec.vision_feeds(request.vision, instruction_embeds, self.dtype)
        out = self._run("vision", feeds)
        return {k: self.backend.to_host(v) for k, v in out.items()}

    def vision(self, request: Request, instruction_embeds: np.ndarray | None) -> ImageFeatures:
        return self.spec.image_features(self.vision_outputs(request, instruction_embeds), request.vision,
                                        self.pruning_plan())

    def prune_rows(self, budget: int, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The ``prune_b<budget>`` graph on host-gathered rows -> (pruned, kept_indices) host arrays."""
        graph = prune_graph_name(budget)
        if graph not in self.runners:
            raise InputError(f"this export has no {graph} graph (it has {', '.join(self.runners)}); export again")
        out = self._run(graph, {k: v.astype(self.dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()})
        names = self.runners[graph].output_names
        return self.backend.to_host(out[names[0]]), self.backend.to_host(out[names[1]])

    # -- 4. prefill assembly: HostSteps.assemble ----------------------------------------------

    # -- 5./6. prefill and decode ------------------------------------------------------------

    def empty_cache(self, segment: str, batch: int, capacity: int | None = None) -> list:
        """A segment's empty KV cache (``capacity``: positions the generation will reach, a hint)."""
        llm = self.manifest.llm
        n = len(self.runners[segment].input_names) - 3
        return self.backend.empty_cache(segment, (batch, llm.num_kv_heads, llm.head_dim), self.dtype, n, capacity)

    def _forward(self, embeds, positions: np.ndarray, state: DecodeState, prefill: bool, all_logits: bool = False):
        """The decoder segments in order. Prefill: a segment with ``prune_before`` first gets the
        method's pruning (`PruningMethod.between_segments`: its own shorter mask, the renumbered
        positions, its position offset); the others take the previous segment's. Decode: each
        segment's positions are the unpruned ones minus its offset. ``all_logits``: the last
        segment returns every position's logits (``logits_index``), not the last one's."""
        hidden = embeds
        last = self.manifest.decoder_segments[-1]
        for index, (segment, seg_state) in enumerate(zip(self.manifest.decoder_segments, state.segments)):
            if prefill:
                if segment.prune_before:
                    hidden, positions = self.method.between_segments(self, index, hidden, positions, state)
                elif index:
                    previous = state.segments[index - 1]
                    seg_state.attention_mask, seg_state.position_offset = (previous.attention_mask,
                                                                           previous.position_offset)
                segment_positions = positions
            else:
                segment_positions = positions - seg_state.position_offset[:, None]
            runner = self.runners[segment.graph]
            feeds = {runner.input_names[0]: hidden, "attention_mask": seg_state.attention_mask,
                     "position_ids": segment_positions}
            feeds.update(zip(runner.input_names[3:], seg_state.cache))
            if all_logits and segment is last:
                if LOGITS_INDEX not in runner.optional_input_names:
                    raise BackendError(f"the {self.backend.name} backend's {segment.graph!r} returns the last "
                                       "position's logits only; use the ort or torch backend for every position's")
                feeds[LOGITS_INDEX] = np.arange(segment_positions.shape[-1], dtype=np.int64)
            out = self._run(segment.graph, feeds)
            hidden = out[runner.output_names[0]]
            seg_state.cache = [out[n] for n in runner.output_names[1:]]
        state.logits = hidden
        return state

    def prefill(self, inputs: PrefillInputs, *, max_new_tokens: int | None = None,
                all_logits: bool = False) -> DecodeState:
        """The decoder segments over the whole prompt. ``state.logits`` holds the last position's logits
        ([B, 1, V]), or every position's with ``all_logits``; ``max_new_tokens`` sizes the KV buffers of a
        backend that preallocates them (more steps still work: the buffers grow)."""
        batch, width = inputs.attention_mask.shape
        capacity = width + max_new_tokens if max_new_tokens is not None else None
        segments = [SegmentState(self.empty_cache(s, batch, capacity), inputs.attention_mask,
                                 np.zeros(batch, np.int64)) for s in self.segments]
        state = DecodeState(None, inputs.position_ids[..., -1], segments, inputs.image_spans)
        return self._forward(inputs.inputs_embeds, inputs.position_ids, state, prefill=True, all_logits=all_logits)

    def decode(self, state: DecodeState, next_ids: np.ndarray) -> DecodeState:
        """One step: ``next_ids`` [B] -> the state after them (logits of the next token)."""
        ones = np.ones((state.batch, 1), np.int64)
        for seg in state.segments:
            seg.attention_mask = np.concatenate([seg.attention_mask, ones], axis=1)
        positions = self.spec.next_positions(state.last_positions)
        state.last_positions = positions[..., -1]
        embeds = self.embed(np.asarray(next_ids, np.int64)[:, None])
        return self._forward(embeds, positions, state, prefill=False)

    def next_tokens(self, state: DecodeState) -> np.ndarray:
        """Greedy choice from the last position's logits (on the device where possible)."""
        logits = state.logits
        if not isinstance(logits, np.ndarray) and hasattr(logits, "argmax") and hasattr(logits, "cpu"):
            return logits[:, -1].float().argmax(-1).cpu().numpy()  # a torch tensor on its device
        return self.backend.to_host(logits)[:, -1].astype(np.float32).argmax(-1)

    # -- public API ----------------------------------------------------------------------

    def generate(self, images: list, prompts: list[str], *, raw: bool = False, max_new_tokens: int = 32,
                 on_tokens: Callable[[list[int | None]], None] | None = None) -> list[GenerationResult]:
        """Greedy generation. ``on_tokens`` gets each step's new token per row as it comes
        (None for a row that has already stopped)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        t0 = time.perf_counter()
        request = self.prepare(images, prompts, raw)
        max_new_tokens = self.fit_new_tokens(request.rows, max_new_tokens)
        timings: dict[str, float] = {}

        t = time.perf_counter()
        features = self.vision(request, self.instruction_embeds(request.instructions))
        timings["vision_s"] = time.perf_counter() - t

        inputs = self.assemble(request.rows, features)
        batch = len(request.rows)
        t = time.perf_counter()
        state = self.prefill(inputs, max_new_tokens=max_new_tokens)
        timings["prefill_s"] = time.perf_counter() - t
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        t = time.perf_counter()
        for step in range(max_new_tokens):
            next_ids = self.next_tokens(state)
            new: list[int | None] = [None] * batch
            for b in range(batch):
                if not done[b]:
                    generated[b].append(int(next_ids[b]))
                    new[b] = int(next_ids[b])
                    done[b] = int(next_ids[b]) in self.eos
            if on_tokens is not None:
                on_tokens(new)
            if done.all() or step == max_new_tokens - 1:
                break
            state = self.decode(state, np.where(done, self.pad_id, next_ids))
        timings["decode_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        kept = kept_per_row(features.kept_indices, [[k[b] for k in state.llm_kept] for b in range(batch)])
        return [
            GenerationResult(ids, self.tokenizer.decode(ids, skip_special_tokens=True), kept[b], dict(timings),
                             "eos" if done[b] else "length")
            for b, ids in enumerate(generated)
        ]


def kept_per_row(vision_kept: list | None, llm_kept: list[list]) -> list:
    """``GenerationResult.kept_indices`` of each row: the vision graph's kept indices (None without
    pruning), or, when the method also pruned inside the LLM, the list of every stage's kept image
    tokens as indices of the image's own tokens: the vision graph's first (if it pruned), then one
    entry per LLM stage (``llm_kept[b][i]`` are indices of the span that entered the LLM)."""
    rows = []
    for b, stages in enumerate(llm_kept):
        if not stages:  # as the vision side gave it (a multi-crop family: one array per crop)
            rows.append(None if vision_kept is None else vision_kept[b])
            continue
        base = None if vision_kept is None else np.asarray(vision_kept[b])
        mapped = [(np.asarray(k) if base is None else base[np.asarray(k)]).tolist() for k in stages]
        rows.append(mapped if base is None else [base.tolist(), *mapped])
    return rows


def pipeline_graphs(manifest: Manifest) -> list[str]:
    """The graphs a pipeline runs: vision, embed, the decoder segments, the text encoder if any."""
    names = ["vision", "embed", *manifest.segment_graphs, *manifest.pruning_graphs]
    names += [n for n in manifest.graphs if n not in names]
    return names
