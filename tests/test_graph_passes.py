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
from fsr.pruning import FSR_ATTRIBUTES, FsrOpError, focus_scan_refine_reference, kept_count
from fsr.pruning.onnx_function import fsr_function_settings

N, D, F = 20, 6, 5


def toy_vision_graph(with_relevance: bool = True, n=N) -> gs.Graph:
    """x [B,N,F] -> features = Relu(x); tokens = features @ W; saliency = mean(x); relevance = max(x).

    ``n`` may be a dim name: a dynamic token count."""
    x = gs.Variable("x", np.float32, ["batch", n, F])
    w = gs.Constant("w", np.random.RandomState(0).randn(F, D).astype(np.float32))
    features = gs.Variable("features", np.float32, ["batch", n, F])
    tokens = gs.Variable("tokens", np.float32, ["batch", n, D])
    saliency = gs.Variable("saliency", np.float32, ["batch", n])
    relevance = gs.Variable("relevance", np.float32, ["batch", n])
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


def _check_against_reference(model, x, with_relevance=True, **attributes):
    pruned, kept = run(model, x)
    xt = torch.from_numpy(x)
    features = torch.relu(xt)
    tokens = features @ torch.from_numpy(gs.import_onnx(model).tensors()["w"].values)
    want, want_kept = focus_scan_refine_reference(
        tokens, features, xt.mean(-1), xt.amax(-1) if with_relevance else None, **attributes)
    np.testing.assert_array_equal(kept, want_kept.numpy())
    np.testing.assert_allclose(pruned, want.numpy(), atol=1e-5)
    return kept


@pytest.mark.parametrize("with_relevance", [True, False])
def test_splice_matches_reference(with_relevance):
    graph = toy_vision_graph(with_relevance)
    # Without relevance the node computing it (not a graph output) is cleaned away, and a
    # constant row (r_hat = 1, the same as omitting it) takes its place.
    ops_before = [n.op for n in graph.nodes if with_relevance or n.op != "ReduceMax"]
    graph = splice_focus_scan_refine(graph, budget=7, use_relevance=with_relevance)
    neutral = [] if with_relevance else ["Shape", "ConstantOfShape"]
    assert sorted(n.op for n in graph.nodes) == sorted(ops_before + neutral + ["FocusScanRefine"])
    model = finalize(graph)
    [node] = [n for n in model.graph.node if n.domain == "fsr"]
    assert list(node.input) == ["tokens", "features", "saliency", "relevance" if with_relevance else "relevance_neutral"]
    assert {a.name for a in node.attribute} == set(FSR_ATTRIBUTES)
    assert [f.name for f in model.functions] == ["FocusScanRefine"]
    assert [o.name for o in model.graph.output] == ["image_tokens", "kept_indices"]
    # The function's record of what its body is survives graphsurgeon and finalize.
    assert fsr_function_settings(model.functions[0])["op"] == "fsr::FocusScanRefine"
    dims = [d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim]
    assert dims[1] == 7

    x = np.random.RandomState(1).randn(2, N, F).astype(np.float32)
    _check_against_reference(model, x, with_relevance, budget=7)


def test_splice_takes_a_dynamic_token_count():
    """N dynamic: the outputs carry the symbolic K, and one session runs every N."""
    model = finalize(splice_focus_scan_refine(toy_vision_graph(n="n"), budget=6, keep_ratio=0.0, rho=0.5))
    out = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out] == ["batch", "num_kept", D]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.RandomState(2)
    for n in (1, 3, 6, 7, 20, 45, 300):
        x = rng.randn(1 + n % 3, n, F).astype(np.float32)
        pruned, kept = session.run(None, {"x": x})
        assert kept.shape == (x.shape[0], min(6, n))
        _check_against_reference(model, x, budget=6, rho=0.5)


def test_splice_keep_ratio():
    model = finalize(splice_focus_scan_refine(toy_vision_graph(n="n"), budget=1, keep_ratio=0.3))
    node = next(n for n in model.graph.node if n.op_type == "FocusScanRefine")
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "keep_ratio")) == \
        pytest.approx(0.3)
    for n in (1, 3, 10, 31, 64):
        x = np.random.RandomState(n).randn(2, n, F).astype(np.float32)
        kept = _check_against_reference(model, x, budget=1, keep_ratio=0.3)
        assert kept.shape[1] == kept_count(n, 1, 0.3) == max(1, int(0.3 * n + 1e-9))
    static = finalize(splice_focus_scan_refine(toy_vision_graph(), budget=1, keep_ratio=0.3))
    assert static.graph.output[1].type.tensor_type.shape.dim[1].dim_value == kept_count(N, 1, 0.3) == 6


@pytest.mark.parametrize("settings, message", [
    (dict(budget=0), "attribute budget must be >= 1"),
    (dict(budget=4, keep_ratio=1.5), r"attribute keep_ratio must be in \[0, 1\]"),
    (dict(budget=4, kappa=-1.0), "attribute kappa must be >= 0"),
])
def test_splice_refuses_bad_attributes(settings, message):
    with pytest.raises(FsrOpError, match=rf"FocusScanRefine \(splice into graph 'toy'\): {message}"):
        splice_focus_scan_refine(toy_vision_graph(), **settings)


def test_splice_refuses_bad_inputs():
    graph = toy_vision_graph()
    graph.outputs[0].dtype = np.int64  # tokens
    with pytest.raises(FsrOpError, match="input tokens must be float32 or float16, got INT64"):
        splice_focus_scan_refine(graph, budget=4)


def test_one_function_per_model():
    """Splicing twice (two FSR nodes) keeps one function body: it serves every node."""
    graph = splice_focus_scan_refine(toy_vision_graph(), budget=5)
    again = toy_vision_graph()
    again.functions = graph.functions
    again = splice_focus_scan_refine(again, budget=9, keep_ratio=0.5)
    assert len(again.functions) == 1


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
