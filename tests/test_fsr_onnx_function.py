"""The fsr.FocusScanRefine ONNX local function: signature, checker, ONNX Runtime vs reference."""

import functools
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fsr.pruning import focus_scan_refine_reference
from fsr.pruning.onnx_function import (
    FSR_ATTRIBUTES,
    FSR_DOMAIN,
    FSR_INPUTS,
    FSR_OP,
    FSR_OUTPUTS,
    build_fsr_function,
    fsr_function_settings,
    fsr_node_attributes,
    make_fsr_model,
)
from fsr.pruning.testing import INPUT_PATTERNS, make_fsr_inputs

# name -> (build_fsr_function arguments, make_fsr_model input dtypes)
SETTINGS = {
    "default": (dict(budget=8, num_tokens=24, token_dim=8, feature_dim=12), {}),
    "peaky_exponents": (
        dict(budget=10, alpha=1.5, beta=2.0, rho=0.5, kappa=2.0, num_tokens=24, token_dim=6, feature_dim=10),
        {},
    ),
    "no_relevance": (
        dict(budget=7, beta=0.5, rho=0.75, num_tokens=20, token_dim=8, feature_dim=8, has_relevance=False),
        {},
    ),
    "fp16": (
        dict(budget=6, kappa=0.5, num_tokens=16, token_dim=8, feature_dim=12, dtype=torch.float16),
        dict(feature_dtype=torch.float16, score_dtype=torch.float16),
    ),
    "fp16_tokens_only": (
        dict(budget=9, alpha=2.5, num_tokens=18, token_dim=5, feature_dim=7, dtype=torch.float16),
        {},
    ),
    "identity": (dict(budget=15, num_tokens=12, token_dim=4, feature_dim=6), {}),
    "budget_one": (dict(budget=1, num_tokens=10, token_dim=4, feature_dim=6, has_relevance=False), {}),
    "prefix_rounding": (
        dict(budget=6, beta=1.0, rho=1.0, num_tokens=12, token_dim=4, feature_dim=6, has_relevance=False),
        {},
    ),
}
CASES_PER_SETTING = 24
TOKEN_ATTRS = ("budget", "alpha", "beta", "rho", "kappa")


def split(name):
    build, dtypes = SETTINGS[name]
    attributes = fsr_node_attributes(**{k: v for k, v in build.items() if k in TOKEN_ATTRS})
    return build, dtypes, attributes


@functools.lru_cache(maxsize=None)
def function(name):
    build, _, _ = split(name)
    return build_fsr_function(**build)


@functools.lru_cache(maxsize=None)
def model(name):
    build, dtypes, _ = split(name)
    return make_fsr_model(**build, **dtypes, function=function(name))


@functools.lru_cache(maxsize=None)
def session(name):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model(name).SerializeToString(), options, providers=["CPUExecutionProvider"])


def cases(name):
    """Inputs for one setting: every pattern, batch 1, 2, 3 in turn, one session."""
    build, dtypes, _ = split(name)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    patterns = ["cumsum_rounding"] if name == "prefix_rounding" else [
        p for p in INPUT_PATTERNS if p != "cumsum_rounding"
    ]
    for i in range(CASES_PER_SETTING):
        yield make_fsr_inputs(
            patterns[i % len(patterns)],
            batch=1 + i % 3,
            num_tokens=build["num_tokens"],
            token_dim=build["token_dim"],
            feature_dim=build["feature_dim"],
            generator=g,
            has_relevance=build.get("has_relevance", True),
            dtype=build.get("dtype", torch.float32),
            feature_dtype=dtypes.get("feature_dtype", torch.float32),
            score_dtype=dtypes.get("score_dtype", torch.float32),
        )


@pytest.mark.parametrize("name", list(SETTINGS))
def test_function_signature(name):
    fn, opsets = function(name)
    assert (fn.domain, fn.name) == (FSR_DOMAIN, FSR_OP) == ("fsr", "FocusScanRefine")
    assert list(fn.input) == list(FSR_INPUTS) == ["tokens", "features", "saliency", "relevance"]
    assert list(fn.output) == list(FSR_OUTPUTS) == ["pruned", "kept_indices"]
    assert list(fn.attribute) == list(FSR_ATTRIBUTES) == ["budget", "alpha", "beta", "rho", "kappa"]
    assert {(o.domain, o.version) for o in opsets} == {("", 18), ("fsr", 1)}
    assert {(o.domain, o.version) for o in fn.opset_import} == {("", 18)}
    build, _, attributes = split(name)
    settings = fsr_function_settings(fn)
    assert settings["budget"] == str(attributes["budget"]) and settings["num_tokens"] == str(build["num_tokens"])

    # The body: standard ops only, SSA, unique node names, TensorRT-friendly.
    assert all(node.domain == "" for node in fn.node)
    outputs = [out for node in fn.node for out in node.output]
    assert len(outputs) == len(set(outputs))
    assert not set(outputs) & set(fn.input)
    names = [node.name for node in fn.node]
    assert all(names) and len(names) == len(set(names))
    ops = {node.op_type for node in fn.node}
    assert not ops & {"Loop", "Scan", "If", "SequenceConstruct", "SequenceAt", "ConcatFromSequence"}
    constants = {out: node for node in fn.node if node.op_type == "Constant" for out in node.output}
    for node in fn.node:
        if node.op_type == "TopK":
            k = onnx.numpy_helper.to_array(constants[node.input[1]].attribute[0].t)
            assert int(k.max()) <= 3840
    if not build.get("has_relevance", True):
        assert "relevance" not in {i for node in fn.node for i in node.input}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_model_is_valid(name):
    m = model(name)
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 10
    assert len(m.graph.node) == 1 and len(m.functions) == 1
    node = m.graph.node[0]
    assert (node.domain, node.op_type) == ("fsr", "FocusScanRefine")
    build, _, attributes = split(name)
    node_attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node_attributes.keys() == attributes.keys()
    for key, value in attributes.items():  # float attributes are stored as float32
        assert node_attributes[key] == pytest.approx(value, rel=1e-7)
    expected_inputs = ["tokens", "features", "saliency", "relevance" if build.get("has_relevance", True) else ""]
    assert list(node.input) == expected_inputs
    assert list(node.output) == ["pruned", "kept_indices"]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_onnxruntime_matches_reference(name):
    build, _, attributes = split(name)
    sess = session(name)
    batches = set()
    for inputs in cases(name):
        feed = {key: value.numpy() for key, value in inputs.items() if value is not None}
        pruned, kept = sess.run(None, feed)
        expected, expected_kept = focus_scan_refine_reference(**inputs, **attributes)
        batches.add(kept.shape[0])
        assert kept.dtype == np.int64
        np.testing.assert_array_equal(kept, expected_kept.numpy())
        assert pruned.dtype == expected.numpy().dtype
        if expected.dtype == torch.float32:
            np.testing.assert_allclose(pruned, expected.numpy(), atol=1e-5, rtol=1e-5)
        else:
            np.testing.assert_allclose(
                pruned.astype(np.float32), expected.float().numpy(), atol=1e-3, rtol=1e-3
            )
    assert batches == {1, 2, 3}  # one model, dynamic batch


def test_model_rejects_function_built_for_other_settings():
    build, dtypes, _ = split("default")
    with pytest.raises(ValueError, match="built for other settings"):
        make_fsr_model(**{**build, "budget": 9}, function=function("default"))


def test_onnxruntime_topk_puts_lower_index_first_on_ties():
    # The spec leans on this ONNX TopK rule; the function body does not (it ranks with an
    # [N, N] comparison), but other code in the project may.
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"])],
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, [6]),
        ],
        [helper.make_tensor("k", TensorProto.INT64, [1], [6])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    _, indices = sess.run(None, {"x": np.array([0.5, 1, 0.5, 1, 0.5, 0], np.float32)})
    assert indices.tolist() == [1, 3, 0, 2, 4, 5]
