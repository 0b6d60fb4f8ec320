"""fsr::VisionZip: budget split, reference, fixed module, ONNX function (ONNX Runtime,
TensorRT-RTX build) and the CLIP-layer input helper.

The ONNX function and the fixed module are checked against the readable reference on
random cases: ties in attention, constant attention, duplicate and zero keys, batch 1-4,
token counts T = 1 + N from 2 to 2,881 with one session per input dtype (dynamic N), many
(dominant, contextual) pairs (one function body serving every node of a model), fp16 and
bf16 hidden states. Indices must be identical; values within 1e-5 (float32 hidden states)
or one rounding step of the hidden states' dtype (fp16 / bf16; see pruning/visionzip.md).
"""

from __future__ import annotations

import functools
import os
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fsr.errors import FsrError
from fsr.pruning.visionzip import (
    VISIONZIP_ATTRIBUTES,
    VISIONZIP_BUDGETS,
    VISIONZIP_INPUTS,
    VISIONZIP_OUTPUTS,
    VisionZipError,
    VisionZipFixed,
    clip_layer_visionzip_inputs,
    unit_keys,
    visionzip_output_count,
    visionzip_reference,
    visionzip_split,
)
from fsr.pruning.visionzip_onnx import (
    build_visionzip_function,
    check_visionzip_nodes,
    make_visionzip_model,
    onnx_dtype,
    visionzip_function,
)

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Many tiny tensor ops: with other processes on the 2 cores, a second torch thread
    only waits (about 10x slower here). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- random cases ----------------------------------------------------------------------------

PATTERNS = (
    "generic",  # hidden, keys ~ N(0, 1); attention = head-summed softmax probabilities
    "attention_ties",  # attention quantised to {0, .25, .5, .75}: ties at the dominant boundary
    "constant_attention",  # every patch scores the same: dominant = the lowest indices
    "peaky",  # a few spikes over a near-flat floor
    "duplicate_keys",  # keys drawn from a few distinct rows: exact similarity ties between anchors
    "constant_keys",  # one key for every token: every anchor ties, the first takes every member
    "zero_keys",  # some key rows zero (one batch row all zero): similarity 0, first anchor wins
    "clustered_keys",  # keys around a few centres: many close similarities
)

#: (dominant, contextual) pairs every model carries, one node each: the spec's table, the
#: NeXT per-crop splits, small and degenerate ones (dominant = 1: no dominant patch).
PAIRS = (
    (54, 10), (108, 20), (162, 30), (27, 5),
    (1, 1), (1, 3), (2, 1), (2, 2), (3, 1), (3, 4), (5, 2), (6, 6), (9, 3), (16, 1), (20, 7), (40, 40),
)

#: (hidden_states, cls_attention, keys) dtypes; one session each.
DTYPES = {
    "fp32": (torch.float32, torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float32, torch.float32),
    "fp16_all": (torch.float16, torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.float32, torch.float32),
}
#: Input sets per dtype; each is run through every node of `PAIRS`.
INPUT_SETS = {"fp32": 40, "fp16": 10, "fp16_all": 6, "bf16": 6}


def make_inputs(pattern, *, batch, num_tokens, width, key_width, generator, dtypes=DTYPES["fp32"]):
    b, t, g = batch, num_tokens, generator
    hidden = torch.randn(b, t, width, generator=g)
    attention = torch.softmax(torch.randn(b, 4, t, generator=g) * 2, dim=-1).sum(dim=1)  # 4 heads summed
    keys = torch.randn(b, t, key_width, generator=g)
    if pattern == "attention_ties":
        attention = torch.randint(0, 4, (b, t), generator=g).float() / 4
    elif pattern == "constant_attention":
        attention = torch.full((b, t), 0.5)
    elif pattern == "peaky":
        attention = torch.rand(b, t, generator=g) * 1e-3
        for row in range(b):
            spikes = torch.randperm(t, generator=g)[: max(1, t // 10)]
            attention[row, spikes] = 1 + torch.rand(len(spikes), generator=g)
    elif pattern == "duplicate_keys":
        distinct = torch.randn(b, max(2, t // 8), key_width, generator=g)
        pick = torch.randint(0, distinct.shape[1], (b, t), generator=g)
        keys = torch.gather(distinct, 1, pick.unsqueeze(-1).expand(-1, -1, key_width))
    elif pattern == "constant_keys":
        keys = torch.randn(b, 1, key_width, generator=g).expand(b, t, key_width).clone()
    elif pattern == "zero_keys":
        keys[torch.rand(b, t, generator=g) < 0.3] = 0
        keys[0] = 0
    elif pattern == "clustered_keys":
        centres = torch.randn(b, 3, key_width, generator=g)
        member = torch.randint(0, 3, (b, t), generator=g)
        keys = torch.gather(centres, 1, member.unsqueeze(-1).expand(-1, -1, key_width))
        keys = keys + 0.05 * torch.randn(b, t, key_width, generator=g)
    attention[:, 0] = 4.0  # the [CLS] self-attention column is never a candidate
    hidden_dtype, attention_dtype, key_dtype = dtypes
    return hidden.to(hidden_dtype), attention.to(attention_dtype), keys.to(key_dtype)


def _sizes(i: int, g: torch.Generator) -> tuple[int, int]:
    """(batch, T): T = 1 + N cycles through small, medium, LLaVA-1.5 (577) and a NeXT-size row."""
    batch = 1 + i % 4
    kind = i % 10
    if kind in (0, 1, 2):
        t = int(torch.randint(2, 10, (), generator=g))
    elif kind in (3, 4, 5, 6):
        t = int(torch.randint(10, 120, (), generator=g))
    elif kind in (7, 8):
        t = 577
        batch = min(batch, 2)
    else:
        t = 2881 if i % 20 == 9 else int(torch.randint(120, 700, (), generator=g))
        batch = 1
    return batch, t


@functools.lru_cache(maxsize=None)
def input_sets(dtype_name: str) -> list[tuple]:
    g = torch.Generator().manual_seed(zlib.crc32(dtype_name.encode()))
    sets = []
    for i in range(INPUT_SETS[dtype_name]):
        batch, t = _sizes(i, g)
        pattern = PATTERNS[i % len(PATTERNS)]
        width = int(torch.randint(1, 24, (), generator=g))
        key_width = int(torch.randint(1, 12, (), generator=g))
        inputs = make_inputs(pattern, batch=batch, num_tokens=t, width=width, key_width=key_width,
                             generator=g, dtypes=DTYPES[dtype_name])
        sets.append((f"{dtype_name}-{i}-{pattern}-b{batch}-t{t}", inputs))
    return sets


def multi_node_model(dtypes, pairs=PAIRS) -> onnx.ModelProto:
    """One model, one function body, one fsr.VisionZip node per (dominant, contextual) pair.

    bfloat16 hidden states (numpy has no bfloat16) enter as float32 holding bfloat16 values
    and are cast in the graph; the bfloat16 tokens leave cast to float32 (both lossless).
    """
    fn, opsets = visionzip_function()
    hidden_dtype, attention_dtype, key_dtype = dtypes
    bf16 = hidden_dtype == torch.bfloat16
    feed_dtype = torch.float32 if bf16 else hidden_dtype
    inputs = [
        helper.make_tensor_value_info("hidden_states", onnx_dtype(feed_dtype), ["batch", "tokens", "channels"]),
        helper.make_tensor_value_info("cls_attention", onnx_dtype(attention_dtype), ["batch", "tokens"]),
        helper.make_tensor_value_info("keys", onnx_dtype(key_dtype), ["batch", "tokens", "key_dim"]),
    ]
    node_inputs = list(VISIONZIP_INPUTS)
    nodes, outputs = [], []
    if bf16:
        nodes.append(helper.make_node("Cast", ["hidden_states"], ["hidden_bf16"], to=TensorProto.BFLOAT16))
        node_inputs[0] = "hidden_bf16"
    for d, c in pairs:
        names = [f"tokens_{d}_{c}", f"kept_{d}_{c}"]
        produced = [f"tokens_bf16_{d}_{c}", names[1]] if bf16 else names
        nodes.append(helper.make_node("VisionZip", node_inputs, produced, name=f"visionzip_{d}_{c}",
                                      domain="fsr", dominant=d, contextual=c))
        if bf16:
            nodes.append(helper.make_node("Cast", [produced[0]], [names[0]], to=TensorProto.FLOAT))
        outputs += [helper.make_tensor_value_info(names[0], onnx_dtype(feed_dtype), None),
                    helper.make_tensor_value_info(names[1], TensorProto.INT64, None)]
    graph = helper.make_graph(nodes, "visionzip_pairs", inputs, outputs)
    return helper.make_model(graph, opset_imports=opsets, functions=[fn], ir_version=10)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feed(inputs) -> dict:
    return {name: (x.float() if x.dtype == torch.bfloat16 else x).numpy() for name, x in zip(VISIONZIP_INPUTS, inputs)}


def _as_float32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32) if not isinstance(x, torch.Tensor) else x.float().numpy()


def assert_values_close(actual, expected: torch.Tensor, name: str):
    """float32: within 1e-5. fp16/bf16: within one rounding step of that dtype (the float32
    means are summed in another order, which can move a value across a rounding boundary)."""
    a, e = _as_float32(actual), expected.float().numpy()
    if expected.dtype == torch.float32:
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=0, err_msg=name)
    else:
        ulp = torch.finfo(expected.dtype).eps  # relative spacing at 1
        np.testing.assert_allclose(a, e, atol=ulp, rtol=ulp, err_msg=name)


@functools.lru_cache(maxsize=None)
def expected(dtype_name: str):
    """[(case name, inputs, {(d, c): (tokens, kept)})] from the readable reference."""
    out = []
    for name, inputs in input_sets(dtype_name):
        results = {pair: visionzip_reference(*inputs, dominant=pair[0], contextual=pair[1]) for pair in PAIRS}
        out.append((name, inputs, results))
    return out


# -- budget split and validation -------------------------------------------------------------


def test_budget_split_reproduces_the_spec_table_and_next_crops():
    for budget, pair in VISIONZIP_BUDGETS.items():
        assert visionzip_split(budget) == pair
    assert visionzip_split(64) == (54, 10) and visionzip_split(128) == (108, 20) and visionzip_split(192) == (162, 30)
    # LLaVA-NeXT: 640 / 320 / 160 over 5 crops.
    assert [visionzip_split(total // 5) for total in (640, 320, 160)] == [(108, 20), (54, 10), (27, 5)]
    for budget in range(2, 4000):
        dominant, contextual = visionzip_split(budget)
        assert dominant + contextual == budget and dominant >= 1 and contextual >= 1
        assert abs(contextual - budget * 5 / 32) <= 0.5 or contextual == 1
    assert visionzip_split(2) == (1, 1) and visionzip_split(10) == (8, 2)


@pytest.mark.parametrize("budget", [1, 0, -5, 2.0, True, "64", None])
def test_budget_split_refuses_what_it_cannot_split(budget):
    with pytest.raises(VisionZipError, match="budget") as info:
        visionzip_split(budget)
    assert isinstance(info.value, FsrError)


@pytest.mark.parametrize("dominant, contextual, match", [
    (0, 10, "dominant must be an int >= 1"), (54, 0, "contextual must be an int >= 1"),
    (True, 1, "dominant"), (54.0, 10, "dominant"), (5, -1, "contextual"),
])
def test_attributes_are_validated(dominant, contextual, match):
    with pytest.raises(VisionZipError, match=match):
        VisionZipFixed(dominant, contextual)
    with pytest.raises(VisionZipError, match=match):
        make_visionzip_model(dominant=dominant, contextual=contextual)


def test_inputs_are_validated_with_messages():
    x, a, k = torch.zeros(2, 9, 4), torch.zeros(2, 9), torch.zeros(2, 9, 3)
    for bad, match in [
        ((x[0], a, k), "hidden_states must have 3 dims"),
        ((x, a[:, :8], k), r"cls_attention has shape \(2, 8\)"),
        ((x, a, k[:1]), r"keys has shape \(1, 9, 3\)"),
        ((x, a.long(), k), "cls_attention must be floating point"),
        ((x[:, :0], a[:, :0], k[:, :0]), r"at least the \[CLS\] row"),
        ((x, a, k[..., :0]), "keys needs at least one channel"),
    ]:
        with pytest.raises(VisionZipError, match=match):
            visionzip_reference(*bad, dominant=3, contextual=2)
        with pytest.raises(VisionZipError, match=match):
            VisionZipFixed(3, 2)(*bad)
    nan = a.clone()
    nan[1, 4] = float("nan")
    with pytest.raises(VisionZipError, match="NaN"):
        visionzip_reference(x, nan, k, dominant=3, contextual=2)


# -- the reference follows the spec ----------------------------------------------------------


def test_reference_worked_example():
    # T = 9 (CLS + 8 patches), dominant 3 (CLS + 2), contextual 2.
    attention = torch.tensor([[9.0, 0.1, 0.7, 0.2, 0.7, 0.3, 0.05, 0.9, 0.0]])
    hidden = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1) * torch.ones(1, 1, 2)
    keys = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [1, 0.1], [1, 0], [0, 1], [0.1, 1], [1, 0], [0, 0]]])
    tokens, kept, info = visionzip_reference(hidden, attention, keys, dominant=3, contextual=2, details=True)
    # Patch scores: 7 (0.9) first, then 2 and 4 tie at 0.7: the lower index (2) wins.
    assert info.dominant == [[0, 2, 7]]
    # Rm = [1, 3, 4, 5, 6, 8], step = 6 // 2 = 3: anchors at positions 0 and 3 -> tokens 1 and 5.
    assert info.anchors == [[1, 5]]
    # 3 and 4 point like anchor 1 ([1, 0]); 6 like anchor 5; 8 has a zero key: similarity 0 to
    # both anchors, so it goes to the first anchor.
    assert info.members == [{1: [3, 4, 8], 5: [6]}]
    assert kept.tolist() == [[0, 2, 7, 1, 5]]
    expected_tokens = [0, 2, 7, 1 + (3 + 4 + 8) / 3, 5 + 6]
    assert tokens[0, :, 0].tolist() == pytest.approx(expected_tokens)


def test_reference_spec_numbers_for_llava_15():
    # 64 tokens: |Rm| = 577 - 54 = 523, step 52, anchors at list positions 0, 52, ..., 468.
    g = torch.Generator().manual_seed(3)
    x, a, k = make_inputs("generic", batch=1, num_tokens=577, width=8, key_width=4, generator=g)
    tokens, kept, info = visionzip_reference(x, a, k, dominant=54, contextual=10, details=True)
    assert tokens.shape == (1, 64, 8) and kept.shape == (1, 64)
    rest = [j for j in range(577) if j not in set(info.dominant[0])]
    assert len(rest) == 523 and info.anchors[0] == [rest[p] for p in range(0, 469, 52)]
    assert sum(len(m) for m in info.members[0].values()) == 523 - 10
    # The dominant patches are the 53 highest scores, in ascending order, [CLS] first.
    top = torch.topk(a[0, 1:], 53).indices + 1
    assert info.dominant[0] == [0] + sorted(top.tolist())
    assert torch.equal(tokens[0, :54], x[0, kept[0, :54]])


def test_identity_when_nothing_is_dropped():
    g = torch.Generator().manual_seed(4)
    x, a, k = make_inputs("generic", batch=3, num_tokens=12, width=5, key_width=3, generator=g)
    for d, c in [(11, 1), (6, 6), (20, 3), (1, 11), (12, 12)]:
        assert visionzip_output_count(d, c, 12) == 12
        tokens, kept = visionzip_reference(x, a, k, dominant=d, contextual=c)
        assert torch.equal(tokens, x) and kept.tolist() == [list(range(12))] * 3
        tokens, kept = VisionZipFixed(d, c)(x, a, k)
        assert torch.equal(tokens, x) and kept.tolist() == [list(range(12))] * 3
    # The [CLS] row alone (N = 0) is the identity too, in every form.
    one = (x[:, :1], a[:, :1], k[:, :1])
    assert torch.equal(visionzip_reference(*one, dominant=1, contextual=1)[0], x[:, :1])
    assert VisionZipFixed(1, 1)(*one)[1].tolist() == [[0]] * 3
    # One token fewer than T: the spec's path, every token kept, order [CLS, dominant, anchors].
    tokens, kept = visionzip_reference(x, a, k, dominant=6, contextual=5)
    assert kept.shape == (3, 11) and visionzip_output_count(6, 5, 12) == 11


def test_zero_keys_normalise_to_zero():
    keys = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]]])
    unit = unit_keys(keys)
    assert unit.tolist() == torch.tensor([[[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]]).tolist()  # float32 values
    assert unit.dtype == torch.float32


# -- fixed module and ONNX function against the reference ------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_fixed_module_matches_reference(dtype_name):
    for name, inputs, results in expected(dtype_name):
        for (d, c), (tokens, kept) in results.items():
            got_tokens, got_kept = VisionZipFixed(d, c)(*inputs)
            assert got_kept.dtype == torch.int64 and got_tokens.dtype == tokens.dtype
            assert torch.equal(got_kept, kept), f"{name} d={d} c={c}"
            dominant = min(d, kept.shape[1])
            assert torch.equal(got_tokens[:, :dominant], tokens[:, :dominant])  # gathered bit for bit
            assert_values_close(got_tokens, tokens, f"{name} d={d} c={c}")


@functools.lru_cache(maxsize=None)
def pair_session(dtype_name: str, pair: tuple[int, int]) -> ort.InferenceSession:
    """A one-node session (ONNX Runtime creates one in ~0.05 s; a 16-node model takes ~2 s)."""
    return _session(multi_node_model(DTYPES[dtype_name], pairs=(pair,)))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_onnxruntime_matches_reference(dtype_name):
    compared = pruned = 0
    batches, token_counts = set(), set()
    for name, inputs, results in expected(dtype_name):
        batches.add(inputs[0].shape[0])
        token_counts.add(inputs[0].shape[1])
        for (d, c), (tokens, kept) in results.items():
            got_tokens, got_kept = pair_session(dtype_name, (d, c)).run(None, _feed(inputs))
            assert got_kept.dtype == np.int64
            np.testing.assert_array_equal(got_kept, kept.numpy(), err_msg=f"{name} d={d} c={c}")
            assert got_tokens.shape == tuple(tokens.shape)
            dominant = min(d, kept.shape[1])
            np.testing.assert_array_equal(_as_float32(got_tokens[:, :dominant]), tokens[:, :dominant].float().numpy())
            assert_values_close(got_tokens, tokens, f"{name} d={d} c={c}")
            compared += 1
            pruned += d + c < inputs[0].shape[1]
    assert len(batches) >= 3 and len(token_counts) >= 5  # one session: dynamic batch and N
    if dtype_name == "fp32":
        assert compared >= 500 and pruned >= 300, (compared, pruned)


def test_one_function_body_serves_every_node_of_a_model():
    pairs = ((54, 10), (2, 1), (20, 7), (1, 3))
    session = _session(multi_node_model(DTYPES["fp32"], pairs=pairs))
    names = [o.name for o in session.get_outputs()]
    for name, inputs, results in expected("fp32")[:8]:
        outputs = dict(zip(names, session.run(None, _feed(inputs))))
        for d, c in pairs:
            tokens, kept = results[(d, c)]
            np.testing.assert_array_equal(outputs[f"kept_{d}_{c}"], kept.numpy(), err_msg=f"{name} d={d} c={c}")
            assert_values_close(outputs[f"tokens_{d}_{c}"], tokens, f"{name} d={d} c={c}")


def test_function_signature_and_body():
    fn, opsets = build_visionzip_function()
    assert (fn.domain, fn.name) == ("fsr", "VisionZip")
    assert tuple(fn.input) == VISIONZIP_INPUTS == ("hidden_states", "cls_attention", "keys")
    assert tuple(fn.output) == VISIONZIP_OUTPUTS == ("tokens", "kept_indices")
    assert tuple(fn.attribute) == VISIONZIP_ATTRIBUTES == ("dominant", "contextual")
    assert not fn.attribute_proto  # both attributes are required
    assert {(o.domain, o.version) for o in opsets} == {("", 18), ("fsr", 1)}
    assert {(o.domain, o.version) for o in fn.opset_import} == {("", 18)}
    assert all(node.domain == "" for node in fn.node)
    ops = {node.op_type for node in fn.node}
    assert not ops & {"Loop", "Scan", "If", "NonZero", "SequenceConstruct", "ConcatFromSequence"}
    # The attributes reach the body only through references: nothing is baked in.
    refs = sorted(a.ref_attr_name for node in fn.node for a in node.attribute if a.ref_attr_name)
    assert refs == ["contextual", "dominant"]
    outputs = [out for node in fn.node for out in node.output]
    assert len(outputs) == len(set(outputs))


def test_one_node_model_is_valid_and_its_attributes_are_what_runs():
    import onnx_graphsurgeon as gs

    from fsr.onnx_io import IR_VERSION

    model = make_visionzip_model(dominant=54, contextual=10)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10 and len(model.graph.node) == 1 and len(model.functions) == 1
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == ("fsr", "VisionZip")
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"dominant": 54, "contextual": 10}
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == \
        ["batch", "kept", "channels"]

    # A deployment engineer edits the node with onnx-graphsurgeon: the new values run.
    graph = gs.import_onnx(model)
    graph.nodes[0].attrs.update(dominant=7, contextual=3)
    edited = gs.export_onnx(graph)
    edited.ir_version = IR_VERSION
    session = _session(edited)
    g = torch.Generator().manual_seed(5)
    for t in (1, 2, 5, 11, 40, 577, 1500):  # one session, any N (T = 1: [CLS] alone, the identity)
        inputs = make_inputs("generic", batch=2, num_tokens=t, width=6, key_width=4, generator=g)
        tokens, kept = session.run(None, _feed(inputs))
        ref_tokens, ref_kept = visionzip_reference(*inputs, dominant=7, contextual=3)
        assert kept.shape == (2, min(10, t))
        np.testing.assert_array_equal(kept, ref_kept.numpy())
        np.testing.assert_allclose(tokens, ref_tokens.numpy(), atol=1e-5, rtol=0)


def test_node_checker_names_the_node_and_the_rule():
    model = make_visionzip_model(dominant=54, contextual=10)
    assert check_visionzip_nodes(model) == 1
    assert check_visionzip_nodes(multi_node_model(DTYPES["fp32"], pairs=((3, 2), (5, 1)))) == 2

    def edited(change):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        change(m)
        return m

    def set_attr(name, value):
        def change(m):
            node = m.graph.node[0]
            kept = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend(kept)
            if value is not None:
                node.attribute.append(helper.make_attribute(name, value))
        return change

    for change, match in [
        (set_attr("dominant", 0), "node visionzip: VisionZip attribute dominant must be an int >= 1"),
        (set_attr("contextual", -2), "contextual must be an int >= 1"),
        (set_attr("contextual", None), "lacks the required int attribute 'contextual'"),
        (set_attr("dominant", 5.0), "attribute 'dominant' must be an int, got FLOAT"),
        (set_attr("budget", 64), r"unknown attributes \['budget'\]"),
        (lambda m: m.graph.node[0].input.pop(), "it needs"),
        (lambda m: m.functions.pop(), "not the fsr.VisionZip function"),
    ]:
        with pytest.raises(VisionZipError, match=match):
            check_visionzip_nodes(edited(change))


def test_static_shapes_give_a_static_output_count():
    model = make_visionzip_model(dominant=54, contextual=10, num_tokens=577, hidden_dim=16, key_dim=8)
    dims = [d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim[1:]]
    assert dims == [64]
    inferred = onnx.shape_inference.infer_shapes(model)
    assert inferred.graph.output[0].type.tensor_type.shape.dim[2].dim_value == 16


def test_tensorrt_rtx_builds_the_one_node_model_with_dynamic_tokens(tmp_path):
    from fsr.engines.loader import EngineBytesFromOnnx
    from fsr.engines.profiles import Profile
    from fsr.engines.trt_import import TensorRTMissing, import_tensorrt

    try:
        trt = import_tensorrt()
    except TensorRTMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs tensorrt-rtx (the test extra) and must build engines: {exc}")
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc}")
    for dtype in (torch.float32, torch.float16):
        path = tmp_path / f"visionzip_{str(dtype)[6:]}.onnx"
        onnx.save(make_visionzip_model(dominant=54, contextual=10, hidden_dim=64, key_dim=16, dtype=dtype), path)
        profile = Profile("visionzip", {  # T = 1 + N from 2 to 2,881 (LLaVA-NeXT's 5 x 576 + 1)
            "hidden_states": ([1, 2, 64], [2, 577, 64], [4, 2881, 64]),
            "cls_attention": ([1, 2], [2, 577], [4, 2881]),
            "keys": ([1, 2, 16], [2, 577, 16], [4, 2881, 16]),
        })
        build = EngineBytesFromOnnx(path, [profile], "fp16" if dtype == torch.float16 else "fp32", trt=trt)
        assert len(build()) > 0

    # The parser reads each node's attributes: with T = 577 fixed, K is min(d + c, 577).
    t = trt.module
    for (d, c), k in {(54, 10): 64, (9, 3): 12, (600, 10): 577}.items():
        model = make_visionzip_model(dominant=d, contextual=c, num_tokens=577, hidden_dim=64, key_dim=16)
        logger = t.Logger(t.Logger.ERROR)
        network = t.Builder(logger).create_network(1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = t.OnnxParser(network, logger)
        assert parser.parse(model.SerializeToString())
        assert [tuple(network.get_output(i).shape) for i in range(2)] == [(-1, k, 64), (-1, k)]


# -- inputs from a Hugging Face CLIP layer ---------------------------------------------------


@functools.lru_cache(maxsize=None)
def clip_vision(attn_implementation: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval()


def test_clip_layer_inputs_match_hugging_face_attentions():
    model = clip_vision("eager")
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        layer_index = 1  # LLaVA's -2 of a 3-layer tower
        layer = model.encoder.layers[layer_index]
        inputs = clip_layer_visionzip_inputs(layer, out.hidden_states[layer_index])
        attn = layer.self_attn
        x = layer.layer_norm1(out.hidden_states[layer_index])
        keys = attn.k_proj(x).view(3, 17, attn.num_heads, attn.head_dim)
    assert torch.equal(inputs.hidden_states, out.hidden_states[layer_index + 1])  # = hidden_states[-2]
    expected_attention = out.attentions[layer_index][:, :, 0, :].sum(dim=1)  # [B, T], column 0 = CLS
    torch.testing.assert_close(inputs.cls_attention, expected_attention, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inputs.keys, keys.mean(dim=2), atol=1e-6, rtol=1e-6)
    assert inputs.cls_attention.shape == (3, 17) and inputs.keys.shape == (3, 17, 8)
    assert not attn.k_proj._forward_hooks and not attn.q_proj._forward_hooks  # hooks removed

    # Same inputs from an SDPA tower (the layer's attention matrix is never requested).
    sdpa = clip_vision("sdpa")
    with torch.no_grad():
        h = sdpa(pixel_values=pixels, output_hidden_states=True).hidden_states
        again = clip_layer_visionzip_inputs(sdpa.encoder.layers[layer_index], h[layer_index])
    torch.testing.assert_close(again.cls_attention, inputs.cls_attention, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again.hidden_states, h[layer_index + 1], atol=0, rtol=0)
    tokens, kept = visionzip_reference(*again, dominant=5, contextual=3)
    assert tokens.shape == (3, 8, 32) and kept[:, 0].tolist() == [0, 0, 0]


def test_vision_module_with_the_torch_op_exports_to_one_visionzip_node():
    """CLIP layer -> torch.ops.fsr.visionzip -> projector, traced with dynamo: the op becomes
    one fsr.VisionZip node (attributes from the call, the body added afterwards) before the
    projector; the hooks of the input helper trace too."""
    import onnx_graphsurgeon as gs

    from fsr.onnx_io import IR_VERSION, quiet_exporter
    from fsr.pruning.visionzip_onnx import add_visionzip_function, visionzip_translation_table

    layer = clip_vision("sdpa").encoder.layers[1]
    projector = torch.nn.Linear(32, 12)

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.projector = layer, projector

        def forward(self, hidden):
            inputs = clip_layer_visionzip_inputs(self.layer, hidden)
            tokens, kept = torch.ops.fsr.visionzip(*inputs, 5, 3)
            return self.projector(tokens), kept

    hidden = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(7))
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(Vision().eval(), (hidden,), dynamo=True, opset_version=18,
                                    input_names=["hidden"], output_names=["image_tokens", "kept_indices"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                                    custom_translation_table=visionzip_translation_table())
    model = program.model_proto
    assert add_visionzip_function(model) == 1
    model.ir_version = IR_VERSION
    [node] = [n for n in model.graph.node if n.op_type == "VisionZip"]
    assert node.domain == "fsr" and {a.name: a.i for a in node.attribute} == {"dominant": 5, "contextual": 3}
    assert not any(n.op_type == "TopK" for n in model.graph.node)  # the body lives in the function only
    assert [d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim][1:] == [8]

    hidden3 = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        inputs = clip_layer_visionzip_inputs(layer, hidden3)
    for dominant, contextual, graph_model in [(5, 3, model), (2, 6, None)]:
        if graph_model is None:  # the same export with the node's attributes edited
            graph = gs.import_onnx(model)
            [vz] = [n for n in graph.nodes if n.op == "VisionZip"]
            vz.attrs.update(dominant=dominant, contextual=contextual)
            graph_model = gs.export_onnx(graph)
            graph_model.ir_version = IR_VERSION
        got_tokens, got_kept = _session(graph_model).run(None, {"hidden": hidden3.numpy()})
        tokens, kept = visionzip_reference(*inputs, dominant=dominant, contextual=contextual)
        np.testing.assert_array_equal(got_kept, kept.numpy())
        with torch.no_grad():
            np.testing.assert_allclose(got_tokens, projector(tokens).numpy(), atol=1e-5, rtol=1e-5)
    assert not layer.self_attn.k_proj._forward_hooks


def test_torch_op_eager_and_symbolic_shapes():
    g = torch.Generator().manual_seed(9)
    x, a, k = make_inputs("attention_ties", batch=2, num_tokens=30, width=6, key_width=4, generator=g)
    tokens, kept = torch.ops.fsr.visionzip(x, a, k, 9, 3)
    ref_tokens, ref_kept = visionzip_reference(x, a, k, dominant=9, contextual=3)
    assert torch.equal(kept, ref_kept)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=0)
    tokens, kept = torch.ops.fsr.visionzip(x, a, k, 40, 3)  # identity: a copy, not the input
    assert torch.equal(tokens, x) and tokens.data_ptr() != x.data_ptr()
    with pytest.raises(VisionZipError, match="contextual"):
        torch.ops.fsr.visionzip(x, a, k, 9, 0)

    class Op(torch.nn.Module):
        def forward(self, x, a, k):
            return torch.ops.fsr.visionzip(x, a, k, 9, 3)

    tokens_dim = torch.export.Dim("tokens", min=2, max=4096)
    program = torch.export.export(Op(), (x, a, k), dynamic_shapes=({1: tokens_dim}, {1: tokens_dim}, {1: tokens_dim}))
    out = [n for n in program.graph.nodes if n.op == "output"][0].args[0][0].meta["val"]
    assert "Min(12" in str(out.shape[1]) or "min(12" in str(out.shape[1]).lower()
