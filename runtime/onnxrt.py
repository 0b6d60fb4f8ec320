"""ONNX Runtime backend: the portable one (CPU here; CUDA where onnxruntime-gpu is installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fsr.manifest import Manifest
from fsr.onnx_io import SHARED_WEIGHTS_INDEX
from fsr.runtime.backend import Backend, BackendError, Runner


class SharedWeights:
    """The tensors several graphs of an export share (``fsr.export.share``), loaded once.

    The shared file is memory-mapped and each tensor becomes one ``OrtValue`` over its bytes;
    every session that holds the tensor gets that value (``SessionOptions.add_initializer``)
    instead of a copy of its own. Such sessions run with MatMul prepacking off
    (``session.disable_prepacking``): prepacking would make a packed copy per session.
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

    def add_to(self, options, graph: str) -> bool:
        names = self.names(graph)
        for name in names:
            options.add_initializer(name, self.value(name))
        if names:
            options.add_session_config_entry("session.disable_prepacking", "1")
        return bool(names)


class OnnxRuntimeRunner(Runner):
    def __init__(self, name: str, path: Path, providers: list[str] | None = None, threads: int | None = None,
                 shared: SharedWeights | None = None):
        super().__init__(name, path)
        self.providers, self.threads, self.shared = providers, threads, shared
        self.session = None

    def activate_impl(self) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if self.shared is not None:
            self.shared.add_to(opts, self.name)
        providers = self.providers or ort.get_available_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load graph {self.name!r} ({self.path}): {exc}") from exc
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
        out = self.session.run(self._outputs, {k: np.ascontiguousarray(v) for k, v in feed_dict.items()})
        return dict(zip(self._outputs, out))


class OnnxRuntimeBackend(Backend):
    name = "ort"

    def __init__(self, export_dir: Path, manifest: Manifest, providers: list[str] | None = None,
                 threads: int | None = None, share_weights: bool = True):
        super().__init__(export_dir, manifest)
        self.providers, self.threads = providers, threads
        self.share_weights = share_weights
        self._shared: SharedWeights | None = None

    def shared_weights(self, graph: str) -> SharedWeights | None:
        """The export's shared tensors when ``graph`` holds some (its files list their index)."""
        index = next((f.path for f in self.manifest.graph(graph).files[1:] if f.path.endswith(SHARED_WEIGHTS_INDEX)), None)
        if index is None or not self.share_weights:
            return None
        if self._shared is None:
            self._shared = SharedWeights(self.export_dir, self.manifest.resolve(self.export_dir, index))
        return self._shared

    def runner(self, graph: str) -> OnnxRuntimeRunner:
        if graph not in self.manifest.graphs:
            raise BackendError(f"the export has no {graph!r} graph (it has {', '.join(self.manifest.graphs)})")
        path = self.manifest.resolve(self.export_dir, self.manifest.graphs[graph].file)
        return OnnxRuntimeRunner(graph, path, self.providers, self.threads, self.shared_weights(graph))
