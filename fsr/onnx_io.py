"""ONNX I/O shared by every layer that writes graphs (export, graph passes, pruning, engines).

Pitfalls handled here, once:
- models are written with IR version `IR_VERSION` (onnxruntime 1.31 rejects newer ones;
  ``gs.export_onnx`` would write IR 14);
- graphs larger than 2 GB are written with external data (one ``.data`` file per graph);
- the torch.onnx exporter's banners and warnings are kept off the user's terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx

OPSET = 18
IR_VERSION = 10
TWO_GB = 2**31 - 1
#: weights several graphs of an export hold, written once (``fsr.export.share``), and their index
SHARED_WEIGHTS_DATA, SHARED_WEIGHTS_INDEX = "shared_weights.data", "shared_weights.json"


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


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name the subgraphs of ``node`` (If / Loop / Scan bodies, at any depth) read: from
    the outer scope, or may."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(inner.input)
                names |= subgraph_reads(inner)
    return names
