"""Splice ``fsr::FocusScanRefine`` into a traced vision graph.

Before::

    pixel_values ─► [vision tower] ─► tokens, features, saliency, relevance   (graph outputs)

After::

    pixel_values ─► [vision tower] ─► tokens ───┐
                                    features ───┤
                                    saliency ───┼─► FocusScanRefine ─► image_tokens, kept_indices
                                    relevance ──┘   (domain fsr, body = ONNX local function)

The node has exactly the signature of ``fsr-op.md``: inputs ``tokens, features, saliency,
relevance``, attributes ``budget, alpha, beta, rho, kappa, keep_ratio`` (all written on the
node), outputs ``pruned, kept_indices`` (named here ``image_tokens`` and ``kept_indices`` as
graph outputs). The function body is the op's one body (`fsr.pruning.build_fsr_function`):
it reads the attributes from the node and N from the shapes, so the token count may be
dynamic. The output's K dim is static when N is (``min(budget, N)`` or from
``keep_ratio``), else the symbolic ``num_kept``.

Without relevance (``use_relevance=False``) the node's fourth input is a constant zero row
``ConstantOfShape(Shape(saliency))``: the op reads a constant relevance as ``r_hat = 1``,
exactly what omitting it means. (An empty input name means the same in ONNX Runtime, but
TensorRT's ONNX parser rejects a local-function call with an empty or missing input; the
plugin pass drops such a constant input again.)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fsr.errors import FsrError
from fsr.pruning.fsr_identity import FSR_DOMAIN, FSR_INPUTS, FSR_OP, FSR_OP_VERSION, kept_count

#: Symbolic K of the outputs when N is dynamic.
KEPT_DIM = "num_kept"
NEUTRAL_RELEVANCE = "relevance_neutral"


class SpliceError(FsrError, ValueError):
    """The graph cannot take the FocusScanRefine node; the message says what is missing."""


def fsr_function(graph: gs.Graph | None = None) -> gs.Function:
    """The op's function as a graphsurgeon Function: ``graph``'s own if it has one (one body
    per model), else a new one (`fsr.pruning.build_fsr_function`)."""
    for function in (graph.functions if graph is not None else []):
        if (function.domain, function.name) == (FSR_DOMAIN, FSR_OP):
            return function
    from fsr.pruning.onnx_function import make_fsr_model

    functions = gs.import_onnx(make_fsr_model(budget=1)).functions
    return next(f for f in functions if (f.domain, f.name) == (FSR_DOMAIN, FSR_OP))


def splice_focus_scan_refine(
    graph: gs.Graph,
    *,
    budget: int,
    alpha: float | None = None,
    beta: float | None = None,
    rho: float | None = None,
    kappa: float | None = None,
    use_relevance: bool = True,
    outputs: tuple[str, str] = ("image_tokens", "kept_indices"),
    keep_ratio: float | None = None,
) -> gs.Graph:
    """Consume the graph outputs named ``tokens, features, saliency[, relevance]`` with one
    FocusScanRefine node whose outputs become the graph's only outputs.

    N may be static or dynamic. Raises `SpliceError` for a graph without those outputs and
    `fsr.pruning.FsrOpError` for attributes or inputs the op does not accept.
    """
    from fsr.pruning.onnx_function import check_fsr_node

    by_name = {t.name: t for t in graph.outputs}
    needed = FSR_INPUTS if use_relevance else FSR_INPUTS[:3]
    missing = [n for n in needed if n not in by_name]
    if missing:
        raise SpliceError(f"cannot splice {FSR_OP}: graph {graph.name!r} lacks output(s) {missing}; "
                          f"it has {list(by_name)}")
    tokens, features, saliency = (by_name[n] for n in FSR_INPUTS[:3])
    given = dict(budget=budget, alpha=alpha, beta=beta, rho=rho, kappa=kappa, keep_ratio=keep_ratio)
    wired = [tokens, features, saliency, *([by_name["relevance"]] if use_relevance else [])]
    attrs = check_fsr_node(given, {t.name: (_elem_type(t.dtype), t.shape) for t in wired},
                           where=f"splice into graph {graph.name!r}")
    relevance = by_name["relevance"] if use_relevance else _neutral_relevance(graph, saliency)

    batch, num_tokens, token_dim = tokens.shape if tokens.shape is not None else ("batch", None, None)
    k = kept_count(num_tokens, attrs["budget"], attrs["keep_ratio"]) if isinstance(num_tokens, int) else KEPT_DIM
    function = fsr_function(graph)
    pruned = gs.Variable(outputs[0], dtype=tokens.dtype, shape=[batch, k, token_dim])
    kept = gs.Variable(outputs[1], dtype=np.int64, shape=[batch, k])
    node = gs.Node(op=FSR_OP, domain=FSR_DOMAIN, name="FocusScanRefine_0", attrs=attrs,
                   inputs=[tokens, features, saliency, relevance], outputs=[pruned, kept])
    graph.nodes.append(node)
    if function not in graph.functions:
        graph.functions.append(function)
    graph.outputs = [pruned, kept]
    graph.import_domains = [*(graph.import_domains or []), *_missing_domains(graph, function)]
    graph.cleanup(remove_unused_graph_inputs=True, recurse_functions=False)  # keep the op signature whole
    return graph


def _neutral_relevance(graph: gs.Graph, saliency: gs.Variable) -> gs.Variable:
    """A zero row like ``saliency`` (r_hat = 1, the same as an omitted relevance)."""
    shape = gs.Variable(f"{NEUTRAL_RELEVANCE}_shape", dtype=np.int64, shape=[2])
    zero = gs.Constant(f"{NEUTRAL_RELEVANCE}_zero", np.zeros([1], dtype=saliency.dtype))
    out = gs.Variable(NEUTRAL_RELEVANCE, dtype=saliency.dtype, shape=list(saliency.shape))
    graph.nodes.append(gs.Node("Shape", name=f"{NEUTRAL_RELEVANCE}_shape_node", inputs=[saliency], outputs=[shape]))
    graph.nodes.append(gs.Node("ConstantOfShape", name=f"{NEUTRAL_RELEVANCE}_node", attrs={"value": zero},
                               inputs=[shape], outputs=[out]))
    return out


def is_neutral_relevance(tensor) -> bool:
    """Is ``tensor`` a ConstantOfShape output (a constant relevance: r_hat = 1, as omitted)?"""
    return (isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1
            and tensor.inputs[0].op == "ConstantOfShape")


def _missing_domains(graph: gs.Graph, function: gs.Function):
    have = {d.domain for d in graph.import_domains or []}
    extra = [onnx.helper.make_opsetid(FSR_DOMAIN, FSR_OP_VERSION)] if FSR_DOMAIN not in have else []
    have.add(FSR_DOMAIN)
    for d in function.import_domains or []:
        if d.domain not in have:
            extra.append(d)
            have.add(d.domain)
    return extra


def _elem_type(dtype) -> int:
    """ONNX element type of a graphsurgeon dtype; 0 (unknown) when the graph does not say."""
    if dtype is None:
        return 0
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except TypeError:
        return 0
