"""Tracing PyTorch modules to ONNX with torch.onnx's dynamo exporter.

Pitfalls handled here, once:
- example inputs use batch 2 (a batch-1 example silently fixes the batch to 1);
- the exporter's IR version is lowered to one onnxruntime 1.31 accepts;
- graphs larger than 2 GB are written with external data (one ``.data`` file per graph);
- memory: the model is traced in the dtype it is in, and the exporter's optimizer is run
  without folding ``Transpose`` nodes of large weights: folding them makes a transposed copy
  of every weight matrix while the module still holds the originals (twice the weights in
  memory: a 7B fp16 decoder would need 26 GB). The graphs keep the weights in the module's
  layout, under the module's parameter names, with the ``Transpose`` in the graph; ONNX
  Runtime and TensorRT fold it when they load the graph;
- inputs with a default value (``optional``) are traced as keyword arguments and written as
  graph inputs that have an initializer (overridable in ONNX Runtime, constant in TensorRT);
- several forms of one graph (``save_forms``) share one external-data file: each weight is
  written once and every form's graph refers to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fsr.errors import FsrError
from fsr.onnx_io import IR_VERSION, OPSET, TWO_GB, quiet_exporter, save_onnx  # noqa: F401 (re-exported)

#: weights at least this large keep their layout (their Transpose is not folded at export)
LARGE_WEIGHT_BYTES = 1 << 20
#: offsets of tensors in external-data files are aligned to this (memory-mappable pages)
EXTERNAL_ALIGNMENT = 1 << 16


class ExportError(FsrError, RuntimeError):
    """Tracing a graph failed; the message names the graph."""


def _keeps_weight_layout(node) -> bool | None:
    """onnxscript ``should_fold``: never fold a Transpose of a module's weight or of any large initializer
    (see the module docstring)."""
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    value = node.inputs[0] if node.inputs else None
    tensor = value.const_value if value is not None else None
    if tensor is not None and (isinstance(getattr(tensor, "raw", None), torch.Tensor)
                               or tensor.nbytes >= LARGE_WEIGHT_BYTES):
        return False
    return None


def optimize(model) -> None:
    """The exporter's optimizer (constant folding, fusions, cleanup) without large-weight copies."""
    import onnxscript.optimizer  # noqa: PLC0415
    import onnxscript.rewriter.onnx_fusions  # noqa: PLC0415

    onnxscript.optimizer.optimize_ir(model, should_fold=_keeps_weight_layout)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def trace(module: torch.nn.Module, args: tuple, *, name: str, input_names: list[str], output_names: list[str],
          dynamic_shapes, kwargs: dict | None = None, optional: dict[str, np.ndarray] | None = None,
          translations: dict | None = None):
    """Trace ``module`` into an ``onnx_ir.Model`` (IR ``IR_VERSION``, optimized). ``optional``: inputs
    traced from ``kwargs`` that get their default value as an initializer."""
    import onnx_ir as ir  # noqa: PLC0415

    module.eval()
    kwargs = dict(kwargs or {})
    names = list(input_names) + [n for n in kwargs]
    try:
        with torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(
                module, args, kwargs=kwargs or None, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
                input_names=names, output_names=output_names, verbose=False, optimize=False, report=False,
                custom_translation_table=translations,
            )
            model = program.model
            optimize(model)
    except Exception as exc:  # the exporter raises many types; name the graph
        raise ExportError(f"tracing the {name!r} graph to ONNX failed: {exc}") from exc
    model.ir_version = IR_VERSION
    model.graph.name = name
    _pass_through(model.graph, output_names)
    inputs = {v.name: v for v in model.graph.inputs}
    for key, default in (optional or {}).items():
        if key not in inputs:
            raise ExportError(f"the {name!r} graph has no input {key!r} to give a default value")
        value = inputs[key]
        value.const_value = ir.Tensor(np.ascontiguousarray(default), name=key)
        model.graph.register_initializer(value)
    return model


def _pass_through(graph, output_names: list[str]) -> None:
    """An output asked to bear an input's name (a graph that hands its inputs on, e.g. the one a
    pruning op is spliced into) is that input itself: the exporter names it ``<name>_1`` behind an
    Identity, which is dropped here so that the output is the input, under the name asked for."""
    inputs = {v.name: v for v in graph.inputs}
    for i, (value, wanted) in enumerate(zip(list(graph.outputs), output_names)):
        producer = value.producer()
        if (value.name != wanted and wanted in inputs and producer is not None and producer.op_type == "Identity"
                and producer.inputs[0] is inputs[wanted]):
            graph.outputs[i] = inputs[wanted]
            if not value.uses():
                graph.remove(producer, safe=True)


def weight_bytes(module: torch.nn.Module) -> int:
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def trace_to_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes,
    kwargs: dict | None = None,
    optional: dict[str, np.ndarray] | None = None,
    translations: dict | None = None,
) -> list[Path]:
    """Trace ``module`` into ``path`` (IR ``IR_VERSION``); returns the files written.

    A graph whose weights pass 2 GB is written with external data in one
    ``<name>.onnx.data`` file beside it. ``translations`` maps custom torch ops to
    their ONNX translations (``torch.onnx.export``'s argument).
    """
    model = trace(module, args, name=path.stem, input_names=input_names, output_names=output_names,
                  dynamic_shapes=dynamic_shapes, kwargs=kwargs, optional=optional, translations=translations)
    external = weight_bytes(module) >= TWO_GB
    return save_forms(path, model, {}, external=external)[0]


def data_path(path: Path) -> Path:
    """The external-data file of graph ``path`` (shared by its forms)."""
    return path.with_name(path.name + ".data")


def save_forms(path: Path, model, forms: dict[str, tuple[Path, Any]], *, external: bool = True
               ) -> tuple[list[Path], dict[str, list[Path]]]:
    """Write ``model`` to ``path`` and each form ``{key: (form_path, form_model)}`` beside it.

    With ``external`` (always when there are forms), ``model``'s weights go to one
    ``<name>.onnx.data`` file, and every initializer of a form that is the same weight (same
    dtype, shape and data: the same module tensor) refers to it there instead of being written
    again. Returns
    the files of the model and of each form (a form's list ends with the shared data file).
    """
    import onnx_ir as ir  # noqa: PLC0415
    import onnx_ir.external_data as ext  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    if not external and not forms:
        ir.save(model, path)
        return [path], {}
    data = data_path(path)
    sources = {name: _identity(v.const_value) for name, v in model.graph.initializers.items()
               if v.const_value is not None}
    ext.unload_from_model(model, path.parent, data.name, size_threshold_bytes=1024, alignment=EXTERNAL_ALIGNMENT)
    ir.save(model, path)
    written = {sources[name]: v.const_value for name, v in model.graph.initializers.items()
               if isinstance(v.const_value, ir.ExternalTensor)}
    form_files: dict[str, list[Path]] = {}
    for key, (form_path, form_model) in forms.items():
        shared = 0
        for value in form_model.graph.initializers.values():
            same = written.get(_identity(value.const_value)) if value.const_value is not None else None
            if same is not None:
                value.const_value = same
                shared += 1
        if written and not shared:
            raise ExportError(f"the {key!r} form of {path.name} shares no weight with it; the forms must be traced "
                              "from the same module")
        ir.save(form_model, form_path)
        form_files[key] = [form_path, data]
    return [path, data], form_files


def _identity(tensor) -> tuple:
    """What makes two initializers the same weight: dtype, shape and the data (the torch storage a traced
    parameter points to, else the bytes of a small tensor)."""
    raw = getattr(tensor, "raw", None)
    key = (str(tensor.dtype), tuple(tensor.shape))
    if isinstance(raw, torch.Tensor):
        return (*key, "torch", raw.data_ptr(), tuple(raw.stride()))
    if tensor.nbytes <= LARGE_WEIGHT_BYTES:
        return (*key, "bytes", tensor.tobytes())
    return (*key, "object", id(tensor))
