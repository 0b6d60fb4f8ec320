"""TensorRT in the comparisons: the export's own engines (``fsr-build``), where they can run.

TensorRT comparisons need three things: engines in the export's manifest (``fsr-build``
writes them), a TensorRT Python module (``tensorrt`` or ``tensorrt_rtx``), and a CUDA GPU
(``fsr.runtime.trt`` runs engines through PyTorch's CUDA). ``unavailable_reason``
says in words what is missing; the comparisons are then recorded as skipped with that
reason instead of failing.

``EngineRunner`` wraps the runtime's own ``TensorRTRunner`` (the code ``Pipeline(...,
backend="trt")`` runs) in Polygraphy's ``BaseRunner``, so the Comparator checks exactly
what the pipeline executes. Note: written against the runtime's interface; this machine
has no GPU, so it has not run here.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner

from fsr.compare.reference_runner import manifest_input_metadata
from fsr.engines.plugin_graph import PluginError, find_plugin_library
from fsr.engines.records import check_engine_fresh
from fsr.engines.trt_import import TensorRTMissing, import_tensorrt
from fsr.manifest import EngineEntry, Manifest
from fsr.runtime.trt import TensorRTBackend


def unavailable_reason(manifest: Manifest | None = None) -> str | None:
    """None when the export's engines can be compared here, else every reason they cannot."""
    reasons = []
    if manifest is not None and not manifest.engines:
        reasons.append("the export has no TensorRT engines (build them with fsr-build)")
    try:
        import_tensorrt()
    except TensorRTMissing as exc:
        reasons.append(f"TensorRT is not importable ({exc})")
    if not torch.cuda.is_available():
        reasons.append("there is no CUDA GPU here (torch.cuda.is_available() is False); TensorRT engines run "
                       "only on a GPU")
    return "; ".join(reasons) or None


def engine_entry(export_dir, manifest: Manifest, graph: str) -> EngineEntry:
    """The engine the TensorRT pipeline would run for ``graph`` (fresh, or an error)."""
    return check_engine_fresh(manifest, export_dir, graph)


class EngineRunner(BaseRunner):
    """One of the export's TensorRT engines, run by ``fsr.runtime.trt``, as a Polygraphy runner."""

    def __init__(self, export_dir, manifest: Manifest, graph: str, name: str = "tensorrt"):
        super().__init__(name=name, prefix="fsr-trt-runner")
        self.export_dir, self.manifest, self.graph = export_dir, manifest, graph
        entry = manifest.graph(graph)
        self._input_metadata = manifest_input_metadata(entry)
        self._outputs = [(o.name, np.dtype(o.dtype)) for o in entry.outputs]

    def activate_impl(self):
        self._backend = TensorRTBackend(self.export_dir, self.manifest)
        self._runner = self._backend.runner(self.graph).activate()

    def get_input_metadata_impl(self):
        return self._input_metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        out = self._runner.infer({k: self._backend.from_host(np.asarray(v)) for k, v in feed_dict.items()})
        self._backend.synchronize()
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, self._backend.to_host(out[name]).astype(dtype)) for name, dtype in self._outputs)

    def deactivate_impl(self):
        self._runner.deactivate()
        del self._runner, self._backend


def engine_command_flags(export_dir, entry: EngineEntry) -> tuple[str, list[str], str]:
    """(environment prefix, ``polygraphy run`` flags, model path) to run the engine by hand."""
    flags = ["--model-type", "engine", "--trt"]
    if entry.plugin:
        try:
            flags += ["--plugins", str(find_plugin_library())]
        except PluginError:  # the command is still printed; polygraphy will say what is missing
            flags += ["--plugins", "libfsr_plugin.so"]
    env = "POLYGRAPHY_USE_TENSORRT_RTX=1" if entry.tensorrt.get("flavour") == "tensorrt_rtx" else ""
    return env, flags, str((Path(export_dir) / entry.file).resolve())
