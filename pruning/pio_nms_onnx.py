"""``fsr::PioNms`` (version 1): PIO-FVLM's gradient-ordered NMS as an ONNX local function.

The NMS of spec section 6 is a greedy walk of ``keep`` steps. Unrolled (what tracing
`nms_static` gives), the graph grows with ``keep`` and so does its export time (about a
minute for ``keep = 92`` on a 2-core CPU; several for the 192-budget schedule). Here the
steps are one ONNX ``Loop`` whose trip count is the node's ``keep`` attribute, so the graph
(and its export) is the same size for every ``keep``.

Node: ``PioNms(saliency [B, n], features [B, n, D]) -> kept_indices [B, keep]`` (int64,
ascending), attributes ``keep`` (int, 1 <= keep <= n) and ``tau`` (float). ``n`` and the
batch come from the input shapes; ``keep`` and ``tau`` from the node (attribute references
in the body). The body computes exactly what `nms_static` computes, op for op:

- neighbours ``N = (x̂ x̂ᵀ >= tau)`` with ``x̂ = x / max(||x||, 1e-12)`` in float32;
- ranks: each token's place in a stable descending sort of the saliency (``ReduceSum`` of
  the tokens that come before it), so ties go to the lower index and no later step depends
  on how ``ArgMin`` or ``TopK`` order equal values;
- a loop-carried penalty ``[B, n]``: each step takes the cheapest token (rank + ``n`` while
  suppressed + ``4n`` once selected); only a pick that was not suppressed suppresses its
  neighbours (its row of ``N``, times ``n``);
- kept = the ``keep`` selected indices, ascending (``TopK`` smallest of distinct keys).

Standard opset-18 ops only (``Loop`` included). `add_pio_nms_function` puts the body into a
model exported with `pio_nms_translation_table`; `inline_pio_nms` inlines it (``Loop`` at the
top level) for runtimes that want no local functions.
"""

from __future__ import annotations

import functools

import onnx
import torch
from onnx import TensorProto, helper

from .pio_fvlm import NORM_EPS, TAU, PioError

PIO_NMS_DOMAIN, PIO_NMS_OP, PIO_NMS_VERSION = "fsr", "PioNms", 1
PIO_NMS_INPUTS = ("saliency", "features")
PIO_NMS_OUTPUTS = ("kept_indices",)
PIO_NMS_ATTRIBUTES = ("keep", "tau")
BODY_OPSET = 18

_F32, _I64, _BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _attribute_constant(output: str, field: str, ref: str, kind: int) -> onnx.NodeProto:
    """``Constant(field=@ref)``: the calling node's attribute ``ref`` as a tensor."""
    node = helper.make_node("Constant", [], [output])
    attribute = onnx.AttributeProto()
    attribute.name, attribute.ref_attr_name, attribute.type = field, ref, kind
    node.attribute.append(attribute)
    return node


def _constant(name: str, **value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], **value)


def _loop_body() -> onnx.GraphProto:
    """One NMS step. Outer scope: ``key`` [B,n], ``suppress`` [B,n,n], ``index`` [n] int64,
    ``big`` and ``big4`` (float scalars), ``axis_last`` / ``axis_1`` (int64 [1])."""
    n = helper.make_node
    nodes = [
        n("Add", ["key", "penalty_in"], ["cost"]),
        n("ReduceMin", ["cost", "axis_last"], ["best"], keepdims=1),  # [B,1]
        n("ArgMin", ["cost"], ["choice"], axis=-1, keepdims=1),  # [B,1]; costs are distinct
        n("Equal", ["index", "choice"], ["is_pick"]),  # [B,n]
        n("Cast", ["is_pick"], ["pick"], to=_F32),
        n("Unsqueeze", ["pick", "axis_1"], ["pick_row"]),  # [B,1,n]
        n("MatMul", ["pick_row", "suppress"], ["row_3d"]),  # the pick's row of N, times n (one term: exact)
        n("Squeeze", ["row_3d", "axis_1"], ["row"]),
        n("Less", ["best", "big"], ["was_free"]),
        n("Cast", ["was_free"], ["free"], to=_F32),
        n("Mul", ["row", "free"], ["suppressed"]),
        n("Mul", ["pick", "big4"], ["selected"]),
        n("Max", ["suppressed", "selected"], ["step_penalty"]),
        n("Max", ["penalty_in", "step_penalty"], ["penalty_out"]),
        n("Identity", ["cond_in"], ["cond_out"]),
    ]
    return helper.make_graph(
        nodes, "pio_nms_step",
        [helper.make_tensor_value_info("iteration", _I64, []), helper.make_tensor_value_info("cond_in", _BOOL, []),
         helper.make_tensor_value_info("penalty_in", _F32, None)],
        [helper.make_tensor_value_info("cond_out", _BOOL, []), helper.make_tensor_value_info("penalty_out", _F32, None)])


def build_pio_nms_function() -> tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]]:
    """A fresh ``fsr.PioNms`` FunctionProto and the opset imports a model holding it needs."""
    n = helper.make_node
    nodes = [
        _constant("axis_last", value_ints=[-1]),
        _constant("axis_1", value_ints=[1]),
        _constant("axis_0", value_ints=[0]),
        _constant("eps", value_float=NORM_EPS),
        _constant("zero_i", value_int=0),
        _constant("one_i", value_int=1),
        _constant("true", value=helper.make_tensor("true_value", _BOOL, [], [True])),
    ]
    nodes += [_attribute_constant("keep_scalar", "value_int", "keep", onnx.AttributeProto.INT),
              _attribute_constant("tau_value", "value_float", "tau", onnx.AttributeProto.FLOAT)]
    nodes += [
        n("Reshape", ["keep_scalar", "axis_1"], ["keep_1d"]),  # [1] int64 (TopK's K)
        # ---- neighbours: N = (x̂ x̂ᵀ >= tau), x̂ = x / max(||x||, eps), float32
        n("Cast", ["features"], ["x"], to=_F32),
        n("Mul", ["x", "x"], ["x_sq"]),
        n("ReduceSum", ["x_sq", "axis_last"], ["x_sq_sum"], keepdims=1),
        n("Sqrt", ["x_sq_sum"], ["x_norm"]),
        n("Max", ["x_norm", "eps"], ["x_den"]),
        n("Div", ["x", "x_den"], ["unit"]),
        n("Transpose", ["unit"], ["unit_t"], perm=[0, 2, 1]),
        n("MatMul", ["unit", "unit_t"], ["cosine"]),  # [B,n,n]
        n("GreaterOrEqual", ["cosine", "tau_value"], ["neighbours"]),
        # ---- sizes and the index
        n("Shape", ["saliency"], ["n_1d"], start=1, end=2),
        n("Squeeze", ["n_1d", "axis_0"], ["n_scalar"]),
        n("Range", ["zero_i", "n_scalar", "one_i"], ["index"]),  # [n]
        n("Cast", ["n_scalar"], ["big"], to=_F32),
        _constant("four", value_float=4.0),
        n("Mul", ["big", "four"], ["big4"]),
        n("Cast", ["neighbours"], ["neighbours_f"], to=_F32),
        n("Mul", ["neighbours_f", "big"], ["suppress"]),  # [B,n,n]
        # ---- descending rank, ties to the lower index: #{j : s_j > s_i or (s_j == s_i and j < i)}
        n("Unsqueeze", ["saliency", "axis_1"], ["s_j"]),  # [B,1,n]: column j (compared in the input's type)
        n("Unsqueeze", ["saliency", "axis_last"], ["s_i"]),  # [B,n,1]: row i
        n("Greater", ["s_j", "s_i"], ["higher"]),
        n("Equal", ["s_j", "s_i"], ["same"]),
        n("Unsqueeze", ["index", "axis_0"], ["index_j"]),  # [1,n]
        n("Unsqueeze", ["index", "axis_last"], ["index_i"]),  # [n,1]
        n("Less", ["index_j", "index_i"], ["lower"]),  # [n,n]
        n("And", ["same", "lower"], ["tie_before"]),
        n("Or", ["higher", "tie_before"], ["before"]),
        n("Cast", ["before"], ["before_i"], to=_I64),
        n("ReduceSum", ["before_i", "axis_last"], ["rank"], keepdims=0),  # [B,n] int64
        n("Cast", ["rank"], ["key"], to=_F32),
        # ---- keep steps
        n("Shape", ["key"], ["key_shape"]),
        n("ConstantOfShape", ["key_shape"], ["penalty0"], value=helper.make_tensor("zero_f", _F32, [1], [0.0])),
        n("Loop", ["keep_scalar", "true", "penalty0"], ["penalty"], body=_loop_body()),
        # ---- kept = selected tokens, ascending
        n("GreaterOrEqual", ["penalty", "big4"], ["chosen"]),
        n("Add", ["index", "n_scalar"], ["index_late"]),
        n("Where", ["chosen", "index", "index_late"], ["order_i"]),
        n("Cast", ["order_i"], ["order"], to=_F32),
        n("TopK", ["order", "keep_1d"], ["order_values", "kept_indices"], axis=-1, largest=0, sorted=1),
    ]
    function = helper.make_function(
        PIO_NMS_DOMAIN, PIO_NMS_OP, list(PIO_NMS_INPUTS), list(PIO_NMS_OUTPUTS), nodes,
        [helper.make_opsetid("", BODY_OPSET)], list(PIO_NMS_ATTRIBUTES),
        doc_string="PIO-FVLM gradient-ordered NMS (shared/docs/methods/pio-fvlm.md section 6; "
                   "pruning/pio_fvlm.md): keep steps of a Loop; keep and tau from the calling node, n and the "
                   "batch from the inputs. Output: the kept indices [B, keep], ascending.")
    opsets = [helper.make_opsetid("", BODY_OPSET), helper.make_opsetid(PIO_NMS_DOMAIN, PIO_NMS_VERSION)]
    return function, opsets


@functools.lru_cache(maxsize=1)
def _cached_function() -> bytes:
    return build_pio_nms_function()[0].SerializeToString()


def pio_nms_function() -> tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]]:
    """`build_pio_nms_function`, built once per process (a copy each call)."""
    function = onnx.FunctionProto()
    function.ParseFromString(_cached_function())
    return function, [helper.make_opsetid("", BODY_OPSET), helper.make_opsetid(PIO_NMS_DOMAIN, PIO_NMS_VERSION)]


def check_pio_nms_attributes(keep, tau) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise PioError(f"PioNms: keep must be an integer >= 1, got {keep!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not -1.0 <= float(tau) <= 1.0:
        raise PioError(f"PioNms: tau must be a cosine threshold in [-1, 1], got {tau!r}")


def pio_nms_node_attributes(*, keep: int, tau: float = TAU) -> dict:
    check_pio_nms_attributes(keep, tau)
    return {"keep": int(keep), "tau": float(tau)}


def _pio_nms_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if (n.domain, n.op_type) == (PIO_NMS_DOMAIN, PIO_NMS_OP)]


def check_pio_nms_nodes(model: onnx.ModelProto) -> int:
    """Check every ``fsr.PioNms`` node of ``model`` (top-level graph): two inputs, one output, an int
    ``keep >= 1`` and a float ``tau``, and the function present. Returns how many there are."""
    nodes = _pio_nms_nodes(model.graph)
    if nodes and not any((f.domain, f.name) == (PIO_NMS_DOMAIN, PIO_NMS_OP) for f in model.functions):
        raise PioError("the model has fsr.PioNms nodes but not the fsr.PioNms function; add it with "
                       "add_pio_nms_function(model)")
    for node in nodes:
        where = f"fsr.PioNms node {node.name or '(unnamed)'}"
        if len(node.input) != 2 or not all(node.input) or len(node.output) != 1:
            raise PioError(f"{where} must have inputs {list(PIO_NMS_INPUTS)} and output {list(PIO_NMS_OUTPUTS)}")
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if set(attributes) != set(PIO_NMS_ATTRIBUTES):
            raise PioError(f"{where} has attributes {sorted(attributes)}; it needs {list(PIO_NMS_ATTRIBUTES)}")
        try:
            check_pio_nms_attributes(attributes["keep"], attributes["tau"])
        except PioError as exc:
            raise PioError(f"{where}: {exc}") from None
    return len(nodes)


def add_pio_nms_function(model: onnx.ModelProto) -> int:
    """Give ``model`` the ``fsr.PioNms`` function and opset import if it has PioNms nodes (a function
    already there is replaced). Returns the number of nodes (0: the model is left as it is)."""
    count = len(_pio_nms_nodes(model.graph))
    if not count:
        return 0
    kept = [f for f in model.functions if (f.domain, f.name) != (PIO_NMS_DOMAIN, PIO_NMS_OP)]
    del model.functions[:]
    model.functions.extend(kept)
    model.functions.append(pio_nms_function()[0])
    imports = {o.domain: o for o in model.opset_import}
    if PIO_NMS_DOMAIN not in imports:
        model.opset_import.append(helper.make_opsetid(PIO_NMS_DOMAIN, PIO_NMS_VERSION))
    if imports.get("") is not None and imports[""].version != BODY_OPSET:
        raise PioError(f"the model's default opset is {imports[''].version}; the PioNms body needs {BODY_OPSET}")
    check_pio_nms_nodes(model)
    return count


def inline_pio_nms(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its ``fsr.PioNms`` nodes replaced by their bodies (a ``Loop`` at the top level)."""
    from onnx import inliner

    return inliner.inline_selected_functions(model, [(PIO_NMS_DOMAIN, PIO_NMS_OP)], exclude=False)


@functools.lru_cache(maxsize=1)
def _node_schema() -> onnx.defs.OpSchema:
    """The op's schema for onnxscript's graph builder (not registered with onnx globally)."""
    schema = onnx.defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    return schema(
        PIO_NMS_OP, PIO_NMS_DOMAIN, PIO_NMS_VERSION,
        inputs=[schema.FormalParameter("saliency", "T"), schema.FormalParameter("features", "U")],
        outputs=[schema.FormalParameter("kept_indices", "tensor(int64)")],
        type_constraints=[("T", floats, "float types"), ("U", floats, "float types")],
        attributes=[schema.Attribute("keep", schema.AttrType.INT, "", required=True),
                    schema.Attribute("tau", schema.AttrType.FLOAT, "", required=True)],
    )


def _translate_pio_nms(saliency, features, keep: int, tau: float):
    """torch.onnx translation of ``torch.ops.fsr.pio_nms``: one ``fsr.PioNms`` node."""
    from onnxscript.values import Op, Opset

    node = Op(Opset(PIO_NMS_DOMAIN, PIO_NMS_VERSION), PIO_NMS_OP, op_schema=_node_schema())
    return node(saliency, features, keep=keep, tau=tau)


def pio_nms_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: a traced
    ``torch.ops.fsr.pio_nms`` becomes one ``fsr.PioNms`` node; follow the export with
    `add_pio_nms_function`."""
    from . import pio_fvlm_fixed  # noqa: F401 (registers torch.ops.fsr.pio_nms)

    return {torch.ops.fsr.pio_nms.default: _translate_pio_nms}


def make_pio_nms_model(*, keep: int, tau: float = TAU, num_tokens: int | str = "tokens",
                       width: int | str = "width", saliency_type: int = _F32, feature_type: int = _F32,
                       inline: bool = False) -> onnx.ModelProto:
    """A one-node ``fsr.PioNms`` model (the function in ``model.functions``, or inlined), IR 10."""
    from fsr.onnx_io import IR_VERSION

    node = helper.make_node(PIO_NMS_OP, list(PIO_NMS_INPUTS), list(PIO_NMS_OUTPUTS), name="pio_nms",
                            domain=PIO_NMS_DOMAIN, **pio_nms_node_attributes(keep=keep, tau=tau))
    graph = helper.make_graph(
        [node], "fsr_pio_nms",
        [helper.make_tensor_value_info("saliency", saliency_type, ["batch", num_tokens]),
         helper.make_tensor_value_info("features", feature_type, ["batch", num_tokens, width])],
        [helper.make_tensor_value_info("kept_indices", _I64, ["batch", keep])])
    function, opsets = pio_nms_function()
    model = helper.make_model(graph, opset_imports=opsets, functions=[function], ir_version=IR_VERSION,
                              producer_name="fsr-export")
    return inline_pio_nms(model) if inline else model
