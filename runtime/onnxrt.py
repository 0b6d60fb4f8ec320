"""ONNX Runtime backend: the portable one (CPU here; CUDA where onnxruntime-gpu is installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fsr.manifest import Manifest
from fsr.runtime.backend import Backend, BackendError, Runner


_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxRuntimeRunner(Runner):
    def __init__(self, name: str, path: Path, providers: list[str] | None = None, threads: int | None = None):
        super().__init__(name, path)
        self.providers, self.threads = providers, threads
        self.session = None

    def activate_impl(self) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        providers = self.providers or ort.get_available_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load graph {self.name!r} ({self.path}): {exc}") from exc
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]
        # float inputs in the graph's own float type (an fp16 graph may take float32 pixels: Transformers.js layout)
        self._floats = {i.name: _FLOAT_TYPES[i.type] for i in self.session.get_inputs() if i.type in _FLOAT_TYPES}

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
        feeds = {}
        for k, v in feed_dict.items():
            v = np.asarray(v)
            if k in self._floats and v.dtype.kind == "f":
                v = v.astype(self._floats[k], copy=False)
            feeds[k] = np.ascontiguousarray(v)
        out = self.session.run(self._outputs, feeds)
        return dict(zip(self._outputs, out))


class OnnxRuntimeBackend(Backend):
    name = "ort"

    def __init__(self, export_dir: Path, manifest: Manifest, providers: list[str] | None = None,
                 threads: int | None = None):
        super().__init__(export_dir, manifest)
        self.providers, self.threads = providers, threads

    def runner(self, graph: str) -> OnnxRuntimeRunner:
        if graph not in self.manifest.graphs:
            raise BackendError(f"the export has no {graph!r} graph (it has {', '.join(self.manifest.graphs)})")
        path = self.manifest.resolve(self.export_dir, self.manifest.graphs[graph].file)
        return OnnxRuntimeRunner(graph, path, self.providers, self.threads)
