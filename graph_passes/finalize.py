"""Last pass of every exported graph: cleanup, toposort, shape inference, full check."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from fsr.onnx_io import IR_VERSION
from fsr.pruning.onnx_function import restore_function_metadata


def finalize(graph: gs.Graph) -> onnx.ModelProto:
    """Return a checked ModelProto (IR version onnxruntime accepts; ``gs.export_onnx``
    would otherwise write IR 14)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = IR_VERSION
    restore_function_metadata(model)  # gs.export_onnx drops FunctionProto.metadata_props
    model = onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    return model
