"""The backend interface the pipeline runs on, and the registry of backends.

Modelled on Polygraphy's runners: a ``Runner`` is cheap to construct, makes its
resources in ``activate``, runs ``infer(feed_dict) -> dict`` (timing itself), and
frees them in ``deactivate``. A ``Backend`` makes one runner per exported graph
and moves arrays between host and its device. Arrays a runner returns are the
backend's own (NumPy for ONNX Runtime, device tensors for TensorRT); the pipeline
passes the KV cache from one step to the next without looking at it, so a device
backend keeps it on the device.
"""

from __future__ import annotations

import abc
import importlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from fsr.errors import FsrError
from fsr.manifest import Manifest


class BackendError(FsrError, RuntimeError):
    """A backend cannot run here or cannot run this export; the message says why and what to do."""


class Runner(abc.ABC):
    def __init__(self, name: str, path: Path, input_names: list[str] | None = None,
                 output_names: list[str] | None = None):
        self.name, self.path = name, Path(path)
        self.is_active = False
        self.last_inference_time: float | None = None
        # Known up front (from the manifest) or set by ``activate_impl`` (from the loaded graph).
        self._inputs: list[str] = list(input_names or [])
        self._outputs: list[str] = list(output_names or [])

    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def infer(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
        if not self.is_active:
            raise BackendError(f"runner {self.name!r} is not active; call activate() first")
        missing = [n for n in self.input_names if n not in feed_dict]
        if missing:
            raise BackendError(f"graph {self.name!r} needs input(s) {missing}")
        feeds = {n: feed_dict[n] for n in self.input_names}
        feeds.update((n, feed_dict[n]) for n in self.optional_input_names if n in feed_dict)
        start = time.perf_counter()
        out = self.infer_impl(feeds)
        self.last_inference_time = time.perf_counter() - start
        return out

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    @property
    def optional_input_names(self) -> list[str]:
        """Inputs the graph has a default for (fed only to change it, e.g. ``logits_index``)."""
        return []

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, Any]: ...

    def deactivate_impl(self) -> None:
        pass


class Backend(abc.ABC):
    """Makes runners over an export's graphs and converts arrays to and from the host."""

    name: str = "?"
    #: what the back end reads from the export folder, so that exactly that is verified first:
    #: the ONNX graph files; the source model's weights (else only its processor files)
    loads_graph_files: bool = True
    loads_weights: bool = False

    def __init__(self, export_dir: Path | None, manifest: Manifest):
        self.export_dir, self.manifest = (Path(export_dir) if export_dir is not None else None), manifest

    @abc.abstractmethod
    def runner(self, graph: str) -> Runner: ...

    def options(self) -> dict:
        """The options this back end runs with, defaults resolved (what a benchmark records)."""
        return {}

    def to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def from_host(self, array: np.ndarray) -> Any:
        return array

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a host backend has none."""

    def empty_cache(self, graph: str, shape: tuple[int, int, int], dtype, count: int, capacity: int | None = None
                    ) -> list:
        """``count`` empty KV-cache tensors ``[B, kv_heads, 0, head_dim]`` for decoder graph ``graph``.
        ``capacity``: how many positions the generation will hold at most (a backend that keeps the
        cache in preallocated buffers sizes them from it; a hint, not a limit)."""
        batch, heads, head_dim = shape
        return [self.from_host(np.zeros((batch, heads, 0, head_dim), dtype)) for _ in range(count)]

    def embedding_table(self, graph: str) -> Any | None:
        """The token-embedding table of ``graph`` when the pipeline may look ids up in it directly
        (host array) instead of running the graph; None: run the graph."""
        return None


#: name -> "module:Class"; a back end's module is imported when it is asked for (each needs a heavy,
#: partly optional library: onnxruntime, tensorrt + a GPU, torch)
_BACKENDS: dict[str, str] = {
    "ort": "fsr.runtime.onnxrt:OnnxRuntimeBackend",
    "trt": "fsr.runtime.trt:TensorRTBackend",
    "torch": "fsr.runtime.torch_backend:TorchBackend",
}


def backend_names() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str, export_dir: Path | None, manifest: Manifest, **options) -> Backend:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    try:
        backend_cls = getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as exc:
        raise BackendError(f"backend {name!r} is not available in this installation ({exc})") from exc
    return backend_cls(export_dir, manifest, **options)
