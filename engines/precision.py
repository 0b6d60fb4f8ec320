"""Reduced precision for strongly typed engines: rewrite an fp32 graph to fp16 or bf16.

TensorRT-RTX networks are strongly typed (there is no ``BuilderFlag.FP16``): an engine
computes in the types its ONNX graph carries. ``fsr-build --precision fp16|bf16``
therefore rewrites the fp32 graph with the rule ``torch.autocast`` uses, and builds it
strongly typed with either TensorRT flavour:

- **matmul-class ops** (``MatMul, Gemm, Conv, ConvTranspose, Einsum``) run in the low
  type; their weights are stored in it (so the engine's weights halve);
- **fp32 ops** (reductions, normalisations, softmax, pow/exp/log/reciprocal, cumsum),
  custom-domain nodes (``fsr::FocusScanRefine``: its score math is fp32 by spec) and
  control flow run in fp32;
- **every other op** runs in the widest float type among its inputs, so explicit
  casts, masks and position math from the graph stay fp32;
- graph inputs and outputs keep their types, so an engine's bindings match the
  manifest whatever its precision (the KV cache crosses the boundary in fp32).

Casts are inserted only where a tensor crosses between the two types. The pass
touches only ``float32`` tensors: an fp16 export is left as it is.

`cast_to_precision(graph, "fp16") -> (graph, changed)`: ``changed`` counts the nodes
that now compute in the low type.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes  # an onnx dependency; NumPy has no bfloat16
import numpy as np
import onnx
import onnx_graphsurgeon as gs

LOW_TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
LOW_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
FP32_OPS = frozenset({
    "Pow", "Exp", "Log", "Reciprocal", "Softplus", "CumSum",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization",
    "InstanceNormalization", "BatchNormalization", "RMSNormalization",
})
# Inputs that ONNX requires to be float32 whatever the data type (never cast).
FLOAT32_ONLY_INPUTS = {"Resize": {2}, "Upsample": {1}}
TWO_GB = 2**31 - 1
FP16_MAX = float(np.finfo(np.float16).max)

_FP32, _LOW, _CONST, _OTHER = "fp32", "low", "const", "other"


def _is_fp32(tensor) -> bool:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return False
    if isinstance(dtype, int):  # an onnx.TensorProto.DataType (graphsurgeon keeps bf16 etc. that way)
        return dtype == onnx.TensorProto.FLOAT
    return np.dtype(dtype) == np.float32


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) for v in node.attrs.values())


def _const_value(tensor) -> np.ndarray | None:
    """The float32 values of an initializer or a Constant node's output, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values if _is_fp32(tensor) else None
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant) and np.asarray(value.values).dtype == np.float32:
            return value.values
    return None


_TYPE_STR = {onnx.TensorProto.FLOAT16: "tensor(float16)", onnx.TensorProto.BFLOAT16: "tensor(bfloat16)"}


def _schema_accepts(op: str, opset: int, low: int) -> bool:
    """Does the ONNX schema of ``op`` (at ``opset``) take the low type where it takes float?"""
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return False
    for constraint in schema.type_constraints:
        allowed = set(constraint.allowed_type_strs)
        if "tensor(float)" in allowed and "tensor(double)" in allowed and _TYPE_STR[low] not in allowed:
            return False
    return True


def _low_constant(name: str, values, precision: str) -> gs.Constant:
    values = np.asarray(values, dtype=np.float32)
    if precision == "fp16":
        return gs.Constant(name, np.asarray(np.clip(values, -FP16_MAX, FP16_MAX), dtype=np.float16))
    proto = onnx.numpy_helper.from_array(np.asarray(values.astype(ml_dtypes.bfloat16)), name)
    return gs.Constant(name, gs.ir.tensor.LazyValues(proto))


def cast_to_precision(graph: gs.Graph, precision: str) -> tuple[gs.Graph, int]:
    """Rewrite ``graph`` (in place) to compute in ``precision`` (fp16 | bf16) by the autocast rule."""
    if precision not in LOW_TYPES:
        raise ValueError(f"precision must be one of {', '.join(LOW_TYPES)}, got {precision!r}")
    low = LOW_TYPES[precision]
    graph.toposort()
    kind: dict[str, str] = {}
    for t in graph.inputs:
        kind[t.name] = _FP32 if _is_fp32(t) else _OTHER
    casts: dict[tuple[str, str], gs.Variable] = {}
    low_consts: dict[str, gs.Constant] = {}
    new_nodes: list[gs.Node] = []

    def kind_of(t) -> str:
        if t.name in kind:
            return kind[t.name]
        if _const_value(t) is not None:
            return _CONST
        return _FP32 if _is_fp32(t) else _OTHER

    def as_low(t):
        k = kind_of(t)
        if k == _LOW:
            return t
        if k == _CONST:
            if t.name not in low_consts:
                low_consts[t.name] = _low_constant(f"{t.name}_{precision}", _const_value(t), precision)
            return low_consts[t.name]
        return _cast(t, low, precision)

    def as_fp32(t):
        return _cast(t, onnx.TensorProto.FLOAT, "fp32") if kind_of(t) == _LOW else t

    def _cast(t, to: int, tag: str):
        key = (t.name, tag)
        if key not in casts:
            out = gs.Variable(f"{t.name}_{tag}")
            new_nodes.append(gs.Node("Cast", name=f"{t.name}_to_{tag}", attrs={"to": to}, inputs=[t], outputs=[out]))
            kind[out.name] = _LOW if tag != "fp32" else _FP32
            casts[key] = out
        return casts[key]

    changed = 0
    for node in list(graph.nodes):
        if node.op == "Constant":
            for out in node.outputs:
                kind[out.name] = _CONST if _const_value(out) is not None else _OTHER
            continue
        skip = FLOAT32_ONLY_INPUTS.get(node.op, set()) if not node.domain else set()
        floats = [i for i, t in enumerate(node.inputs)
                  if t.name and i not in skip and kind_of(t) in (_FP32, _LOW, _CONST)]
        kinds = {kind_of(node.inputs[i]) for i in floats}
        if node.op == "Cast" and not node.domain:
            to = node.attrs.get("to")
            for out in node.outputs:
                kind[out.name] = _FP32 if to == onnx.TensorProto.FLOAT else _OTHER
            continue
        if (node.domain or "") not in ("", "ai.onnx") or _has_subgraph(node) or node.op in FP32_OPS:
            target = _FP32
        elif node.op in LOW_OPS or (node.op == "Gather" and kind_of(node.inputs[0]) == _CONST):
            target = _LOW  # matmul-class ops; embedding lookups read a low-precision table
        elif node.op == "CastLike":
            target = kind_of(node.inputs[1]) if node.inputs[1].name else _FP32
            target = _FP32 if target == _CONST else target
            floats = [0] if kind_of(node.inputs[0]) in (_FP32, _LOW, _CONST) else []
        elif _FP32 in kinds:
            target = _FP32
        elif _LOW in kinds:
            target = _LOW
        else:
            target = _FP32
        if target == _LOW and not _schema_accepts(node.op, graph.opset, low):
            target = _FP32  # e.g. Conv takes no bfloat16 before opset 22
        for i in floats:
            node.inputs[i] = as_low(node.inputs[i]) if target == _LOW else as_fp32(node.inputs[i])
        if node.op == "CastLike":
            continue  # its output follows its second input; CastLike keeps working unchanged
        for out in node.outputs:
            if target == _LOW and _is_fp32(out):
                kind[out.name] = _LOW
                out.dtype, out.shape = None, None  # shape inference refills both
            elif _is_fp32(out):
                kind[out.name] = _FP32
            else:
                kind[out.name] = _OTHER
        changed += target == _LOW and bool(floats)  # an fp16 graph's MatMul was low already

    graph.nodes.extend(new_nodes)
    # Outputs keep their names and fp32 type: the producer writes a renamed low tensor, cast back.
    for i, out in enumerate(list(graph.outputs)):
        if kind.get(out.name) != _LOW:
            continue
        inner = gs.Variable(f"{out.name}_{precision}")
        for producer in out.inputs:
            producer.outputs[producer.outputs.index(out)] = inner
        for consumer in list(out.outputs):
            consumer.inputs[consumer.inputs.index(out)] = inner
        out.dtype = np.float32
        graph.nodes.append(gs.Node("Cast", name=f"{out.name}_to_fp32", attrs={"to": onnx.TensorProto.FLOAT},
                                   inputs=[inner], outputs=[out]))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return graph, changed


def convert_onnx_file(source: Path, target: Path, precision: str) -> int:
    """Write ``source`` converted to ``precision`` into ``target`` (shape-inferred and checked).

    Returns the number of nodes that compute in the low type. Large graphs are written
    with external data beside ``target``.
    """
    model = onnx.load(source)
    graph, changed = cast_to_precision(gs.import_onnx(model), precision)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    target.parent.mkdir(parents=True, exist_ok=True)
    if out.ByteSize() < TWO_GB:
        onnx.save_model(out, target)
    else:
        onnx.save_model(out, target, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=target.name + ".data", size_threshold=1024)
    onnx.shape_inference.infer_shapes_path(str(target), str(target), check_type=True, strict_mode=True)
    onnx.checker.check_model(str(target), full_check=not _has_custom_ops(out))
    return changed


def _has_custom_ops(model: onnx.ModelProto) -> bool:
    local = {(f.domain, f.name) for f in model.functions}
    return any(n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in local for n in model.graph.node)
