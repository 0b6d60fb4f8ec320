"""ONNX Runtime backend: the portable one (CPU here; CUDA where onnxruntime-gpu is installed).

What it does beyond running graphs (issue 13, measured in bench/README.md):

- **No spinning stalls between graphs.** Each graph has its own session; ONNX Runtime's
  intra-op threads spin after a run by default and starve the next graph's threads (the
  pipeline runs several graphs back to back). ``spin="off"`` (default) creates every session
  with ``session.intra_op.allow_spinning=0``; ``"stop"`` keeps spinning inside a run and
  stops it at the end (``session.force_spinning_stop``); ``"on"`` is ONNX Runtime's default.
- **The decoder's fused form** (``forms["ort"]`` in the manifest: GroupQueryAttention, KV heads
  unexpanded; `fsr.models.attention`) is loaded instead of the portable graph when the export
  has it (``fused=False``: the portable graph).
- **KV cache buffers reused across steps.** For the fused form, each past/present tensor is a
  `KVBuffer`: one preallocated array ``[B, kv_heads, capacity, head_dim]`` bound with IO
  binding as both the ``past_key_values.*`` input and the ``present.*`` output, which
  GroupQueryAttention updates in place (ONNX Runtime's past/present buffer sharing, as
  onnxruntime-genai uses it). A step copies nothing but the new positions; a full buffer is
  grown (doubled, one copy) when a longer sequence needs it.
- **Chunked prefill.** On the CPU, ONNX Runtime's GroupQueryAttention computes a prompt's whole
  S x S score matrix (no causal skipping): a long prompt through the fused form runs as chunks of
  ``prefill_chunk`` positions (default 256 on the CPU provider, off elsewhere), each attending to
  the buffers the chunks before it filled, which skips most of the masked half; each chunk reads
  the weights again, so the gain is smaller than the attention saved (624 positions, 12 runs
  interleaved: the pipeline's prefill 208 -> 199 ms on the small preset, 385 -> 353 ms on the
  32-layer small-deep; the decoder session alone in equal thirds 204 -> 175 ms; the same logits
  and cache bit for bit). Batch 1 only:
  ONNX Runtime's op takes several new positions after a past only for one row.
- **The embedding off the per-token path.** `embedding_table` returns the token-embedding
  table when the embed graph is a plain lookup (one ``Gather`` of an initializer), so the
  pipeline indexes it on the host instead of running a session per decode step (the same
  rows, bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fsr.manifest import Manifest
from fsr.onnx_io import SHARED_WEIGHTS_INDEX, subgraph_reads
from fsr.runtime.backend import Backend, BackendError, Runner

#: the manifest's form of a graph this backend prefers (fused attention, KV buffers updated in place)
ORT_FORM = "ort"
SPIN_MODES = ("off", "stop", "on")
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
#: positions a new KV buffer holds beyond the prefill when no capacity is asked for
DEFAULT_RESERVE = 256
#: positions per prefill chunk of the fused decoder form on the CPU provider (``prefill_chunk=None``)
CPU_PREFILL_CHUNK = 256


class KVBuffer:
    """One past/present tensor kept in a preallocated buffer ``array`` [B, kv_heads, capacity, head_dim]
    that ONNX Runtime updates in place; the first ``length`` positions are valid. ``np.asarray(buffer)``
    and ``shape`` give the valid part (what a plain cache array would be)."""

    __slots__ = ("array", "ortvalue", "length")

    def __init__(self, array: np.ndarray, length: int = 0):
        self.array = array
        self.ortvalue = ort.OrtValue.ortvalue_from_numpy(array)  # shares the array's memory
        self.length = length

    @classmethod
    def empty(cls, shape: tuple[int, int, int], capacity: int, dtype) -> "KVBuffer":
        batch, heads, head_dim = shape
        return cls(np.zeros((batch, heads, capacity, head_dim), dtype=dtype), 0)

    @property
    def capacity(self) -> int:
        return int(self.array.shape[2])

    @property
    def shape(self) -> tuple[int, ...]:
        b, h, _, d = self.array.shape
        return (b, h, self.length, d)

    @property
    def dtype(self):
        return self.array.dtype

    def valid(self) -> np.ndarray:
        return self.array[:, :, :self.length]

    def __array__(self, dtype=None, copy=None):
        return np.array(self.valid(), dtype=dtype, copy=True)

    def grown(self, capacity: int) -> "KVBuffer":
        """A larger buffer holding the same valid positions (one copy)."""
        b, h, _, d = self.array.shape
        array = np.zeros((b, h, capacity, d), dtype=self.array.dtype)
        array[:, :, :self.length] = self.array[:, :, :self.length]
        return KVBuffer(array, self.length)


def session_options(threads: int | None, spin: str) -> ort.SessionOptions:
    if spin not in SPIN_MODES:
        raise BackendError(f"unknown spin mode {spin!r}; choose one of {', '.join(SPIN_MODES)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if spin == "off":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif spin == "stop":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class SharedWeights:
    """The tensors several graphs of an export share (``fsr.export.share``), loaded once.

    The shared file is memory-mapped and each tensor becomes one ``OrtValue`` over its bytes;
    every session that holds the tensor as a *weight* gets that value
    (``SessionOptions.add_initializer``) instead of a copy of its own. Such sessions run with MatMul
    prepacking off (``session.disable_prepacking``): prepacking would make a packed copy per session.

    A weight here is an initializer whose every use is the ``B`` input of a ``MatMul`` / ``Gemm`` or the
    table of a ``Gather`` (`weight_initializers`): what holds the memory. Anything else (a norm's
    scale under a ``Mul``, say) stays the session's own: ONNX Runtime's graph optimizers may reshape
    such a constant in place (unsqueeze it, push a transpose into it), and a value registered with
    ``add_initializer`` replaces the reshaped one at run time (``Mul``: "Attempting to broadcast an
    axis by a dimension other than 1"; measured on the ``small-deep`` PIO-FVLM export).
    """

    def __init__(self, root: Path, index_file: Path):
        self.index = json.loads(Path(index_file).read_text())
        self.data = np.memmap(Path(root) / self.index["data"], dtype=np.uint8, mode="r")
        self.values: dict[str, Any] = {}
        self.arrays: dict[str, np.ndarray] = {}  # the OrtValues' memory: kept alive here

    def names(self, graph: str) -> list[str]:
        return self.index["graphs"].get(graph, [])

    def value(self, name: str):
        if name not in self.values:
            t = self.index["tensors"][name]
            raw = self.data[t["offset"]: t["offset"] + t["length"]]
            array = raw.view(np.dtype(t["dtype"])).reshape(t["shape"])
            self.arrays[name] = array
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        return self.values[name]

    def add_to(self, options, graph: str, path: Path | None = None) -> list[str]:
        """Register the shared tensors ``graph`` uses as weights (all of them without ``path``, the
        graph's file); the names registered."""
        names = self.names(graph)
        if path is not None:
            weights = weight_initializers(path)
            names = [n for n in names if n in weights]
        for name in names:
            options.add_initializer(name, self.value(name))
        if names:
            options.add_session_config_entry("session.disable_prepacking", "1")
        return names


#: (op type, input index) uses that make an initializer a weight ONNX Runtime reads as it is
WEIGHT_USES = {("MatMul", 1), ("Gemm", 1), ("Gather", 0)}


def weight_initializers(path: Path) -> set[str]:
    """Initializers of the graph at ``path`` used only as weights (`WEIGHT_USES`, top-level nodes of the
    default domain); one used anywhere else (another input, another op, a subgraph, a graph output) is
    left out."""
    import onnx  # noqa: PLC0415

    graph = onnx.load(path, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for index, name in enumerate(node.input):
            if name in initializers:
                uses.setdefault(name, set()).add((op, index))
        for name in subgraph_reads(node) & initializers:  # read inside a Loop / If body: not a plain weight
            uses.setdefault(name, set()).add(("subgraph", -1))
    for output in graph.output:
        if output.name in initializers:
            uses.setdefault(output.name, set()).add(("output", -1))
    return {name for name, used in uses.items() if used <= WEIGHT_USES}


class OnnxRuntimeRunner(Runner):
    """One ONNX Runtime session. With ``kv_buffers`` (a graph whose attention updates past/present
    buffers in place), past inputs may be `KVBuffer` s and present outputs are returned as the same
    buffers, updated; plain arrays are accepted too (copied into a new buffer once)."""

    def __init__(self, name: str, path: Path, providers: list[str] | None = None, threads: int | None = None,
                 spin: str = "off", kv_buffers: bool = False, reserve: int = DEFAULT_RESERVE,
                 shared: "SharedWeights | None" = None, prefill_chunk: int = 0):
        super().__init__(name, path)
        self.providers, self.threads, self.spin, self.shared = providers, threads, spin, shared
        self.kv_buffers, self.reserve = kv_buffers, reserve
        #: with ``kv_buffers``: a longer input runs as chunks of this many positions (0: never)
        self.prefill_chunk = _chunk(prefill_chunk)
        self.session = None

    def activate_impl(self) -> None:
        opts = session_options(self.threads, self.spin)
        if self.shared is not None:
            self.shared.add_to(opts, self.name, self.path)
        providers = self.providers or ort.get_available_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load graph {self.name!r} ({self.path}): {exc}") from exc
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._optional = [i.name for i in self.session.get_overridable_initializers()]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._pairs = [(n, PRESENT_PREFIX + n[len(PAST_PREFIX):]) for n in self._inputs if n.startswith(PAST_PREFIX)]
        missing = [p for _, p in self._pairs if p not in self._outputs]
        if self.kv_buffers and (missing or not self._pairs):
            raise BackendError(f"graph {self.name!r} ({self.path}) has no matching present output for every past "
                               f"input (missing {missing}); it cannot update its KV cache in place")
        # float inputs in the graph's own float type (an fp16 graph may take float32 pixels: Transformers.js layout)
        self._floats = {i.name: _FLOAT_TYPES[i.type] for i in self.session.get_inputs() if i.type in _FLOAT_TYPES}

    def deactivate_impl(self) -> None:
        self.session = None

    @property
    def optional_input_names(self) -> list[str]:
        return self._optional

    def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
        feed_dict = {k: self._own_float(k, v) for k, v in feed_dict.items()}
        if self.kv_buffers:
            return self._infer_in_place(feed_dict)
        feeds = {k: np.ascontiguousarray(v.valid() if isinstance(v, KVBuffer) else v) for k, v in feed_dict.items()}
        out = self.session.run(self._outputs, feeds)
        return dict(zip(self._outputs, out))

    def _own_float(self, name: str, value):
        """A float input in the graph's own float type (an fp16 graph may take float32 pixels: Transformers.js)."""
        if name in self._floats and not isinstance(value, KVBuffer):
            value = np.asarray(value)
            if value.dtype.kind == "f" and value.dtype != self._floats[name]:
                return value.astype(self._floats[name])
        return value

    # -- past/present buffer sharing -------------------------------------------------------

    def _buffer(self, name: str, value, past: int, total: int) -> KVBuffer:
        """The buffer ``value`` (a KVBuffer or a plain [B, H, past, D] array) with room for ``total`` positions."""
        if isinstance(value, KVBuffer):
            if value.length != past:
                raise BackendError(f"graph {self.name!r}: {name} holds {value.length} positions, the attention mask "
                                   f"says {past}; pass the cache the previous step returned")
            if value.capacity >= total:
                return value
            # room for the steps that follow: a prefill that outgrows the buffer keeps the reserve, a decode
            # step doubles it (a growth copies every valid position, so it must not recur step after step)
            return value.grown(max(total + self.reserve, 2 * value.capacity))
        array = np.asarray(value)
        if array.ndim != 4 or array.shape[2] != past:
            raise BackendError(f"graph {self.name!r}: {name} has shape {list(array.shape)}; the attention mask says "
                               f"{past} past positions")
        buffer = KVBuffer.empty((array.shape[0], array.shape[1], array.shape[3]), total + self.reserve, array.dtype)
        buffer.array[:, :, :past] = array
        buffer.length = past
        return buffer

    def _infer_in_place(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
        first = self._inputs[0]
        seq, total = feed_dict[first].shape[1], feed_dict["attention_mask"].shape[1]
        past = total - seq
        pasts = {n for n, _ in self._pairs}
        # (ONNX Runtime's GroupQueryAttention takes several new positions after a past for batch 1 only)
        if 0 < self.prefill_chunk < seq and feed_dict[first].shape[0] == 1 and \
                set(feed_dict) == {first, "attention_mask", "position_ids", *pasts}:
            return self._infer_in_chunks(feed_dict, seq, past)
        if any(n in feed_dict for n in self._optional):
            # IO binding cannot feed an overridable initializer: run plainly with the buffers as inputs;
            # the op then writes the presents into new arrays of the buffers' capacity
            feeds = {n: (self._buffer(n, v, past, total).array if n in pasts else np.ascontiguousarray(v))
                     for n, v in feed_dict.items()}
            out = dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
            for _, present_name in self._pairs:
                out[present_name] = KVBuffer(np.ascontiguousarray(out[present_name]), total)
            return out
        io = self.session.io_binding()
        for name, value in feed_dict.items():
            if name not in pasts:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        others = [n for n in self._outputs if not n.startswith(PRESENT_PREFIX)]
        for name in others:  # bound first: get_outputs() lists outputs in binding order
            io.bind_output(name)
        buffers = []
        for past_name, present_name in self._pairs:
            buffer = self._buffer(past_name, feed_dict[past_name], past, total)
            io.bind_ortvalue_input(past_name, buffer.ortvalue)
            io.bind_ortvalue_output(present_name, buffer.ortvalue)
            buffers.append((present_name, buffer))
        self.session.run_with_iobinding(io)
        out = dict(zip(others, (v.numpy() for v in io.get_outputs()[:len(others)])))
        for name, buffer in buffers:
            buffer.length = total
            out[name] = buffer
        return {n: out[n] for n in self._outputs}

    def _infer_in_chunks(self, feed_dict: dict[str, Any], seq: int, past: int) -> dict[str, Any]:
        """The input's positions in chunks of ``prefill_chunk``, each a run on the buffers the chunks
        before it filled (sized for the whole input first: one growth at most). An output with the
        chunk's positions on axis 1 is the chunks' outputs concatenated; any other (the last
        position's logits) is the last chunk's."""
        first, total = self._inputs[0], past + seq
        caches = {n: self._buffer(n, feed_dict[n], past, total) for n, _ in self._pairs}
        x, mask, positions = (feed_dict[first], np.asarray(feed_dict["attention_mask"]),
                              np.asarray(feed_dict["position_ids"]))
        parts: dict[str, list] = {}
        out: dict[str, Any] = {}
        for start in range(0, seq, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, seq)
            out = self._infer_in_place({first: x[:, start:stop], "attention_mask": mask[:, :past + stop],
                                        "position_ids": positions[..., start:stop], **caches})
            caches = {past_name: out[present_name] for past_name, present_name in self._pairs}
            for name, value in out.items():
                if not isinstance(value, KVBuffer) and value.ndim >= 2 and value.shape[1] == stop - start:
                    parts.setdefault(name, []).append(value)
        # an output is per position when every chunk gave one (the first chunk is >= 2 positions long)
        for name, values in parts.items():
            if len(values) == len(range(0, seq, self.prefill_chunk)):
                out[name] = np.concatenate(values, axis=1)
        return out


class OnnxRuntimeBackend(Backend):
    name = "ort"

    def __init__(self, export_dir: Path, manifest: Manifest, providers: list[str] | None = None,
                 threads: int | None = None, spin: str = "off", fused: bool = True, embed_lookup: bool = True,
                 share_weights: bool = False, prefill_chunk: int | None = None):
        super().__init__(export_dir, manifest)
        if spin not in SPIN_MODES:
            raise BackendError(f"unknown spin mode {spin!r}; choose one of {', '.join(SPIN_MODES)}")
        self.providers, self.threads, self.spin = providers, threads, spin
        # the provider that runs the graphs: the first one listed that computes (Azure's serves remote models)
        running = [p for p in (providers or ort.get_available_providers()) if p != "AzureExecutionProvider"]
        on_cpu = not running or running[0] == "CPUExecutionProvider"
        #: positions per prefill chunk of the fused decoder form (None: `CPU_PREFILL_CHUNK` on the CPU
        #: provider, else off; 0: off)
        self.prefill_chunk = _chunk(prefill_chunk) if prefill_chunk is not None else (CPU_PREFILL_CHUNK if on_cpu else 0)
        self.fused, self.embed_lookup = _flag(fused, "fused"), _flag(embed_lookup, "embed_lookup")
        self.share_weights = share_weights
        self._shared: SharedWeights | None = None

    def options(self) -> dict:
        return {"providers": self.providers or ort.get_available_providers(), "threads": self.threads,
                "spin": self.spin, "fused": self.fused, "embed_lookup": self.embed_lookup,
                "prefill_chunk": self.prefill_chunk, "share_weights": self.share_weights}

    def shared_weights(self, graph: str) -> SharedWeights | None:
        """The export's shared tensors when ``graph`` holds some (its files list their index) and
        ``share_weights`` is on. Off by default: only tensors a graph reads directly as weights are
        registered (`SharedWeights`), and the graphs as exported now read each weight through a
        ``Transpose`` that ONNX Runtime folds into a copy of its own at load time, so on the exports
        of this version nothing is registered (measured: small-deep PIO-FVLM, same resident memory
        either way); on disk the shared tensors exist once."""
        index = next((f.path for f in self.manifest.graph(graph).files[1:] if f.path.endswith(SHARED_WEIGHTS_INDEX)), None)
        if index is None or not self.share_weights:
            return None
        if self._shared is None:
            self._shared = SharedWeights(self.export_dir, self.manifest.resolve(self.export_dir, index))
        return self._shared

    def form(self, graph: str) -> str | None:
        """The form of ``graph`` this backend runs (``"ort"`` or None: the graph itself)."""
        entry = self.manifest.graphs.get(graph)
        return ORT_FORM if self.fused and entry is not None and ORT_FORM in entry.forms else None

    def runner(self, graph: str) -> OnnxRuntimeRunner:
        if graph not in self.manifest.graphs:
            raise BackendError(f"the export has no {graph!r} graph (it has {', '.join(self.manifest.graphs)})")
        entry = self.manifest.graphs[graph]
        form = self.form(graph)
        rel = entry.forms[form].file if form else entry.file
        path = self.manifest.resolve(self.export_dir, rel)
        return OnnxRuntimeRunner(graph, path, self.providers, self.threads, self.spin, kv_buffers=form is not None,
                                 shared=self.shared_weights(graph), prefill_chunk=self.prefill_chunk)

    def empty_cache(self, graph: str, shape: tuple[int, int, int], dtype, count: int, capacity: int | None = None):
        if self.form(graph) is None:
            return super().empty_cache(graph, shape, dtype, count, capacity)
        capacity = capacity if capacity is not None else DEFAULT_RESERVE
        return [KVBuffer.empty(shape, max(capacity, 1), dtype) for _ in range(count)]

    def embedding_table(self, graph: str) -> np.ndarray | None:
        if not self.embed_lookup or graph not in self.manifest.graphs:
            return None
        return lookup_table(self.manifest.resolve(self.export_dir, self.manifest.graphs[graph].file))

    def to_host(self, array: Any) -> np.ndarray:
        return array.valid() if isinstance(array, KVBuffer) else np.asarray(array)


def lookup_table(path: Path) -> np.ndarray | None:
    """The table of an embedding graph that is exactly ``output = Gather(table, input_ids)`` (axis 0), else
    None (a graph that scales or adds anything runs as a graph)."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    model = onnx.load(path)
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type != "Identity"]
    if len(nodes) != 1 or nodes[0].op_type != "Gather" or nodes[0].domain not in ("", "ai.onnx"):
        return None
    node = nodes[0]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    tables = {t.name: t for t in graph.initializer}
    if axis != 0 or node.input[0] not in tables or len(graph.input) != 1 or node.input[1] != graph.input[0].name:
        return None
    if len(graph.output) != 1 or graph.output[0].name != node.output[0]:
        return None
    return numpy_helper.to_array(tables[node.input[0]])


def _chunk(value) -> int:
    """A ``prefill_chunk`` option: 0 (off) or a chunk of >= 2 positions."""
    try:
        chunk = int(value)
    except (TypeError, ValueError):
        chunk = -1
    if chunk < 0 or chunk == 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise BackendError(f"backend option prefill_chunk takes 0 (off) or a number of positions >= 2 (got {value!r})")
    return chunk


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise BackendError(f"backend option {name} takes true or false (got {value!r})")
