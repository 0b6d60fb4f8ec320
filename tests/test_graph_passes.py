"""Each graph pass on a small hand-built graph: op counts before/after, numerics in ONNX
Runtime, and a case where the pass must not fire."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from fsr.graph_passes import finalize, isolate_focus_scan_refine, select_outputs, splice_focus_scan_refine
from fsr.pruning import focus_scan_refine_reference

N, D, F = 20, 6, 5


def toy_vision_graph(with_relevance: bool = True) -> gs.Graph:
    """x [B,N,F] -> features = Relu(x); tokens = features @ W; saliency = mean(x); relevance = max(x)."""
    x = gs.Variable("x", np.float32, ["batch", N, F])
    w = gs.Constant("w", np.random.RandomState(0).randn(F, D).astype(np.float32))
    features = gs.Variable("features", np.float32, ["batch", N, F])
    tokens = gs.Variable("tokens", np.float32, ["batch", N, D])
    saliency = gs.Variable("saliency", np.float32, ["batch", N])
    relevance = gs.Variable("relevance", np.float32, ["batch", N])
    axes = gs.Constant("axes", np.array([-1], np.int64))
    nodes = [
        gs.Node("Relu", inputs=[x], outputs=[features]),
        gs.Node("MatMul", inputs=[features, w], outputs=[tokens]),
        gs.Node("ReduceMean", inputs=[x, axes], outputs=[saliency], attrs={"keepdims": 0}),
        gs.Node("ReduceMax", inputs=[x, axes], outputs=[relevance], attrs={"keepdims": 0}),
    ]
    outputs = [tokens, features, saliency] + ([relevance] if with_relevance else [])
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=18, name="toy")


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})


@pytest.mark.parametrize("with_relevance", [True, False])
def test_splice_matches_reference(with_relevance):
    graph = toy_vision_graph(with_relevance)
    # Without relevance the node computing it (not a graph output) is cleaned away.
    ops_before = [n.op for n in graph.nodes if with_relevance or n.op != "ReduceMax"]
    graph = splice_focus_scan_refine(graph, budget=7, use_relevance=with_relevance)
    assert [n.op for n in graph.nodes] == ops_before + ["FocusScanRefine"]
    model = finalize(graph)
    [node] = [n for n in model.graph.node if n.domain == "fsr"]
    assert list(node.input) == ["tokens", "features", "saliency", "relevance" if with_relevance else ""]
    assert {a.name for a in node.attribute} == {"budget", "alpha", "beta", "rho", "kappa"}
    assert [f.name for f in model.functions] == ["FocusScanRefine"]
    assert [o.name for o in model.graph.output] == ["image_tokens", "kept_indices"]

    x = np.random.RandomState(1).randn(2, N, F).astype(np.float32)
    pruned, kept = run(model, x)
    xt = torch.from_numpy(x)
    features = torch.relu(xt)
    tokens = features @ torch.from_numpy(gs.import_onnx(model).tensors()["w"].values)
    want, want_kept = focus_scan_refine_reference(
        tokens, features, xt.mean(-1), xt.amax(-1) if with_relevance else None, budget=7)
    np.testing.assert_array_equal(kept, want_kept.numpy())
    np.testing.assert_allclose(pruned, want.numpy(), atol=1e-5)


def test_splice_refuses_a_graph_without_fsr_inputs():
    graph = toy_vision_graph()
    graph.outputs = graph.outputs[:1]
    with pytest.raises(ValueError, match=r"lacks output\(s\) \['features', 'saliency', 'relevance'\]"):
        splice_focus_scan_refine(graph, budget=4)


def test_select_outputs_renames_and_prunes():
    graph = select_outputs(toy_vision_graph(), {"tokens": "image_tokens"})
    assert [n.op for n in graph.nodes] == ["Relu", "MatMul"]  # saliency/relevance nodes are gone
    model = finalize(graph)
    x = np.ones((1, N, F), np.float32)
    [out] = run(model, x)
    assert out.shape == (1, N, D)
    with pytest.raises(ValueError, match="has no output"):
        select_outputs(toy_vision_graph(), {"nope": "x"})


def test_isolate_cuts_the_op_alone():
    graph = splice_focus_scan_refine(toy_vision_graph(), budget=5)
    alone = isolate_focus_scan_refine(graph)
    assert [n.op for n in alone.nodes] == ["FocusScanRefine"]
    assert [t.name for t in alone.inputs] == ["tokens", "features", "saliency", "relevance"]
    finalize(alone)
    with pytest.raises(ValueError, match="found 0"):
        isolate_focus_scan_refine(toy_vision_graph())  # must not fire without the op


def test_finalize_rejects_an_invalid_graph():
    graph = toy_vision_graph()
    graph.nodes[1].inputs[1] = gs.Constant("bad", np.zeros((F + 1, D), np.float32))  # wrong MatMul shape
    with pytest.raises(Exception):
        finalize(graph)
