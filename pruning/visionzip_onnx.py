"""``fsr::VisionZip`` (version 1) as an ONNX local function, and a one-node model builder.

The body is written once with onnxscript and serves every node of the op: ``dominant`` and
``contextual`` are attribute references (``Constant(value_int=@dominant)``), so a node's
attributes decide the result at run time, and the token count ``T = 1 + N`` and the batch
come from the input shapes. Nothing in the body depends on the model it is placed in.

Formulation (the same as `VisionZipFixed`, tested against `visionzip_reference`):

- ``K = min(d + c, T)``; the body computes the general path for ``d' = min(d, K - 1)``,
  ``c' = K - d'`` (equal to ``d, c`` whenever something is pruned; a split the general path
  accepts for every ``T >= 1``) and replaces both outputs by the identity (the first ``K = T`` rows in input
  order) when ``d + c >= T``. No ``If``, ``Loop`` or ``NonZero``: every shape is ``B``,
  ``T``, ``K``, ``d'`` or ``c'``.
- Dominant: ``TopK`` values only (``v`` = the ``(d'-1)``-th largest patch score), then the
  tie rule by a float32 ``CumSum`` of the ``a == v`` mask (exact counts below 2**24).
- Slots: ``CumSum`` counts; ``kept_indices`` = ``TopK(smallest, K)`` of distinct float32
  slot keys, so no result depends on how a TopK orders equal values.
- Nearest anchor: ``MatMul`` of unit keys, anchors whose key equals an earlier anchor's
  masked (they would tie and lose), ``ReduceMax``, then the smallest anchor number attaining
  it (``ReduceMin``), i.e. the first anchor on ties.
- Merge: a one-hot ``[B, c', T]`` ``MatMul`` with the float32 hidden states, divided by
  ``max(1, count)``, added to the anchor; the output rows are assembled in float32 and cast
  back to the hidden states' type once (``CastLike``; lossless for the gathered rows).

Inputs may be any float type each (``cls_attention`` and ``keys`` are cast to float32);
``tokens`` has the type of ``hidden_states``. Standard opset 18 only. TensorRT limits:
TopK ``k <= 3840`` (``dominant - 1`` and ``K``).
"""

from __future__ import annotations

import functools
import logging
from typing import TypeVar

import onnx
import torch
from onnx import TensorProto, helper
from onnxscript import BFLOAT16, FLOAT, FLOAT16, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from .visionzip import (
    VISIONZIP_ATTRIBUTES,
    VISIONZIP_DOMAIN,
    VISIONZIP_INPUTS,
    VISIONZIP_OP,
    VISIONZIP_OP_VERSION,
    VISIONZIP_OUTPUTS,
    VisionZipError,
    check_visionzip_attributes,
)

#: ONNX (default domain) opset of the function body, and the IR version of models made here.
BODY_OPSET = 18
IR_VERSION = 10

_FSR = Opset(VISIONZIP_DOMAIN, VISIONZIP_OP_VERSION)
_F32 = TensorProto.FLOAT
_I64 = TensorProto.INT64

#: Type variables of the signature (what onnxscript and torch.onnx see; the FunctionProto
#: itself carries no types, so ONNX Runtime and TensorRT accept any float for each input).
THidden = TypeVar("THidden", FLOAT, FLOAT16, BFLOAT16)
TAttention = TypeVar("TAttention", FLOAT, FLOAT16, BFLOAT16)
TKeys = TypeVar("TKeys", FLOAT, FLOAT16, BFLOAT16)

_TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
}


def _script(*args, **kwargs):
    """onnxscript's ``script`` without its warnings about the TypeVar annotations: they are there for
    readers and torch.onnx, and the FunctionProto deliberately declares no types (any float input),
    so the warnings (printed at import, e.g. in the middle of ``fsr-export``) say nothing useful."""
    def wrap(fn):
        logger = logging.getLogger("onnxscript")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            return script(*args, **kwargs)(fn)
        finally:
            logger.setLevel(level)
    return wrap


@_script(_FSR, default_opset=op)
def VisionZip(
    hidden_states: THidden, cls_attention: TAttention, keys: TKeys, dominant: int, contextual: int
) -> tuple[THidden, INT64]:
    # ---- sizes: d, c from the node; T, B, C, Dk from the inputs (all int64 [1]) ----------
    one = op.Constant(value_ints=[1])
    zero = op.Constant(value_ints=[0])
    axis1 = op.Constant(value_ints=[1])
    last = op.Constant(value_ints=[-1])
    axis_last = op.Constant(value_int=-1)
    d = op.Reshape(op.Constant(value_int=dominant), one)
    c = op.Reshape(op.Constant(value_int=contextual), one)
    t = op.Shape(hidden_states, start=1, end=2)
    b = op.Shape(hidden_states, start=0, end=1)
    width = op.Shape(hidden_states, start=2, end=3)
    key_width = op.Shape(keys, start=2, end=3)
    k_out = op.Min(op.Add(d, c), t)  # K = min(d + c, T)
    d_eff = op.Min(d, op.Sub(k_out, one))  # d' (= d when pruning)
    c_eff = op.Sub(k_out, d_eff)  # c' (= c when pruning)
    identity = op.GreaterOrEqual(op.Add(d, c), t)  # [1] bool
    index = op.Range(op.Constant(value_int=0), op.Squeeze(t, zero), op.Constant(value_int=1))  # [T]
    index_f = op.Cast(index, to=_F32)
    t_f = op.Cast(t, to=_F32)

    # ---- dominant tokens: [CLS] + the (d'-1) highest patch scores, ties to the lower index
    patch = op.GreaterOrEqual(index, op.Constant(value_int=1))  # [T]
    scores = op.Where(patch, op.Cast(cls_attention, to=_F32), op.Constant(value_float=float("-inf")))
    n_patches = op.Sub(d_eff, one)  # d' - 1 >= 0
    k_top = op.Max(n_patches, one)
    top_values, _top_indices = op.TopK(scores, k_top, axis=-1, largest=1, sorted=1)
    kth = op.ReduceMin(top_values, last, keepdims=1)  # [B, 1]
    above = op.And(patch, op.Greater(scores, kth))
    tie = op.And(patch, op.Equal(scores, kth))
    need = op.Sub(op.Cast(n_patches, to=_F32), op.ReduceSum(op.Cast(above, to=_F32), last, keepdims=1))
    tie_rank = op.CumSum(op.Cast(tie, to=_F32), axis_last)  # 1, 2, ... over the ties
    dominant_patch = op.Or(above, op.And(tie, op.LessOrEqual(tie_rank, need)))
    keep = op.Or(dominant_patch, op.Not(patch))  # [B, T], d' per row

    # ---- anchors: Rm list positions 0, step, 2 step, ... (the first c') ---------------------
    rest = op.Not(keep)
    position = op.Cast(op.Sub(op.CumSum(op.Cast(rest, to=_F32), axis_last), op.Constant(value_float=1.0)),
                       to=_I64)
    step = op.Max(op.Div(op.Sub(t, d_eff), c_eff), one)  # max(1, |Rm| // c'), int64
    anchor = op.And(
        rest,
        op.And(op.Equal(op.Mod(position, step), op.Constant(value_int=0)), op.Less(position, op.Mul(c_eff, step))),
    )
    anchor_number = op.Div(position, step)
    dominant_slot = op.Sub(op.CumSum(op.Cast(keep, to=_F32), axis_last), op.Constant(value_float=1.0))
    anchor_slot = op.Cast(op.Add(anchor_number, d_eff), to=_F32)
    slot = op.Where(keep, dominant_slot, op.Where(anchor, anchor_slot, op.Add(index_f, t_f)))
    _slot_values, kept_general = op.TopK(slot, k_out, axis=-1, largest=0, sorted=1)  # [B, K] distinct keys
    anchors = op.Slice(kept_general, d_eff, k_out, axis1)  # [B, c'] in anchor order

    # ---- nearest anchor by normalised keys, ties to the first anchor ----------------------
    keys_f = op.Cast(keys, to=_F32)
    norm = op.Sqrt(op.ReduceSum(op.Mul(keys_f, keys_f), last, keepdims=1))  # [B, T, 1]
    nonzero = op.Greater(norm, op.Constant(value_float=0.0))
    unit = op.Where(nonzero, op.Div(keys_f, op.Where(nonzero, norm, op.Constant(value_float=1.0))),
                    op.Constant(value_float=0.0))
    anchor_gather = op.Expand(op.Unsqueeze(anchors, last), op.Concat(b, c_eff, key_width, axis=0))
    anchor_unit = op.GatherElements(unit, anchor_gather, axis=1)  # [B, c', Dk]
    number = op.Range(op.Constant(value_int=0), op.Squeeze(c_eff, zero), op.Constant(value_int=1))  # [c']
    number_f = op.Cast(number, to=_F32)
    # An anchor whose key equals an earlier anchor's would tie with it and lose: mask it.
    anchor_key = op.GatherElements(keys_f, anchor_gather, axis=1)  # [B, c', Dk]
    same = op.ReduceMin(op.Cast(op.Equal(op.Unsqueeze(anchor_key, op.Constant(value_ints=[2])),
                                         op.Unsqueeze(anchor_key, axis1)), to=_F32), last, keepdims=0)  # [B,c',c']
    earlier = op.Less(op.Unsqueeze(number_f, zero), op.Unsqueeze(number_f, last))  # [m, p]: p < m
    duplicate = op.ReduceMax(op.Mul(same, op.Cast(earlier, to=_F32)), last, keepdims=1)  # [B, c', 1]
    not_duplicate = op.Equal(op.Transpose(duplicate, perm=[0, 2, 1]), op.Constant(value_float=0.0))  # [B, 1, c']
    sims = op.Where(not_duplicate, op.MatMul(unit, op.Transpose(anchor_unit, perm=[0, 2, 1])),
                    op.Constant(value_float=float("-inf")))  # [B, T, c']
    best = op.ReduceMax(sims, last, keepdims=1)
    target = op.ReduceMin(op.Where(op.Equal(sims, best), number_f, op.Cast(c_eff, to=_F32)), last, keepdims=0)

    # ---- contextual tokens: anchor + mean of its members, in float32 ------------------------
    member = op.And(rest, op.Not(anchor))  # [B, T]
    assign = op.And(op.Unsqueeze(member, axis1),
                    op.Equal(op.Unsqueeze(target, axis1), op.Unsqueeze(number_f, last)))  # [B, c', T]
    assign_f = op.Cast(assign, to=_F32)
    x = op.Cast(hidden_states, to=_F32)
    total = op.MatMul(assign_f, x)  # [B, c', C]
    count = op.Max(op.ReduceSum(assign_f, last, keepdims=1), op.Constant(value_float=1.0))
    anchor_x = op.GatherElements(x, op.Expand(op.Unsqueeze(anchors, last), op.Concat(b, c_eff, width, axis=0)),
                                 axis=1)
    contextual_tokens = op.Add(anchor_x, op.Div(total, count))  # float32 [B, c', C]
    dominant_index = op.Slice(kept_general, zero, d_eff, axis1)  # [B, d']
    dominant_tokens = op.GatherElements(
        x, op.Expand(op.Unsqueeze(dominant_index, last), op.Concat(b, d_eff, width, axis=0)), axis=1)
    general_tokens = op.Concat(dominant_tokens, contextual_tokens, axis=1)  # [B, K, C] float32

    # ---- identity when d + c >= T (then K = T): the first K rows in input order -----------
    # Selected in float32 and cast back once: exact for the gathered rows (fp16/bf16 -> float32
    # -> back is lossless), and ONNX Runtime's CPU Where has no bfloat16 kernel.
    first_rows = op.Slice(x, zero, k_out, axis1)
    first_index = op.Expand(op.Unsqueeze(op.Slice(index, zero, k_out, zero), zero), op.Concat(b, k_out, axis=0))
    tokens = op.CastLike(op.Where(identity, first_rows, general_tokens), hidden_states)
    kept_indices = op.Where(identity, first_index, kept_general)
    return tokens, kept_indices


def build_visionzip_function() -> tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]]:
    """A fresh ``fsr.VisionZip`` FunctionProto and the opset imports a model holding it needs."""
    function = VisionZip.to_function_proto()
    del function.value_info[:]  # no declared types: every input may be any float type
    function.doc_string = (
        "VisionZip (shared/docs/methods/visionzip.md; conventions pruning/visionzip.md). "
        "Attributes dominant (incl. [CLS]) and contextual are read from the calling node; "
        "T = 1 + N and the batch from the inputs; K = min(dominant + contextual, T)."
    )
    if (function.domain, function.name) != (VISIONZIP_DOMAIN, VISIONZIP_OP):
        raise RuntimeError(f"onnxscript produced {function.domain}.{function.name}, expected fsr.VisionZip")
    if (tuple(function.input), tuple(function.output), tuple(function.attribute)) != (
            VISIONZIP_INPUTS, VISIONZIP_OUTPUTS, VISIONZIP_ATTRIBUTES):
        raise RuntimeError("the VisionZip function signature does not match VISIONZIP_INPUTS/OUTPUTS/ATTRIBUTES")
    opsets = [helper.make_opsetid("", BODY_OPSET), helper.make_opsetid(VISIONZIP_DOMAIN, VISIONZIP_OP_VERSION)]
    return function, opsets


@functools.lru_cache(maxsize=1)
def _cached_function() -> bytes:
    return build_visionzip_function()[0].SerializeToString()


def visionzip_function() -> tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]]:
    """`build_visionzip_function`, built once per process (a copy each call)."""
    function = onnx.FunctionProto()
    function.ParseFromString(_cached_function())
    opsets = [helper.make_opsetid("", BODY_OPSET), helper.make_opsetid(VISIONZIP_DOMAIN, VISIONZIP_OP_VERSION)]
    return function, opsets


def visionzip_node_attributes(*, dominant, contextual) -> dict:
    """The validated attribute dict of a VisionZip node."""
    check_visionzip_attributes(dominant, contextual)
    return {"dominant": int(dominant), "contextual": int(contextual)}


def check_visionzip_nodes(model: onnx.ModelProto) -> int:
    """Check every ``fsr.VisionZip`` node of ``model`` (top-level graph); return how many there are.

    The function body cannot raise a readable error itself, so a runtime or a graph pass
    calls this before creating a session: each node needs three inputs, two outputs, int
    attributes ``dominant >= 1`` and ``contextual >= 1``, and the model must hold the
    ``fsr.VisionZip`` function (or the plugin that replaces it). Raises `VisionZipError`
    naming the node and the rule.
    """
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (VISIONZIP_DOMAIN, VISIONZIP_OP)]
    if nodes and not any((f.domain, f.name) == (VISIONZIP_DOMAIN, VISIONZIP_OP) for f in model.functions):
        raise VisionZipError("the model has fsr.VisionZip nodes but not the fsr.VisionZip function; add "
                             "visionzip_function() to model.functions (make_visionzip_model shows how)")
    for node in nodes:
        where = f"fsr.VisionZip node {node.name or '(unnamed)'}"
        if len(node.input) != len(VISIONZIP_INPUTS) or not all(node.input):
            raise VisionZipError(f"{where} has inputs {list(node.input)}; it needs {list(VISIONZIP_INPUTS)}")
        if len(node.output) != len(VISIONZIP_OUTPUTS):
            raise VisionZipError(f"{where} has outputs {list(node.output)}; it needs {list(VISIONZIP_OUTPUTS)}")
        attributes = {a.name: a for a in node.attribute}
        unknown = sorted(set(attributes) - set(VISIONZIP_ATTRIBUTES))
        if unknown:
            raise VisionZipError(f"{where} has unknown attributes {unknown}; it takes {list(VISIONZIP_ATTRIBUTES)}")
        values = {}
        for name in VISIONZIP_ATTRIBUTES:
            if name not in attributes:
                raise VisionZipError(f"{where} lacks the required int attribute {name!r}")
            if attributes[name].type != onnx.AttributeProto.INT:
                raise VisionZipError(f"{where}: attribute {name!r} must be an int, got "
                                     f"{onnx.AttributeProto.AttributeType.Name(attributes[name].type)}")
            values[name] = attributes[name].i
        try:
            check_visionzip_attributes(values["dominant"], values["contextual"])
        except VisionZipError as exc:
            raise VisionZipError(f"{where}: {exc}") from None
    return len(nodes)


@functools.lru_cache(maxsize=1)
def _node_schema() -> onnx.defs.OpSchema:
    """The op's schema for onnxscript's graph builder (not registered with onnx globally)."""
    schema = onnx.defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return schema(
        VISIONZIP_OP, VISIONZIP_DOMAIN, VISIONZIP_OP_VERSION,
        inputs=[schema.FormalParameter(name, kind) for name, kind in zip(VISIONZIP_INPUTS, ("T", "U", "V"))],
        outputs=[schema.FormalParameter(VISIONZIP_OUTPUTS[0], "T"),
                 schema.FormalParameter(VISIONZIP_OUTPUTS[1], "tensor(int64)")],
        type_constraints=[(kind, floats, "float types") for kind in ("T", "U", "V")],
        attributes=[schema.Attribute(name, schema.AttrType.INT, "", required=True) for name in VISIONZIP_ATTRIBUTES],
    )


def _translate_visionzip(hidden_states, cls_attention, keys, dominant: int, contextual: int):
    """torch.onnx translation of ``torch.ops.fsr.visionzip``: one ``fsr.VisionZip`` node."""
    from onnxscript.values import Op

    node = Op(_FSR, VISIONZIP_OP, op_schema=_node_schema())
    return node(hidden_states, cls_attention, keys, dominant=dominant, contextual=contextual)


def visionzip_translation_table() -> dict:
    """``custom_translation_table`` entry for ``torch.onnx.export(dynamo=True)``.

    The traced ``torch.ops.fsr.visionzip`` call becomes one ``fsr.VisionZip`` node with
    the call's ``dominant`` / ``contextual`` as attributes; follow the export with
    `add_visionzip_function` so the model holds the function body.
    """
    return {torch.ops.fsr.visionzip.default: _translate_visionzip}  # registered by .visionzip


def add_visionzip_function(model: onnx.ModelProto) -> int:
    """Give ``model`` the ``fsr.VisionZip`` function and opset import if it has VisionZip nodes.

    Returns the number of VisionZip nodes (0: the model is left as it is). A function
    already present is replaced by this body. Checks the nodes (`check_visionzip_nodes`).
    """
    count = sum((n.domain, n.op_type) == (VISIONZIP_DOMAIN, VISIONZIP_OP) for n in model.graph.node)
    if not count:
        return 0
    kept = [f for f in model.functions if (f.domain, f.name) != (VISIONZIP_DOMAIN, VISIONZIP_OP)]
    del model.functions[:]
    model.functions.extend(kept)
    model.functions.append(visionzip_function()[0])
    imports = {o.domain: o for o in model.opset_import}
    if VISIONZIP_DOMAIN not in imports:
        model.opset_import.append(helper.make_opsetid(VISIONZIP_DOMAIN, VISIONZIP_OP_VERSION))
    elif imports[VISIONZIP_DOMAIN].version != VISIONZIP_OP_VERSION:
        raise VisionZipError(f"the model imports domain {VISIONZIP_DOMAIN!r} version {imports[VISIONZIP_DOMAIN].version}; "
                         f"fsr.VisionZip is version {VISIONZIP_OP_VERSION}")
    if imports.get("", None) is not None and imports[""].version != BODY_OPSET:
        raise VisionZipError(f"the model's default opset is {imports[''].version}; the VisionZip body needs {BODY_OPSET}")
    check_visionzip_nodes(model)
    return count


def splice_visionzip(graph, *, dominant: int, contextual: int,
                     outputs: tuple[str, str] = ("visionzip_tokens", "kept_indices")):
    """The method's graph pass: consume a traced vision graph's outputs ``hidden_states``,
    ``cls_attention`` and ``keys`` (onnx-graphsurgeon ``Graph``) with one ``fsr.VisionZip`` node
    carrying ``dominant`` / ``contextual``, whose two outputs become the graph's only outputs::

        pixel_values ─► [tower] ─► hidden_states, cls_attention, keys ─► VisionZip ─► tokens, kept_indices

    The node's inputs are the tower's output tensors themselves (their names kept), and the
    graph gets the function body and the ``fsr`` opset import. ``tokens`` is ``[batch, K, C]``
    with ``K = min(dominant + contextual, T)`` (static when ``T`` is).
    """
    import numpy as np
    import onnx_graphsurgeon as gs

    attributes = visionzip_node_attributes(dominant=dominant, contextual=contextual)
    by_name = {t.name: t for t in graph.outputs}
    missing = [n for n in VISIONZIP_INPUTS if n not in by_name]
    if missing:
        raise VisionZipError(f"cannot splice fsr.VisionZip: graph {graph.name!r} lacks output(s) {missing}; the "
                             "vision tower must provide them (fsr.models.parts.VISION_OUTPUTS)")
    hidden, attention, keys = (by_name[n] for n in VISIONZIP_INPUTS)
    batch, num_tokens, width = hidden.shape
    kept = min(dominant + contextual, num_tokens) if isinstance(num_tokens, int) else "kept_tokens"
    tokens = gs.Variable(outputs[0], dtype=hidden.dtype, shape=[batch, kept, width])
    indices = gs.Variable(outputs[1], dtype=np.int64, shape=[batch, kept])
    graph.nodes.append(gs.Node(op=VISIONZIP_OP, domain=VISIONZIP_DOMAIN, name="VisionZip_0", attrs=attributes,
                               inputs=[hidden, attention, keys], outputs=[tokens, indices]))
    function, opsets = visionzip_function()
    graph.functions.append(gs.import_onnx(helper.make_model(
        helper.make_graph([], "holder", [], []), opset_imports=opsets, functions=[function])).functions[0])
    have = {d.domain: d for d in graph.import_domains or []}
    for opset in opsets:
        if opset.domain not in have:
            graph.import_domains = [*(graph.import_domains or []), opset]
        elif have[opset.domain].version != opset.version:
            raise VisionZipError(f"the vision graph imports domain {opset.domain!r} version "
                                 f"{have[opset.domain].version}; the VisionZip body needs {opset.version}")
    graph.outputs = [tokens, indices]
    graph.cleanup(remove_unused_graph_inputs=True, recurse_functions=False)  # keep the op's signature whole
    return graph


def onnx_dtype(dtype: torch.dtype) -> int:
    try:
        return _TORCH_TO_ONNX[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; use one of {list(_TORCH_TO_ONNX)}") from None


def make_visionzip_model(
    *,
    dominant: int,
    contextual: int,
    num_tokens: int | str = "tokens",
    hidden_dim: int | str = "channels",
    key_dim: int | str = "key_dim",
    dtype: torch.dtype = torch.float32,
    attention_dtype: torch.dtype = torch.float32,
    key_dtype: torch.dtype = torch.float32,
    function: tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]] | None = None,
) -> onnx.ModelProto:
    """A one-node model ``fsr.VisionZip`` with the function in ``model.functions`` (IR 10).

    Inputs ``hidden_states [batch, T, C]`` (dtype), ``cls_attention [batch, T]``
    (attention_dtype), ``keys [batch, T, Dk]`` (key_dtype); outputs ``tokens [batch, K, C]``,
    ``kept_indices [batch, K]`` int64. ``T``, ``C``, ``Dk`` are symbolic (dynamic) unless
    given as ints; ``K = min(dominant + contextual, T)`` is an int when ``T`` is, else the
    symbol ``kept``. ``function`` reuses a built function (default: `visionzip_function`).
    """
    attributes = visionzip_node_attributes(dominant=dominant, contextual=contextual)
    fn, opsets = function if function is not None else visionzip_function()
    kept = min(dominant + contextual, num_tokens) if isinstance(num_tokens, int) else "kept"
    inputs = [
        helper.make_tensor_value_info("hidden_states", onnx_dtype(dtype), ["batch", num_tokens, hidden_dim]),
        helper.make_tensor_value_info("cls_attention", onnx_dtype(attention_dtype), ["batch", num_tokens]),
        helper.make_tensor_value_info("keys", onnx_dtype(key_dtype), ["batch", num_tokens, key_dim]),
    ]
    outputs = [
        helper.make_tensor_value_info("tokens", onnx_dtype(dtype), ["batch", kept, hidden_dim]),
        helper.make_tensor_value_info("kept_indices", TensorProto.INT64, ["batch", kept]),
    ]
    node = helper.make_node(VISIONZIP_OP, list(VISIONZIP_INPUTS), list(VISIONZIP_OUTPUTS), name="visionzip",
                            domain=VISIONZIP_DOMAIN, **attributes)
    graph = helper.make_graph([node], "fsr_visionzip", inputs, outputs)
    return helper.make_model(graph, opset_imports=list(opsets), functions=[fn], ir_version=IR_VERSION,
                             producer_name="fsr-export")
