"""Tracing PyTorch modules to ONNX with torch.onnx's dynamo exporter.

Pitfalls handled here, once:
- example inputs use batch 2 (a batch-1 example silently fixes the batch to 1);
- the exporter's IR version is lowered to one onnxruntime 1.31 accepts;
- graphs larger than 2 GB are written with external data (one ``.data`` file per graph).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fsr.errors import FsrError
from fsr.onnx_io import IR_VERSION, OPSET, TWO_GB, quiet_exporter, save_onnx  # noqa: F401 (re-exported)


class ExportError(FsrError, RuntimeError):
    """Tracing a graph failed; the message names the graph."""


def trace_to_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes,
    custom_translation_table: dict | None = None,
) -> list[Path]:
    """Trace ``module`` into ``path`` (IR ``IR_VERSION``); returns the files written.

    A graph whose weights pass 2 GB is written with external data in one
    ``<name>.onnx.data`` file beside it. ``custom_translation_table`` maps custom torch ops to
    their ONNX translations (``torch.onnx.export``'s argument).
    """
    name = path.stem
    module.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    external = weight_bytes >= TWO_GB
    try:
        with torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
                input_names=input_names, output_names=output_names, verbose=False,
                optimize=True, report=False, custom_translation_table=custom_translation_table,
            )
    except Exception as exc:  # the exporter raises many types; name the graph
        raise ExportError(f"tracing the {name!r} graph to ONNX failed: {exc}") from exc
    program.model.ir_version = IR_VERSION
    program.model.graph.name = name
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external)
    data = path.with_name(path.name + ".data")
    return [path, data] if external and data.exists() else [path]
