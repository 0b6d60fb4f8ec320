"""The PyTorch reference of each exported graph, as a Polygraphy runner.

``TorchRunner`` subclasses Polygraphy's ``BaseRunner``, so ``Comparator.run`` runs it
beside ``OnnxrtRunner`` / ``TrtRunner`` on the same feeds. What it computes per graph
(modules of the export's ``source/`` checkpoint, in float32 whatever the export's dtype):

- ``vision``: ``VisionPrefix`` then ``focus_scan_refine_reference`` with the manifest's
  budget / alpha / beta / rho / kappa and relevance setting (method ``none``: the tokens);
- ``embed``: ``TokenEmbedding``;
- ``text_encoder``: ``ClipTextEncoder``;
- a decoder segment: ``DecoderStep`` over the segment's layer range.

Feeds in the export's dtype (fp16 for an fp16 export) are upcast on the way in, and the
outputs are cast to the graph's output dtypes on the way out, so both runners' results
have the same dtypes and shapes.

``ReferenceFromExport`` is the lazy loader (Polygraphy style: the constructor stores the
path, calling it loads the model once and caches it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata



def manifest_input_metadata(entry: dict) -> TensorMetadata:
    """Polygraphy input metadata of a graph from its manifest entry (dynamic dims as None)."""
    meta = TensorMetadata()
    for i in entry["inputs"]:
        meta.add(i["name"], dtype=np.dtype(i["dtype"]), shape=[d if isinstance(d, int) else None for d in i["shape"]])
    return meta

class ReferenceFromExport:
    """Lazy loader: ``ReferenceFromExport(export_dir)()`` -> the export's ``ReferencePipeline``."""

    def __init__(self, export_dir):
        self.export_dir = Path(export_dir)
        self._pipe = None

    def __call__(self):
        if self._pipe is None:
            from fsr.runtime.reference import ReferencePipeline

            self._pipe = ReferencePipeline.from_export(self.export_dir)
        return self._pipe


def _graph_function(pipe, manifest: dict, graph: str):
    """feed dict of torch tensors -> tuple of torch outputs, for one exported graph."""
    import torch

    from fsr.models.llava import DecoderStep
    from fsr.pruning import focus_scan_refine_reference

    if graph == "vision":
        def vision(feeds):
            pixels = feeds["pixel_values"]
            text = feeds.get("instruction_embeds")
            if text is None:
                text = torch.zeros(pixels.shape[0], 1, dtype=pixels.dtype)
            tokens, features, saliency, relevance = pipe.vision_prefix(pixels, text)
            if manifest["method"] == "none":
                return (tokens,)
            fsr = manifest.get("fsr") or {}
            return focus_scan_refine_reference(
                tokens, features, saliency, relevance if pipe.relevance else None, budget=manifest["budget"],
                **{k: fsr[k] for k in ("alpha", "beta", "rho", "kappa") if k in fsr})
        return vision
    if graph == "embed":
        return lambda feeds: (pipe.embedding(feeds["input_ids"]),)
    if graph == "text_encoder":
        if pipe.text_encoder is None:
            raise ValueError("the export has a text_encoder graph but the reference has no CLIP text tower")
        return lambda feeds: (pipe.text_encoder(feeds["input_ids"], feeds["attention_mask"]),)
    for segment in manifest["decoder_segments"]:
        if segment["graph"] == graph:
            step = DecoderStep(pipe.llava, *segment["layers"]).eval()
            names = [i["name"] for i in manifest["graphs"][graph]["inputs"]]
            return lambda feeds: step(*(feeds[n] for n in names))
    raise ValueError(f"no PyTorch reference for graph {graph!r}")


class TorchRunner(BaseRunner):
    """Runs the PyTorch reference of one exported graph (see the module docstring)."""

    def __init__(self, reference, manifest: dict, graph: str, name: str | None = None):
        """
        Args:
            reference: a ``ReferencePipeline`` or a loader returning one (``ReferenceFromExport``).
            manifest: the export's manifest (graph inputs/outputs, method and FSR settings).
            graph: the graph name (``vision``, ``embed``, ``decoder``, ``text_encoder``, ...).
        """
        super().__init__(name=name or f"torch-{graph}", prefix="torch-runner")
        if graph not in manifest["graphs"]:
            raise ValueError(f"the export has no {graph!r} graph (it has {', '.join(manifest['graphs'])})")
        self._reference, self.manifest, self.graph = reference, manifest, graph
        entry = manifest["graphs"][graph]
        self._input_metadata = manifest_input_metadata(entry)
        self._outputs = [(o["name"], np.dtype(o["dtype"])) for o in entry["outputs"]]

    def activate_impl(self):
        pipe = self._reference() if callable(self._reference) else self._reference
        self._fn = _graph_function(pipe, self.manifest, self.graph)

    def get_input_metadata_impl(self):
        return self._input_metadata

    def infer_impl(self, feed_dict):
        import torch

        def to_torch(array):
            t = torch.from_numpy(np.ascontiguousarray(array))
            return t.float() if t.is_floating_point() else t

        start = time.perf_counter()
        with torch.no_grad():
            outs = self._fn({name: to_torch(value) for name, value in feed_dict.items()})
        self.inference_time = time.perf_counter() - start
        if len(outs) != len(self._outputs):
            raise RuntimeError(f"reference of {self.graph!r} returned {len(outs)} outputs, the graph has "
                               f"{len(self._outputs)}")
        return OrderedDict((name, out.detach().cpu().numpy().astype(dtype))
                           for (name, dtype), out in zip(self._outputs, outs))

    def deactivate_impl(self):
        del self._fn
