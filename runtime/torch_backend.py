"""PyTorch backend: an export's graphs run as the PyTorch modules they were traced from.

Each graph comes from the family's spec (`ModelSpec.graph(loaded, manifest, name, form)`),
exactly as ``fsr-export`` traced it, with the pruning method's PyTorch form in the vision
graph: its fixed-shape module (``method_form="torch"``, the default) or its readable
reference (``"reference"``). Two more graphs exist only here, for benchmarks:
``vision_tower`` (the tower up to the outputs the method reads) and ``pruning_op`` (the
method's op alone). Runners take and return the graphs' input and output names, so
``Pipeline``'s steps run unchanged; arrays stay ``torch`` tensors on the backend's device
(CPU or CUDA) between steps, as a device backend's should.

Two ways in::

    TorchBackend(export_dir, manifest, device="cuda")          # the export's source/ checkpoint
    TorchBackend.from_model(loaded, describe(loaded, settings), device="cuda")   # a model in memory

The second needs no export folder: the ``llava-1.5-7b`` preset can be built straight on
the GPU in fp16 and benchmarked without 14 GB of ONNX on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fsr.manifest import Manifest
from fsr.models import get_spec
from fsr.models.spec import REFERENCE, TORCH, TORCH_DTYPES, LoadedModel
from fsr.pruning.methods import get_method
from fsr.pruning.modules import ReferenceModule
from fsr.runtime.backend import Backend, BackendError, Runner

METHOD_FORMS = (TORCH, REFERENCE)
#: the names ``fsr-bench --fsr-impl`` takes for the two forms
METHOD_FORM_NAMES = {"fixed": TORCH, "reference": REFERENCE}


class ModuleRunner(Runner):
    """Runs one PyTorch module under ``torch.inference_mode``; inputs by name, outputs by name."""

    def __init__(self, name: str, module: nn.Module, input_names: list[str], output_names: list[str],
                 optional_names: list[str] | None = None):
        super().__init__(name, Path(f"<torch:{name}>"), input_names, output_names)
        self.module = module
        self._optional = list(optional_names or [])

    @property
    def optional_input_names(self) -> list[str]:
        return self._optional

    def activate_impl(self) -> None:
        self.module.eval()

    def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
        kwargs = {n: feed_dict[n] for n in self._optional if n in feed_dict}
        with torch.inference_mode():
            out = self.module(*(feed_dict[n] for n in self._inputs), **kwargs)
        if isinstance(out, torch.Tensor):
            out = (out,)
        if len(out) != len(self._outputs):
            raise BackendError(f"module {self.name!r} returned {len(out)} outputs, expected {self._outputs}")
        return dict(zip(self._outputs, out))


class TorchBackend(Backend):
    """Runners over the PyTorch modules of an export (or of a model in memory)."""

    name = "torch"
    loads_graph_files = False
    loads_weights = True

    def __init__(self, export_dir: Path | None, manifest: Manifest, device: str | None = None,
                 method_form: str = TORCH, loaded: LoadedModel | None = None):
        super().__init__(export_dir, manifest)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("the torch backend was asked for CUDA but torch sees no GPU here; use --device cpu")
        method_form = METHOD_FORM_NAMES.get(method_form, method_form)
        if method_form not in METHOD_FORMS:
            raise BackendError(f"unknown method form {method_form!r}; choose one of {', '.join(METHOD_FORM_NAMES)}")
        self.method_form = method_form
        self.dtype = TORCH_DTYPES[manifest.dtype]
        self.spec = get_spec(manifest.family)
        if loaded is None:
            if export_dir is None:
                raise BackendError("TorchBackend needs an export folder or a loaded model")
            source = manifest.resolve(export_dir, manifest.source.folder)
            loaded = self.spec.load(str(source), dtype=self.dtype)
        model = loaded.model.to(device=self.device, dtype=self.dtype).eval()
        clip = None
        if loaded.clip is not None:
            clip = loaded.clip.to(device=self.device, dtype=self.dtype).eval()
        elif manifest.relevance.source == "clip":
            raise BackendError("this export's relevance comes from CLIP, but the model has no CLIP text tower")
        self.loaded = LoadedModel(loaded.family, model, loaded.processor, clip, loaded.source, loaded.path,
                                  loaded.preset, loaded.clip_tokenizer)
        self.method = get_method(manifest.method.name)
        self.settings = self.method.settings_from_json(manifest.method.settings)

    def options(self) -> dict:
        return {"device": str(self.device), "method_form": self.method_form, "dtype": str(self.dtype)}

    @classmethod
    def from_model(cls, loaded: LoadedModel, manifest: Manifest, device: str | None = None,
                   **options) -> "TorchBackend":
        """A backend over a model already in memory (``manifest`` from `fsr.export.describe`)."""
        return cls(None, manifest, device=device, loaded=loaded, **options)

    # -- graphs ---------------------------------------------------------------------------

    @property
    def relevance(self) -> bool:
        return self.manifest.relevance.source is not None

    def runner(self, graph: str) -> ModuleRunner:
        inputs = self.method.inputs(self.settings, self.relevance)
        if graph == "vision_tower":
            tower = self.spec.vision_tower(self.loaded, inputs, self.manifest.relevance.source)
            return ModuleRunner(graph, tower, tower.input_names, list(tower.outputs))
        if graph == "pruning_op":
            if not self.method.prunes:
                raise BackendError(f"method {self.method.name!r} has no op")
            op = (self.method.torch_module(self.settings, relevance=self.relevance) if self.method_form == TORCH
                  else ReferenceModule(self.method.reference(self.settings), inputs))
            return ModuleRunner(graph, op, list(inputs), list(self.method.outputs(self.settings)))
        spec = self.spec.graph(self.loaded, self.manifest, graph, form=self.method_form)
        return ModuleRunner(graph, spec.module, spec.input_names, spec.output_names, list(spec.optional_inputs))

    # -- arrays ---------------------------------------------------------------------------

    def from_host(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_host(self, array: Any) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            array = array.detach()
            if array.dtype == torch.bfloat16:
                array = array.float()
            return array.cpu().numpy()
        return np.asarray(array)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
