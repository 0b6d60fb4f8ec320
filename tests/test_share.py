"""`fsr.export.share.share_weights` on small hand-made graphs: same bytes under different shapes
are two shared tensors with two names; a model parameter gives its name; every graph still runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from fsr.export.share import SHARED_PREFIX, share_weights
from fsr.onnx_io import SHARED_WEIGHTS_DATA, SHARED_WEIGHTS_INDEX


def _graph(path, weight: np.ndarray, name: str) -> None:
    """y = x @ W for a [1, rows] input; ``W`` an initializer named ``name``."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, weight.shape[0]])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, weight.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", name], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(weight, name)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save_model(model, path)


@pytest.mark.parametrize("parameters", [False, True], ids=["no-parameters", "a-is-a-parameter"])
def test_same_bytes_other_shape_are_two_shared_tensors(tmp_path, parameters):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 64)).astype(np.float32)
    b = a.reshape(64, 32)  # the same bytes, another shape
    paths = {}
    for i, (weight, label) in enumerate([(a, "w_a"), (a, "other_a"), (b, "w_b"), (b, "other_b")]):
        paths[f"g{i}"] = tmp_path / f"g{i}.onnx"
        _graph(paths[f"g{i}"], weight, label)
    index = share_weights(tmp_path, paths, parameters=[("layer.weight", a)] if parameters else [])
    assert json.loads((tmp_path / SHARED_WEIGHTS_INDEX).read_text()) == index
    names = sorted(index["tensors"])
    assert len(names) == 2 and all(n.startswith(SHARED_PREFIX) for n in names)
    assert (f"{SHARED_PREFIX}layer.weight" in names) == bool(parameters)  # one parameter's bytes: its name
    assert index["graphs"]["g0"] == index["graphs"]["g1"] != index["graphs"]["g2"] == index["graphs"]["g3"]
    assert (tmp_path / SHARED_WEIGHTS_DATA).stat().st_size < 2 * a.nbytes + 4096 + 1
    for i, weight in enumerate([a, a, b, b]):
        x = rng.standard_normal((1, weight.shape[0])).astype(np.float32)
        session = ort.InferenceSession(str(paths[f"g{i}"]), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-5, atol=1e-5)


def test_onnx_runtime_registers_only_what_it_reads_as_a_weight(tmp_path):
    """`SharedWeights` hands a session only the shared tensors its graph reads as weights (MatMul B);
    a scale under Mul stays the session's own (on the small-deep PIO-FVLM export, ONNX Runtime 1.31
    rewrote such a scale during its graph optimizations and the registered value then failed a Mul
    broadcast). Both graphs still compute what they did."""
    from fsr.runtime.onnxrt import SharedWeights, session_options, weight_initializers

    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    scale = rng.standard_normal(256).astype(np.float32)
    paths = {}
    for g in ("g0", "g1"):  # xt = Transpose(x): y = sum(scale * xt), z = xt * scale, h = xt @ W
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 256, "n"])
        outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", "z", "h")]
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("Mul", ["s", "t"], ["m"]),
                 helper.make_node("ReduceSum", ["m"], ["y"], keepdims=0),
                 helper.make_node("Transpose", ["x"], ["t2"], perm=[0, 2, 1]), helper.make_node("Mul", ["t2", "s"], ["z"]),
                 helper.make_node("MatMul", ["t", "W"], ["h"])]
        graph = helper.make_graph(nodes, g, [x], outs, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scale, "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 10
        paths[g] = tmp_path / f"{g}.onnx"
        onnx.save_model(model, paths[g])
    index = share_weights(tmp_path, paths)
    assert len(index["tensors"]) == 2
    [matmul_weight] = [n for n in index["tensors"] if index["tensors"][n]["shape"] == [256, 256]]
    shared = SharedWeights(tmp_path, tmp_path / SHARED_WEIGHTS_INDEX)
    x = rng.standard_normal((2, 256, 3)).astype(np.float32)
    xt = x.transpose(0, 2, 1)
    want = [(xt * scale).sum(), xt * scale, xt @ w]
    for g, path in paths.items():
        assert weight_initializers(path) == {matmul_weight}
        options = session_options(None, "off")
        assert shared.add_to(options, g, path) == [matmul_weight]  # checked before a session exists
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for got, expected in zip(session.run(None, {"x": x}), want):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_bytes_a_graph_stores_in_its_own_file_are_referred_to_there(tmp_path):
    """A tensor one graph keeps in a weight file of its own (a decoder segment's ``.onnx.data``) and
    another holds inline: the second refers to the first's bytes (same file and offset); nothing is
    written to the shared file; a tensor that only matches in its first elements is not taken for it."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((64, 48)).astype(np.float32)
    near = a.copy()
    near[-1, -1] += 1.0  # the same first elements, other bytes
    paths = {name: tmp_path / f"{name}.onnx" for name in ("segment", "pruning", "other")}
    _graph(paths["segment"], a, "seg_w")
    model = onnx.load(paths["segment"])
    onnx.save_model(model, paths["segment"], save_as_external_data=True, location="segment.onnx.data",
                    size_threshold=1024)
    _graph(paths["pruning"], a, "proxy_w")
    _graph(paths["other"], near, "near_w")
    assert share_weights(tmp_path, paths) is None  # nothing left for a shared file
    assert not (tmp_path / SHARED_WEIGHTS_DATA).exists() and not (tmp_path / SHARED_WEIGHTS_INDEX).exists()

    def location(path):
        [t] = onnx.load(path, load_external_data=False).graph.initializer
        return {e.key: e.value for e in t.external_data} if t.data_location == onnx.TensorProto.EXTERNAL else None

    seg, pruning = location(paths["segment"]), location(paths["pruning"])
    assert pruning == seg and seg["location"] == "segment.onnx.data"
    assert location(paths["other"]) is None  # inline as it was
    for name, weight in (("segment", a), ("pruning", a), ("other", near)):
        x = rng.standard_normal((1, 64)).astype(np.float32)
        session = ort.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-5, atol=1e-5)
