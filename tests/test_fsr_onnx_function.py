"""The fsr.FocusScanRefine ONNX local function: an operator, not a snapshot.

The body is taken out of an exported ``vision.onnx`` (budget 64, N = 576) and put into
one-node models whose nodes carry other attributes; each model has a dynamic N, and one
ONNX Runtime session per node setting runs every N from 1 to 2,880 against the readable
reference (identical indices, values within 1e-5 / one fp16 step). Also: the signature,
the metadata record, the exact K of keep_ratio, and the checks that refuse bad nodes.
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fsr.pruning import FsrOpError, focus_scan_refine_reference, kept_count
from fsr.pruning.fsr_identity import (
    FSR_ATTRIBUTE_DEFAULTS, FSR_ATTRIBUTES, FSR_DOMAIN, FSR_INPUTS, FSR_OP, FSR_OUTPUTS, float32,
    keep_ratio_parts, kept_count_from_parts,
)
from fsr.pruning.onnx_function import (
    build_fsr_function, check_fsr_model, fsr_function_settings, fsr_node_attributes, make_fsr_model,
)
from fsr.pruning.testing import OPERATOR_SETTINGS, operator_sweep, setting_attributes, setting_dtypes

CASES_PER_SETTING = 85
#: Settings that also run once at N = 576 and N = 2,880 (batch 1): the large N stay few.
LARGE_N = {2: (576, 2880), 7: (2880,), 13: (576,), 19: (2880,), 21: (576,)}
FP32, FP16 = dict(atol=1e-5, rtol=1e-5), dict(atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def exported_function(export_fsr64):
    model = onnx.load(export_fsr64 / "vision.onnx")
    [fn] = [f for f in model.functions if (f.domain, f.name) == (FSR_DOMAIN, FSR_OP)]
    opsets = [helper.make_opsetid(o.domain, o.version) for o in model.opset_import
              if o.domain in ("", FSR_DOMAIN)]
    return fn, opsets


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feed(inputs: dict) -> dict:
    return {k: v.numpy() for k, v in inputs.items() if k in FSR_INPUTS and v is not None}


def test_exported_body_is_the_generic_one(exported_function, export_fsr64):
    """The body in vision.onnx is the op's one body, and its metadata record survived export."""
    fn, _ = exported_function
    settings = fsr_function_settings(fn)
    assert settings == fsr_function_settings(build_fsr_function()[0])
    assert settings["op"] == "fsr::FocusScanRefine" and "ref_attr_name" in settings["attributes"]
    fresh, _ = build_fsr_function()
    assert Counter(n.op_type for n in fn.node) == Counter(n.op_type for n in fresh.node)
    vision = onnx.load(export_fsr64 / "vision.onnx")
    [node] = [n for n in vision.graph.node if n.op_type == FSR_OP]
    assert {a.name for a in node.attribute} == set(FSR_ATTRIBUTES)


def test_function_signature():
    fn, opsets = build_fsr_function()
    assert (fn.domain, fn.name) == (FSR_DOMAIN, FSR_OP) == ("fsr", "FocusScanRefine")
    assert list(fn.input) == list(FSR_INPUTS) == ["tokens", "features", "saliency", "relevance"]
    assert list(fn.output) == list(FSR_OUTPUTS) == ["pruned", "kept_indices"]
    assert list(fn.attribute) == ["budget"]  # required
    defaults = {a.name: helper.get_attribute_value(a) for a in fn.attribute_proto}
    assert defaults == pytest.approx(FSR_ATTRIBUTE_DEFAULTS) and set(defaults) | {"budget"} == set(FSR_ATTRIBUTES)
    assert {(o.domain, o.version) for o in opsets} == {("", 18), ("fsr", 1)}
    assert {(o.domain, o.version) for o in fn.opset_import} == {("", 18)}

    def walk(nodes):
        for node in nodes:
            yield node
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g.node)

    nodes = list(walk(fn.node))
    assert all(node.domain == "" for node in nodes)
    outputs = [out for node in nodes for out in node.output]
    assert len(outputs) == len(set(outputs)) and not set(outputs) & set(fn.input)
    names = [node.name for node in nodes]
    assert all(names) and len(names) == len(set(names))
    ops = {node.op_type for node in nodes}
    # No sequences, no If, no scatter with a reduction TensorRT would ignore, no ArgMax whose tie
    # order would decide a result (the one ArgMin only chooses among slots of the same token).
    assert not ops & {"If", "Scan", "SequenceConstruct", "SequenceAt", "ConcatFromSequence", "ScatterND",
                      "ScatterElements", "ArgMax"}
    assert ops >= {"Loop", "TopK", "CumSum", "MatMul", "Gemm"}
    # Every attribute is read from the node, once.
    refs = [a.ref_attr_name for node in nodes for a in node.attribute if a.ref_attr_name]
    assert sorted(refs) == sorted(FSR_ATTRIBUTES)
    # The body does not grow with anything: a few hundred nodes, loop bodies included.
    assert len(nodes) < 1000


def test_one_body_for_every_budget():
    """Budgets 64 and 640 (or any N) splice the very same function: nothing is specialised."""
    a, _ = build_fsr_function()
    m64 = make_fsr_model(budget=64, num_tokens=576, token_dim=8, feature_dim=8)
    m640 = make_fsr_model(budget=640, num_tokens=2880, token_dim=8, feature_dim=8, keep_ratio=0.25)
    assert m64.functions[0].SerializeToString() == m640.functions[0].SerializeToString() == a.SerializeToString()


def _reference(inputs: dict, attributes: dict, details=False):
    return focus_scan_refine_reference(inputs["tokens"], inputs["features"], inputs["saliency"],
                                       inputs["relevance"], **attributes, details=details)


@pytest.mark.parametrize("index", range(len(OPERATOR_SETTINGS)))
def test_sweep_matches_reference(exported_function, index):
    """One node setting, one session, N from 1 to 2,880: identical indices, close values."""
    setting = OPERATOR_SETTINGS[index]
    attributes = setting_attributes(setting)
    dtypes = setting_dtypes(setting)
    model = make_fsr_model(**attributes, has_relevance=setting.get("relevance", True), function=exported_function,
                           **{k: str(v).removeprefix("torch.") for k, v in dtypes.items()})
    session = _session(model)
    seen = Counter()
    for case in operator_sweep(setting, CASES_PER_SETTING, seed=index, large=LARGE_N.get(index, ())):
        pruned, kept = session.run(None, _feed(case))
        want, want_kept, info = _reference(case, attributes, details=True)
        n = case["tokens"].shape[1]
        k = kept_count(n, attributes["budget"], attributes.get("keep_ratio", 0.0))
        assert kept.shape == (case["tokens"].shape[0], k) and kept.dtype == np.int64, case["name"]
        np.testing.assert_array_equal(kept, want_kept.numpy(), err_msg=case["name"])
        assert pruned.dtype == want.numpy().dtype
        tolerance = FP32 if want.dtype == torch.float32 else FP16
        np.testing.assert_allclose(pruned.astype(np.float32), want.float().numpy(), **tolerance, err_msg=case["name"])
        seen["cases"] += 1
        seen["scan"] += bool((info.focus_count < k).any())
        seen["merge"] += any(info.merged)
        seen["n_over_160"] += n > 160
        seen["identity"] += k == n
    assert seen["cases"] == CASES_PER_SETTING + len(LARGE_N.get(index, ()))
    assert seen["n_over_160"] >= 8 and seen["identity"] >= 1
    ratio = attributes.get("keep_ratio", 0.0)
    if (0 < ratio < 1) or (ratio == 0 and 2 <= attributes["budget"] < 1000):
        assert seen["scan"] >= 5, seen  # Scan really ran
        if attributes.get("kappa", 1.0) > 0:
            assert seen["merge"] >= 3, seen  # and Refine merged


def test_sweep_size():
    assert len(OPERATOR_SETTINGS) * CASES_PER_SETTING + sum(map(len, LARGE_N.values())) >= 2000
    budgets = {s["budget"] for s in OPERATOR_SETTINGS if not s.get("keep_ratio")}
    assert {1, 32, 128, 200} <= budgets and max(budgets) >= 2880
    assert {s.get("keep_ratio", 0.0) for s in OPERATOR_SETTINGS} >= {0.0, 0.1, 0.25, 0.5, 1.0}


@functools.lru_cache(maxsize=None)
def _ratio_session(ratio: float) -> ort.InferenceSession:
    return _session(make_fsr_model(budget=1, keep_ratio=ratio, token_dim=1, feature_dim=1))


def test_keep_ratio_gives_the_exact_k():
    """K = min(N, max(1, floor(r * N))) with the exact product of the float32 r: the integer
    formula the body and the plugin use equals it for every r and N."""
    rng = random.Random(0)
    ratios = [float32(rng.random()) for _ in range(3000)] + [float32(x) for x in (0.1, 0.3, 1 / 3, 0.7, 0.9, 1.0)]
    ratios += [float32(2.0**-e) for e in range(1, 40)] + [float32(np.nextafter(np.float32(0.5), np.float32(0)))]
    for r in ratios:
        hi, lo = keep_ratio_parts(r)
        for n in (1, 2, 3, 7, 576, 1000, 2880, 8192, rng.randrange(1, 2**24)):
            exact = math.floor(Fraction(r) * n)
            assert kept_count_from_parts(n, hi, lo) == exact, (r, n)
    # The ONNX body computes the same K (the output's second dim).
    for r in (0.1, 0.3, 1 / 3, 0.7, float32(np.nextafter(np.float32(0.5), np.float32(1))), 2.0**-30, 1.0):
        session = _ratio_session(r)
        for n in (1, 2, 3, 10, 29, 30, 31, 577, 2879):
            tokens = np.zeros((1, n, 1), np.float32)
            out, kept = session.run(None, {"tokens": tokens, "features": tokens, "saliency": tokens[..., 0],
                                           "relevance": tokens[..., 0]})
            assert kept.shape[1] == kept_count(n, 1, r) == out.shape[1], (r, n)


def _bad_model(change):
    """A one-node model (static N = 8) with one thing changed by ``change(model)``."""
    model = make_fsr_model(budget=4, num_tokens=8, token_dim=3, feature_dim=5)
    change(model)
    return model


def _set_attribute(name, value):
    def change(model):
        node = model.graph.node[0]
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)])
    return change


def _set_input(name, elem=TensorProto.FLOAT, shape=None):
    def change(model):
        value = next(v for v in model.graph.input if v.name == name)
        value.CopyFrom(helper.make_tensor_value_info(name, elem, shape or [d.dim_param or d.dim_value
                                                                           for d in value.type.tensor_type.shape.dim]))
    return change


@pytest.mark.parametrize("change, message", [
    (_set_attribute("budget", 0), r"FocusScanRefine \(node 'focus_scan_refine'\).*attribute budget must be >= 1"),
    (_set_attribute("keep_ratio", 1.5), r"attribute keep_ratio must be in \[0, 1\], got 1.5"),
    (_set_attribute("keep_ratio", -0.25), r"attribute keep_ratio must be in \[0, 1\]"),
    (_set_attribute("alpha", -1.0), r"attribute alpha must be >= 0"),
    (_set_attribute("rho", float("nan")), r"attribute rho must be a finite number"),
    (_set_input("tokens", shape=["batch", 8]), r"input tokens must have rank 3"),
    (_set_input("saliency", shape=["batch", 8, 1]), r"input saliency must have rank 2"),
    (_set_input("tokens", elem=TensorProto.INT64, shape=["batch", 8, 3]), r"input tokens must be float32 or float16"),
    (_set_input("relevance", elem=TensorProto.FLOAT16), r"input relevance must have the dtype of saliency"),
    (_set_input("features", shape=["batch", 9, 5]), r"input features has N = 9 but tokens has N = 8"),
])
def test_bad_nodes_are_refused(change, message):
    model = _bad_model(change)
    with pytest.raises(FsrOpError, match=message):
        check_fsr_model(model)


def test_static_empty_token_count_is_refused():
    with pytest.raises(FsrOpError, match=r"input tokens has N = 0 tokens; the op needs N >= 1"):
        make_fsr_model(budget=4, num_tokens=0, token_dim=3, feature_dim=5)
    with pytest.raises(FsrOpError, match="budget must be >= 1"):
        fsr_node_attributes(budget=0)
    assert check_fsr_model(make_fsr_model(budget=4)) == 1


def test_model_is_valid():
    for has_relevance in (True, False):
        m = make_fsr_model(budget=7, keep_ratio=0.5, has_relevance=has_relevance, dtype="float16")
        onnx.checker.check_model(m, full_check=True)
        assert m.ir_version == 10 and len(m.graph.node) == 1 and len(m.functions) == 1
        node = m.graph.node[0]
        assert list(node.input) == ["tokens", "features", "saliency", "relevance" if has_relevance else ""]
        dims = [d.dim_param for d in m.graph.output[0].type.tensor_type.shape.dim]
        assert dims == ["batch", "num_kept", "token_dim"]


def test_onnxruntime_topk_puts_lower_index_first_on_ties():
    # The function body relies on no TopK tie order (it selects by value, or sorts distinct
    # keys); this pins down the rule ONNX Runtime follows anyway, for other code.
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
