"""TensorRT backend: runs the engines ``fsr-build`` recorded in an export's manifest.

    pipe = Pipeline("exports/llava-tiny-fsr-b64", backend="trt")              # after fsr-build
    pipe = Pipeline(..., backend="trt", precision="fp16", cuda_graphs=True)   # backend options

Needs an NVIDIA GPU, PyTorch with CUDA, and the TensorRT flavour the engines were built
with (``tensorrt`` or ``tensorrt_rtx``). Arrays are torch CUDA tensors: inputs are
moved to the device once, outputs are allocated per call from the shapes the context
infers, and the pipeline hands the KV cache (``present.*`` -> ``past_key_values.*``)
from one step to the next as device tensors, so the cache never visits the host. All
work runs on PyTorch's current CUDA stream, so it is ordered with PyTorch's own copies.

Engine choice per graph (`fsr.engines.records.select_engine`): ``precision`` and
``plugin`` narrow it; otherwise the plugin engine, then the most recent build. An
engine whose ONNX changed since the build is refused (`check_engine_fresh`).

A graph built with two profiles (the decoder: prefill and decode) gets one execution
context per profile; a call runs on the first profile whose ranges hold its shapes.
``cuda_graphs=True`` replays decode steps from CUDA graphs: TensorRT-RTX captures them
itself (``CudaGraphStrategy.WHOLE_GRAPH_CAPTURE``); with full TensorRT the runner
captures one graph per distinct set of decode shapes (kept in a small LRU cache), which
pays off when the same lengths recur (benchmarks, batches of equal prompts).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsr.engines.plugin_graph import PluginError, find_plugin_library, load_plugin_library
from fsr.engines.profiles import Profile
from fsr.engines.records import check_engine_fresh
from fsr.engines.trt_import import TensorRTMissing, import_tensorrt, make_logger
from fsr.manifest import EngineEntry, Manifest, ManifestError
from fsr.runtime.backend import Backend, BackendError, Runner

GPU_MESSAGE = ("the TensorRT backend needs an NVIDIA GPU with CUDA, and this machine has none "
               "(torch.cuda.is_available() is False); use --backend ort here, or run on a GPU machine")
CUDA_GRAPH_CACHE = 32


def _torch_dtypes(trt_module) -> dict:
    d = trt_module.DataType
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    return {getattr(d, k): v for k, v in table.items() if hasattr(d, k)}


class TensorRTRunner(Runner):
    """One engine. ``infer`` takes NumPy arrays or torch tensors and returns torch CUDA tensors."""

    def __init__(self, name: str, path: Path, entry: EngineEntry, trt, *, inputs: list[str], outputs: list[str],
                 cuda_graphs: bool = False, plugin_library: Path | None = None, device: str = "cuda"):
        super().__init__(name, path, inputs, outputs)
        self.entry, self.trt, self.device = entry, trt, device
        self.cuda_graphs, self.plugin_library = cuda_graphs, plugin_library
        self.engine = self.runtime = None
        self.contexts: dict[int, Any] = {}
        self._graphs: collections.OrderedDict = collections.OrderedDict()

    # -- lifecycle -----------------------------------------------------------------------

    def activate_impl(self) -> None:
        t = self.trt.module
        if self.entry.plugin:
            try:
                load_plugin_library(self.trt, find_plugin_library(self.plugin_library))
            except PluginError as exc:
                raise BackendError(f"engine {self.entry.file} uses the pruning plugin: {exc}") from exc
        self.logger = make_logger(self.trt)
        self.runtime = t.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            errors = "; ".join(self.logger.errors())
            raise BackendError(f"{self.trt.label} cannot load {self.entry.file} ({errors}); "
                               "engines are tied to the TensorRT version (and, for full TensorRT, the GPU) that "
                               "built them: run fsr-build again on this machine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = [n for n in self._inputs + self._outputs if n not in names]
        if missing:
            raise BackendError(f"engine {self.entry.file} lacks tensor(s) {missing} of graph {self.name!r}; "
                               "run fsr-build again")
        dtypes = _torch_dtypes(t)
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.profiles = [Profile.from_json(p) for p in self.entry.profiles]
        if len(self.profiles) != self.engine.num_optimization_profiles:
            raise BackendError(f"engine {self.entry.file} has {self.engine.num_optimization_profiles} profiles, "
                               f"the manifest records {len(self.profiles)}; run fsr-build again")
        self._dummy = torch.empty(1, dtype=torch.uint8, device=self.device)  # address for empty tensors

    def deactivate_impl(self) -> None:
        self._graphs.clear()
        self.contexts.clear()
        self.engine = self.runtime = None

    def _context(self, index: int, stream):
        if index not in self.contexts:
            t = self.trt.module
            decode = self.profiles[index].name == "decode"
            if self.cuda_graphs and decode and self.trt.is_rtx and hasattr(t, "CudaGraphStrategy"):
                config = self.engine.create_runtime_config()
                config.cuda_graph_strategy = t.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                context = self.engine.create_execution_context(config)
            else:
                context = self.engine.create_execution_context()
            if context is None:
                raise BackendError(f"cannot create an execution context for {self.entry.file} "
                                   f"({'; '.join(self.logger.errors())}); out of GPU memory?")
            context.set_optimization_profile_async(index, stream)
            self.contexts[index] = context
        return self.contexts[index]

    # -- inference -----------------------------------------------------------------------

    def _to_device(self, name: str, value):
        dtype = self.dtypes[name]
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        if tensor.device.type != "cuda" or tensor.dtype != dtype:
            tensor = tensor.to(device=self.device, dtype=dtype, non_blocking=True)
        return tensor.contiguous()

    def _profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for i, profile in enumerate(self.profiles):
            if profile.contains(shapes):
                return i
        given = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        fits = "; ".join(p.describe() for p in self.profiles)
        raise BackendError(f"graph {self.name!r}: shapes {given} fit none of the engine's profiles ({fits}); "
                           "rebuild with larger fsr-build --max-batch / --max-seq")

    def _ptr(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr()

    def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
        stream = torch.cuda.current_stream(self.device)
        inputs = {n: self._to_device(n, v) for n, v in feed_dict.items()}
        shapes = {n: tuple(v.shape) for n, v in inputs.items()}
        index = self._profile_for(shapes)
        context = self._context(index, stream.cuda_stream)
        manual_graphs = self.cuda_graphs and not self.trt.is_rtx and self.profiles[index].name == "decode"
        key = (index, tuple(sorted(shapes.items())))
        if manual_graphs and key in self._graphs:
            return self._replay(key, inputs)
        outputs = self._bind(context, inputs, shapes)
        if not context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"TensorRT failed to run graph {self.name!r} ({'; '.join(self.logger.errors())})")
        if manual_graphs:
            self._capture(key, context, inputs, shapes)
        return outputs

    def _bind(self, context, inputs: dict, shapes: dict) -> dict:
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, shapes[name]):
                raise BackendError(f"graph {self.name!r}: TensorRT rejects shape {list(shapes[name])} for {name!r}")
            context.set_tensor_address(name, self._ptr(tensor))
        unset = context.infer_shapes()
        if unset:
            raise BackendError(f"graph {self.name!r}: TensorRT cannot infer the output shapes (unset: {unset})")
        outputs = {}
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, self._ptr(outputs[name]))
        return outputs

    def _capture(self, key, context, inputs: dict, shapes: dict) -> None:
        """Capture this decode step's enqueue into a CUDA graph over static buffers (full TensorRT)."""
        static_in = {n: t.clone() for n, t in inputs.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            static_out = self._bind(context, static_in, shapes)
            context.execute_async_v3(side.cuda_stream)  # TensorRT wants one run after shape changes
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                context.execute_async_v3(side.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graphs[key] = (graph, static_in, static_out)
        while len(self._graphs) > CUDA_GRAPH_CACHE:
            self._graphs.popitem(last=False)

    def _replay(self, key, inputs: dict) -> dict:
        graph, static_in, static_out = self._graphs[key]
        self._graphs.move_to_end(key)
        for name, tensor in inputs.items():
            static_in[name].copy_(tensor, non_blocking=True)
        graph.replay()
        return {n: t.clone() for n, t in static_out.items()}


class TensorRTBackend(Backend):
    """Runners over the export's TensorRT engines (``fsr-build``); needs an NVIDIA GPU."""

    name = "trt"

    loads_graph_files = False  # it loads engines; each engine's hash and its ONNX's are checked instead

    def __init__(self, export_dir: Path, manifest: Manifest, precision: str | None = None,
                 plugin: bool | None = None, cuda_graphs: bool = False, plugin_library: Path | None = None,
                 device: str = "cuda"):
        super().__init__(export_dir, manifest)
        require_gpu()
        self.precision, self.plugin, self.cuda_graphs = precision, plugin, cuda_graphs
        self.plugin_library, self.device = plugin_library, device
        if not manifest.engines:
            raise BackendError(f"{export_dir} has no TensorRT engines; build them first: fsr-build {export_dir}")
        flavours = {e.tensorrt["flavour"] for e in manifest.engines.values()}
        try:
            self.trt = import_tensorrt(flavours.pop() if len(flavours) == 1 else None)
        except TensorRTMissing as exc:
            raise BackendError(str(exc)) from exc

    def options(self) -> dict:
        return {"precision": self.precision, "plugin": self.plugin, "cuda_graphs": self.cuda_graphs,
                "device": self.device}

    def runner(self, graph: str) -> TensorRTRunner:
        entry_graph = self.manifest.graphs.get(graph)
        if entry_graph is None:
            raise BackendError(f"the export has no {graph!r} graph (it has {', '.join(self.manifest.graphs)})")
        # ``plugin`` concerns the graphs that have a plugin form (vision); the others have one engine kind
        plugin = self.plugin if graph in self.manifest.plugin_graphs else None
        try:
            entry = check_engine_fresh(self.manifest, self.export_dir, graph, self.precision, plugin)
        except ManifestError as exc:
            raise BackendError(str(exc)) from exc
        built = entry.tensorrt
        if (built["flavour"], built["version"]) != (self.trt.flavour, self.trt.version):
            raise BackendError(f"engine {entry.file} was built with {built['flavour']} {built['version']}, this "
                               f"machine has {self.trt.label}; run fsr-build again")
        return TensorRTRunner(graph, self.manifest.resolve(self.export_dir, entry.file), entry, self.trt,
                              inputs=entry_graph.input_names, outputs=entry_graph.output_names,
                              cuda_graphs=self.cuda_graphs and graph in self.manifest.segment_graphs,
                              plugin_library=self.plugin_library, device=self.device)

    def from_host(self, array: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def to_host(self, array) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            if array.dtype == torch.bfloat16:
                array = array.float()
            return array.detach().cpu().numpy()
        return np.asarray(array)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def require_gpu() -> None:
    """Raise `BackendError` unless PyTorch sees a CUDA GPU."""
    if not torch.cuda.is_available():
        raise BackendError(GPU_MESSAGE)
