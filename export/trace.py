"""Tracing PyTorch modules to ONNX with torch.onnx's dynamo exporter.

Pitfalls handled here, once:
- example inputs use batch 2 (a batch-1 example silently fixes the batch to 1);
- the exporter's IR version is lowered to one onnxruntime 1.31 accepts;
- graphs larger than 2 GB are written with external data (one ``.data`` file per graph).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

OPSET = 18
IR_VERSION = 10
TWO_GB = 2**31 - 1


class ExportError(RuntimeError):
    """Tracing a graph failed; the message names the graph."""


@contextlib.contextmanager
def quiet_exporter():
    """The exporter prints banners and warnings per step; keep the user's terminal clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def trace_to_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes,
) -> list[Path]:
    """Trace ``module`` into ``path`` (IR ``IR_VERSION``); returns the files written.

    A graph whose weights pass 2 GB is written with external data in one
    ``<name>.onnx.data`` file beside it.
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
                optimize=True, report=False,
            )
    except Exception as exc:  # the exporter raises many types; name the graph
        raise ExportError(f"tracing the {name!r} graph to ONNX failed: {exc}") from exc
    program.model.ir_version = IR_VERSION
    program.model.graph.name = name
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external)
    data = path.with_name(path.name + ".data")
    return [path, data] if external and data.exists() else [path]


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save ``model``; graphs over 2 GB get external data beside them. Returns files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = IR_VERSION
    if model.ByteSize() < TWO_GB:
        onnx.save_model(model, path)
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]
