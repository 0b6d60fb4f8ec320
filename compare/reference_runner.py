"""The PyTorch reference of each exported graph, as a Polygraphy runner.

``ReferenceRunner`` subclasses Polygraphy's ``BaseRunner``, so ``Comparator.run`` runs it
beside ``OnnxrtRunner`` / ``TrtRunner`` on the same feeds. What it computes per graph is
the module the family's spec traced for that graph (`ModelSpec.graph`, ``reference``
form), on the export's ``source/`` checkpoint in float32 whatever the export's dtype:
the vision graph with the method's readable reference in place of its op, the token
embedding, the CLIP text tower, each decoder segment over its layer range.

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
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from fsr.manifest import GraphEntry, Manifest
from fsr.models.spec import REFERENCE
from fsr.runtime.reference import ReferencePipeline


def manifest_input_metadata(entry: GraphEntry) -> TensorMetadata:
    """Polygraphy input metadata of a graph from its manifest entry (dynamic dims as None)."""
    meta = TensorMetadata()
    for i in entry.inputs:
        meta.add(i.name, dtype=np.dtype(i.dtype), shape=[d if isinstance(d, int) else None for d in i.shape])
    return meta


class ReferenceFromExport:
    """Lazy loader: ``ReferenceFromExport(export_dir)()`` -> the export's ``ReferencePipeline``."""

    def __init__(self, export_dir, manifest: Manifest | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self._pipe = None

    def __call__(self) -> ReferencePipeline:
        if self._pipe is None:
            self._pipe = ReferencePipeline.from_export(self.export_dir, manifest=self.manifest)
        return self._pipe


class ReferenceRunner(BaseRunner):
    """Runs the PyTorch reference of one exported graph (see the module docstring)."""

    def __init__(self, reference, manifest: Manifest, graph: str, name: str | None = None):
        """
        Args:
            reference: a ``ReferencePipeline`` or a loader returning one (``ReferenceFromExport``).
            manifest: the export's manifest (graph inputs/outputs, method and settings).
            graph: the graph name (``vision``, ``embed``, ``decoder``, ``text_encoder``, ...).
        """
        super().__init__(name=name or f"torch-{graph}", prefix="reference-runner")
        entry = manifest.graph(graph)
        self._reference, self.manifest, self.graph = reference, manifest, graph
        self._input_metadata = manifest_input_metadata(entry)
        self._outputs = [(o.name, np.dtype(o.dtype)) for o in entry.outputs]

    def activate_impl(self):
        pipe = self._reference() if callable(self._reference) else self._reference
        spec = pipe.spec.graph(pipe.loaded, self.manifest, self.graph, form=REFERENCE)
        self._module, self._names = spec.module.eval(), spec.input_names

    def get_input_metadata_impl(self):
        return self._input_metadata

    def infer_impl(self, feed_dict):
        def to_torch(array):
            t = torch.from_numpy(np.ascontiguousarray(array))
            return t.float() if t.is_floating_point() else t

        start = time.perf_counter()
        with torch.no_grad():
            outs = self._module(*(to_torch(feed_dict[n]) for n in self._names))
        outs = outs if isinstance(outs, tuple) else (outs,)
        self.inference_time = time.perf_counter() - start
        if len(outs) != len(self._outputs):
            raise RuntimeError(f"reference of {self.graph!r} returned {len(outs)} outputs, the graph has "
                               f"{len(self._outputs)}")
        return OrderedDict((name, out.detach().cpu().numpy().astype(dtype))
                           for (name, dtype), out in zip(self._outputs, outs))

    def deactivate_impl(self):
        del self._module, self._names
