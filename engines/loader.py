"""Lazy loaders in Polygraphy's style: the constructor stores settings, calling does the work.

    build = EngineBytesFromOnnx("export/decoder.onnx", profiles, "fp16")
    engine_bytes = build()            # parses, builds; build.stats says how

`EngineBytesFromOnnx` converts an fp32 graph to fp16/bf16 first when asked
(`fsr.engines.precision`), builds a strongly typed network with either TensorRT
flavour, one optimization profile per `Profile`, an optional timing cache, and the
FSR plugin library loaded when the graph holds the plugin node.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from fsr.engines.plugin_graph import load_plugin_library
from fsr.engines.precision import convert_onnx_file
from fsr.engines.profiles import Profile
from fsr.engines.records import write_atomic
from fsr.engines.trt_import import TensorRT, import_tensorrt, make_logger
from fsr.errors import FsrError
from fsr.files import partial_prefix


class EngineBuildError(FsrError, RuntimeError):
    """TensorRT could not parse or build a graph; the message names the graph and the cause."""


@dataclasses.dataclass
class BuildStats:
    parse_seconds: float = 0.0
    build_seconds: float = 0.0
    low_precision_nodes: int = 0
    converted: bool = False
    timing_cache_bytes: int | None = None


FLOAT_TYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}


def graph_float_type(path: Path) -> str | None:
    """``fp32``/``fp16``/``bf16``: the type most of the graph's float weights (initializer elements)
    carry, else the type of its first float input; None if it has neither. (The weights decide: an
    fp16 vision graph of the Transformers.js layout takes float32 pixels and casts them inside.)"""
    model = onnx.load(path, load_external_data=False)
    weights: dict[int, int] = {}
    for t in model.graph.initializer:
        if t.data_type in FLOAT_TYPES:
            weights[t.data_type] = weights.get(t.data_type, 0) + int(np.prod(t.dims, dtype=np.int64))
    if weights:
        return FLOAT_TYPES[max(weights, key=weights.get)]
    types = [v.type.tensor_type.elem_type for v in model.graph.input]
    return next((FLOAT_TYPES[t] for t in types if t in FLOAT_TYPES), None)


class _ProgressMonitor:
    """Adapts TensorRT's IProgressMonitor to a ``callback(text)``."""

    @staticmethod
    def make(trt: TensorRT, callback: Callable[[str], None]):
        base = getattr(trt.module, "IProgressMonitor", None)
        if base is None:
            return None

        class Monitor(base):
            def __init__(self):
                base.__init__(self)
                self.phases: dict[str, tuple[str, int]] = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                self.phases[phase_name] = (phase_name, num_steps)
                callback(f"{phase_name} (0/{num_steps})")

            def step_complete(self, phase_name, step):
                _, total = self.phases.get(phase_name, (phase_name, 0))
                callback(f"{phase_name} ({step + 1}/{total})")
                return True  # False would cancel the build

            def phase_finish(self, phase_name):
                self.phases.pop(phase_name, None)

        return Monitor()


class EngineBytesFromOnnx:
    """Build a serialized engine from an ONNX file (lazily).

    ``precision``: fp32 | fp16 | bf16. An fp32 graph is rewritten for fp16/bf16; a graph
    already in the requested type is built as it is; anything else is refused (a
    strongly typed engine cannot compute in fewer bits than it is given, nor in more
    than the graph's weights carry).
    """

    def __init__(self, path: Path, profiles: list[Profile], precision: str = "fp32", *,
                 trt: TensorRT | None = None, timing_cache: Path | None = None,
                 plugin_libraries: tuple[Path, ...] = (), progress: Callable[[str], None] | None = None,
                 work_dir: Path | None = None, verbose: bool = False):
        self.path, self.profiles, self.precision = Path(path), profiles, precision
        self.trt, self.timing_cache, self.plugin_libraries = trt, timing_cache, tuple(plugin_libraries)
        self.progress, self.work_dir, self.verbose = progress or (lambda text: None), work_dir, verbose
        self.stats = BuildStats()

    def __call__(self) -> bytes:
        trt = self.trt or import_tensorrt()
        graph_type = graph_float_type(self.path)
        if graph_type not in (None, "fp32", self.precision):
            raise EngineBuildError(
                f"{self.path.name} computes in {graph_type}; a strongly typed {self.precision} engine cannot be made "
                f"from it. Build with --precision {graph_type}, or export in fp32 (fsr-export --dtype fp32)")
        if graph_type in (None, self.precision) or self.precision == "fp32":
            return self._build(trt, self.path)
        with tempfile.TemporaryDirectory(prefix=partial_prefix("convert"), dir=self.work_dir) as tmp:
            converted = Path(tmp) / f"{self.path.stem}.{self.precision}.onnx"
            self.progress(f"rewriting the graph for {self.precision}")
            self.stats.low_precision_nodes = convert_onnx_file(self.path, converted, self.precision)
            self.stats.converted = True
            return self._build(trt, converted)

    def _build(self, trt: TensorRT, path: Path) -> bytes:
        for library in self.plugin_libraries:
            load_plugin_library(trt, library)
        t = trt.module
        logger = make_logger(trt, self.verbose)
        builder = t.Builder(logger)
        flags = 1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = t.OnnxParser(network, logger)
        self.progress("parsing the ONNX graph")
        start = time.perf_counter()
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"{trt.label} cannot parse {self.path.name}: {errors or logger.errors()}")
        self.stats.parse_seconds = time.perf_counter() - start

        config = builder.create_builder_config()
        if hasattr(t.BuilderFlag, "TF32"):
            config.clear_flag(t.BuilderFlag.TF32)  # fp32 means fp32 (Polygraphy's default too)
        for profile in self.profiles:
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile.shapes.items():
                p.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(p)
        monitor = _ProgressMonitor.make(trt, self.progress)
        if monitor is not None:
            config.progress_monitor = monitor
        cache = None
        if self.timing_cache is not None and trt.has_timing_cache:
            data = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
            cache = config.create_timing_cache(data)
            config.set_timing_cache(cache, ignore_mismatch=False)

        self.progress("building the engine")
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        self.stats.build_seconds = time.perf_counter() - start
        if serialized is None:
            errors = "; ".join(logger.errors()[-5:]) or "no error logged"
            raise EngineBuildError(f"{trt.label} failed to build an engine from {self.path.name}: {errors} "
                                   "(fsr-build --verbose prints TensorRT's whole log)")
        if cache is not None:
            data = bytes(memoryview(config.get_timing_cache().serialize()))
            write_atomic(self.timing_cache, data)
            self.stats.timing_cache_bytes = len(data)
        return bytes(memoryview(serialized))
