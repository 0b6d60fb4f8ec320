"""Splice ``fsr::FocusScanRefine`` into a traced vision graph.

Before::

    pixel_values ─► [vision tower] ─► tokens, features, saliency, relevance   (graph outputs)

After::

    pixel_values ─► [vision tower] ─► tokens ───┐
                                    features ───┤
                                    saliency ───┼─► FocusScanRefine ─► image_tokens, kept_indices
                                    relevance ──┘   (domain fsr, body = ONNX local function)

The node has exactly the signature of ``fsr-op.md``: inputs ``tokens, features,
saliency, relevance`` (an empty name when relevance is omitted), attributes
``budget, alpha, beta, rho, kappa``, outputs ``pruned, kept_indices`` (named here
``image_tokens`` and ``kept_indices`` as graph outputs).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

FSR_DOMAIN, FSR_OP = "fsr", "FocusScanRefine"  # fsr-op.md; the op's body lives in fsr.pruning

FSR_INPUTS = ("tokens", "features", "saliency", "relevance")


def _fsr_function(**settings) -> gs.Function:
    """The op's ONNX function, as a graphsurgeon Function (via a one-node model)."""
    from fsr.pruning.onnx_function import make_fsr_model

    model = make_fsr_model(**settings)
    functions = gs.import_onnx(model).functions
    return next(f for f in functions if f.domain == FSR_DOMAIN and f.name == FSR_OP)


def splice_focus_scan_refine(
    graph: gs.Graph,
    *,
    budget: int,
    alpha: float = 3.0,
    beta: float = 1.0,
    rho: float = 0.9,
    kappa: float = 1.0,
    use_relevance: bool = True,
    outputs: tuple[str, str] = ("image_tokens", "kept_indices"),
) -> gs.Graph:
    """Consume the graph outputs named ``tokens, features, saliency[, relevance]`` with one
    FocusScanRefine node whose outputs become the graph's only outputs."""
    by_name = {t.name: t for t in graph.outputs}
    needed = FSR_INPUTS if use_relevance else FSR_INPUTS[:3]
    missing = [n for n in needed if n not in by_name]
    if missing:
        raise ValueError(f"cannot splice FocusScanRefine: graph {graph.name!r} lacks output(s) {missing}")
    tokens, features, saliency = (by_name[n] for n in FSR_INPUTS[:3])
    relevance = by_name["relevance"] if use_relevance else gs.Variable.empty()
    batch, num_tokens, token_dim = tokens.shape
    feature_dim = features.shape[-1]
    if not all(isinstance(d, int) for d in (num_tokens, token_dim, feature_dim)):
        raise ValueError(f"FocusScanRefine needs static token count and widths, got tokens {tokens.shape}, "
                         f"features {features.shape}")
    k = min(budget, num_tokens)
    attrs = dict(budget=int(budget), alpha=float(alpha), beta=float(beta), rho=float(rho), kappa=float(kappa))
    function = _fsr_function(
        **attrs, num_tokens=num_tokens, token_dim=token_dim, feature_dim=feature_dim,
        has_relevance=use_relevance, dtype=_torch_dtype(tokens.dtype),
        feature_dtype=_torch_dtype(features.dtype), score_dtype=_torch_dtype(saliency.dtype),
    )
    pruned = gs.Variable(outputs[0], dtype=tokens.dtype, shape=[batch, k, token_dim])
    kept = gs.Variable(outputs[1], dtype=np.int64, shape=[batch, k])
    node = gs.Node(op=FSR_OP, domain=FSR_DOMAIN, name="FocusScanRefine_0", attrs=attrs,
                   inputs=[tokens, features, saliency, relevance], outputs=[pruned, kept])
    graph.nodes.append(node)
    graph.functions.append(function)
    graph.outputs = [pruned, kept]
    graph.import_domains = [*(graph.import_domains or []), *_missing_domains(graph, function)]
    graph.cleanup(remove_unused_graph_inputs=True, recurse_functions=False)  # keep the op signature whole
    return graph


def _missing_domains(graph: gs.Graph, function: gs.Function):
    import onnx

    have = {d.domain for d in graph.import_domains or []}
    extra = [onnx.helper.make_opsetid(FSR_DOMAIN, 1)] if FSR_DOMAIN not in have else []
    have.add(FSR_DOMAIN)
    for d in function.import_domains or []:
        if d.domain not in have:
            extra.append(d)
            have.add(d.domain)
    return extra


def _torch_dtype(np_dtype):
    import torch

    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(np_dtype)]
