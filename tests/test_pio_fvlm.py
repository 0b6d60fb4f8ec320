"""PIO-FVLM (pruning/pio_fvlm.py, pio_fvlm_fixed.py): schedules, the closed-form gradient
against autograd, the static NMS, the pruning stage, its ONNX export, and a segmented
decoder with pruning stages between segments against the reference generation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fsr.errors import FsrError
from fsr.pruning.pio_fvlm import (
    LLAVA15_SCHEDULES,
    LLAVA15_VE_SCHEDULE_64,
    PioError,
    PioProxy,
    PioSchedule,
    PioStage,
    causal_mask,
    encoder_stage_counts,
    encoder_stage_reference,
    layer_forward,
    llava15_schedule,
    nms_reference,
    parse_pio_schedule,
    pio_generate_reference,
    pio_gradient_reference,
    pio_stage_reference,
    rms_norm,
    supervised_positions,
)
from fsr.pruning.pio_fvlm_fixed import (
    PioEncoderStage,
    PioPruningStage,
    check_stage_inputs,
    descending_rank,
    export_pio_stage,
    nms_static,
    pio_gradient_closed_form,
    supervised_rows,
)

HIDDEN, VOCAB = 32, 50


def llama(*, heads=4, kv_heads=2, bias=False, layers=2, dtype=torch.float64, seed=0, head_dim=None,
          rope=None, hidden=HIDDEN, vocab=VOCAB):
    """A random Llama decoder + LM head with weights scaled so attention and softmax are far from flat."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    extra = {"head_dim": head_dim} if head_dim else {}
    if rope:
        extra["rope_parameters"] = rope
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, attention_bias=bias, mlp_bias=bias,
                      max_position_embeddings=4096, **extra)
    lm = LlamaModel(cfg).eval()
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        for name, p in [*lm.named_parameters(), *head.named_parameters()]:
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 2 and "embed" not in name:
                p.normal_(0, 1.5 * p.shape[1] ** -0.5)
            else:
                p.normal_(0, 0.3 if p.dim() == 1 else 1.0)
    return lm.to(dtype), head.to(dtype)


def left_padded(rows: list[torch.Tensor]):
    """Rows [S_b, D] -> hidden [B, S, D] (padding = zeros on the left), mask, HF positions."""
    length = max(r.shape[0] for r in rows)
    hidden = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.int64)
    for b, r in enumerate(rows):
        hidden[b, length - r.shape[0]:] = r
        mask[b, length - r.shape[0]:] = 1
    return hidden, mask, (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())  # callers pass detached tensors


# ----------------------------------------------------------------------------- schedules


def test_llava15_schedules_and_their_averages():
    assert str(llava15_schedule(64)) == "1:92,10:54,15:22"
    assert str(llava15_schedule(128)) == "1:218,10:128,15:54"
    assert str(llava15_schedule(192)) == "1:344,10:202,15:86"  # ours: 2 * s128 - s64, stage by stage
    for budget, schedule in LLAVA15_SCHEDULES.items():
        assert schedule.layers == (1, 10, 15)
        assert schedule.average(num_layers=32, num_visual=576) == budget
    per_layer = llava15_schedule(64).tokens_per_layer(num_layers=32, num_visual=576)
    assert per_layer == [576] + [92] * 9 + [54] * 5 + [22] * 17
    assert llava15_schedule(64).token_counts(576) == [(576, 92), (92, 54), (54, 22)]
    ve = LLAVA15_VE_SCHEDULE_64
    assert ve.encoder_tokens == 96 and ve.token_counts(576) == [(96, 32)]
    assert ve.average(num_layers=32, num_visual=576) == 64


def test_parse_schedule():
    schedule = parse_pio_schedule(" 1:92, 10 : 54,15:22 ")
    assert schedule == PioSchedule((PioStage(1, 92), PioStage(10, 54), PioStage(15, 22)))
    assert str(schedule) == "1:92,10:54,15:22" and parse_pio_schedule(str(schedule)) == schedule
    assert parse_pio_schedule("16:32", encoder_tokens=96) == LLAVA15_VE_SCHEDULE_64


@pytest.mark.parametrize("text, message", [
    ("", "empty PIO-FVLM schedule"),
    ("  ", "empty PIO-FVLM schedule"),
    ("1-92", "item 1 '1-92' is not 'LAYER:TOKENS'"),
    ("1:92,", "item 2 '' is not 'LAYER:TOKENS'"),
    ("1:92,ten:54", "item 2 'ten:54' is not"),
    ("1:-5", "item 1 '1:-5' is not"),
    ("1:9.5", "is not 'LAYER:TOKENS'"),
    ("0:92", "layers are 1-based"),
    ("1:0", "must keep at least 1 visual token"),
    ("10:54,1:92", "stage 2: layer 1 does not come after layer 10"),
    ("1:92,1:54", "stage 2: layer 1 does not come after layer 1"),
    ("1:54,10:92", "stage 2: keeps 92 visual tokens but only 54 enter it"),
])
def test_schedule_errors_are_clear(text, message):
    with pytest.raises(PioError, match=None) as info:
        parse_pio_schedule(text)
    assert message in str(info.value)
    assert isinstance(info.value, FsrError) and isinstance(info.value, ValueError)


def test_schedule_validation_against_a_model():
    schedule = llava15_schedule(64)
    schedule.validate(num_layers=16, num_visual=576)  # the spec's layers fit a 16-layer LLM
    with pytest.raises(PioError, match="layer 15 is out of range for an LLM with 15 layers"):
        schedule.validate(num_layers=15, num_visual=576)
    with pytest.raises(PioError, match="stage 1 keeps 92 visual tokens but only 64 enter the LLM"):
        schedule.validate(num_layers=32, num_visual=64)
    with pytest.raises(PioError, match="encoder-side stage keeps 600 of 576"):
        parse_pio_schedule("16:32", encoder_tokens=600).validate(num_layers=32, num_visual=576)
    with pytest.raises(PioError, match="encoder stage leaves only 96"):
        parse_pio_schedule("1:96", encoder_tokens=96)
    with pytest.raises(PioError, match="choose one of 64, 128, 192"):
        llava15_schedule(100)
    with pytest.raises(PioError, match="at least one stage"):
        PioSchedule(())


# ----------------------------------------------------------------------------- the reference


def test_reference_proxy_forward_is_the_transformers_layer():
    """In float32 the written-out proxy forward is LlamaDecoderLayer + LlamaRMSNorm bit for bit
    (in float64 only the norms differ: transformers computes them in float32)."""
    lm, head = llama(dtype=torch.float32, bias=True)
    h = torch.randn(1, 11, HIDDEN)
    positions = torch.arange(11)[None]
    cos_sin = lm.rotary_emb(h, positions)
    mask = causal_mask(11, h.dtype)
    layer = lm.layers[1]
    expected = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
    assert torch.equal(layer_forward(layer, h, cos_sin, mask), expected)
    assert torch.equal(rms_norm(lm.norm, expected), lm.norm(expected))
    half = expected.half()
    assert torch.equal(rms_norm(lm.norm.half(), half), lm.norm(half))


def test_supervised_positions():
    assert supervised_positions(10) == [5, 6, 7, 8]  # S-5..S-2: the last prompt position is not supervised
    assert supervised_positions(5) == [0, 1, 2, 3]
    assert supervised_positions(3) == [0, 1]  # clamped at 0, duplicates collapse
    assert supervised_positions(2) == [0]
    with pytest.raises(PioError, match="needs at least 2"):
        supervised_positions(1)
    # The batched form: the same positions for each row alone, shifted by its left padding.
    lengths = [10, 7, 3, 2]
    _, mask, _ = left_padded([torch.zeros(n, 1) for n in lengths])
    positions, onehot, weight = supervised_rows(mask)
    for b, n in enumerate(lengths):
        pad = 10 - n
        unique = sorted({int(p) for p, w in zip(positions[b], weight[b]) if w})
        assert unique == [pad + p for p in supervised_positions(n)]
        assert int(weight[b].sum()) == len(supervised_positions(n))
        assert bool((onehot[b].sum(-1) == 1).all())


# ----------------------------------------------------------------------------- closed form vs autograd

GRADIENT_CASES = [  # heads, kv heads, bias, head_dim, rope
    (4, 2, False, None, None),
    (4, 2, True, None, None),
    (4, 1, True, None, None),
    (2, 2, False, None, None),
    (8, 2, True, 12, None),  # head_dim * heads != hidden
    (4, 2, True, None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
]


@pytest.mark.parametrize("heads, kv_heads, bias, head_dim, rope", GRADIENT_CASES)
@torch.no_grad()
def test_closed_form_gradient_matches_autograd_float64(heads, kv_heads, bias, head_dim, rope):
    """G of the spec's loss, closed form (batched, left padding) vs autograd on each row alone."""
    lm, head = llama(heads=heads, kv_heads=kv_heads, bias=bias, head_dim=head_dim, rope=rope, seed=heads + kv_heads)
    proxy = PioProxy.from_language_model(lm, head, 1)
    gen = torch.Generator().manual_seed(7)
    for lengths in ([9], [23, 23], [40, 31, 6, 2]):
        rows = [torch.randn(n, HIDDEN, generator=gen, dtype=torch.float64) for n in lengths]
        hidden, mask, positions = left_padded(rows)
        got = pio_gradient_closed_form(proxy, hidden, mask, positions)
        for b, row in enumerate(rows):
            pad = hidden.shape[1] - row.shape[0]
            expected = pio_gradient_reference(proxy, row, torch.arange(row.shape[0]))
            assert rel_err(got[b, pad:], expected) <= 1e-9, (lengths, b)
            saliency, expected_saliency = got[b, pad:].norm(dim=-1), expected.norm(dim=-1)
            assert float((saliency - expected_saliency).abs().max() / expected_saliency.max()) <= 1e-9
            assert expected_saliency[-1] == 0  # the last prompt position is not supervised, nothing attends to it
            assert not got[b, :pad].any()  # padding gets no gradient


@torch.no_grad()
def test_closed_form_gradient_float32_against_float64():
    lm, head = llama(bias=True, dtype=torch.float32)
    hidden = torch.randn(2, 30, HIDDEN)
    mask = torch.ones(2, 30, dtype=torch.int64)
    positions = torch.arange(30).repeat(2, 1)
    got = pio_gradient_closed_form(PioProxy.from_language_model(lm, head, 1), hidden, mask, positions)
    lm64, head64 = copy.deepcopy(lm).double(), copy.deepcopy(head).double()
    expected = pio_gradient_closed_form(PioProxy.from_language_model(lm64, head64, 1), hidden.double(), mask,
                                        positions)
    assert got.dtype == torch.float32 and rel_err(got.double(), expected) < 1e-5
    # and against autograd through transformers' float32 modules (the reference is them, bit for bit)
    proxy = PioProxy.from_language_model(lm, head, 1)
    for b in range(2):
        assert rel_err(got[b], pio_gradient_reference(proxy, hidden[b], positions[b])) < 1e-5


@torch.no_grad()
def test_closed_form_with_float16_weights():
    """fp16 weights: products in fp16 (as upstream's autocast), the rest in float32; against
    float64 on the same (fp16-rounded) weights and inputs: spec section 12 asks rtol ~1e-2 and the
    same kept tokens (Jaccard >= 0.9)."""
    lm, head = llama(bias=True, dtype=torch.float16, seed=3)
    lm64, head64 = copy.deepcopy(lm).double(), copy.deepcopy(head).double()
    hidden = torch.randn(2, 60, HIDDEN).half()
    mask = torch.ones(2, 60, dtype=torch.int64)
    positions = torch.arange(60).repeat(2, 1)
    proxy, proxy64 = PioProxy.from_language_model(lm, head, 1), PioProxy.from_language_model(lm64, head64, 1)
    got = pio_gradient_closed_form(proxy, hidden, mask, positions)
    expected = pio_gradient_closed_form(proxy64, hidden.double(), mask, positions)
    assert got.dtype == torch.float32 and rel_err(got.double(), expected) < 1e-2
    start = torch.tensor([5, 10])
    kept = PioPruningStage(proxy, num_visual=40, keep=12)(hidden, mask, positions, start)[3]
    kept64 = PioPruningStage(proxy64, num_visual=40, keep=12)(hidden.double(), mask, positions, start)[3]
    for a, b in zip(kept.tolist(), kept64.tolist()):
        assert len(set(a) & set(b)) / len(set(a) | set(b)) >= 0.9


# ----------------------------------------------------------------------------- NMS


def nms_cases():
    gen = torch.Generator().manual_seed(3)
    n = 12
    yield "random", torch.rand(n, generator=gen), torch.randn(n, 5, generator=gen)
    yield "constant saliency", torch.full((n,), 0.5), torch.randn(n, 5, generator=gen)
    yield "repeated values", torch.tensor([3.0, 1, 3, 2, 1, 3, 0, 2, 2, 1, 3, 0]), torch.randn(n, 5, generator=gen)
    yield "all duplicates", torch.rand(n, generator=gen), torch.randn(1, 5, generator=gen).repeat(n, 1)
    base = torch.randn(3, 5, generator=gen)
    clusters = base[torch.arange(n) % 3] + 0.05 * torch.randn(n, 5, generator=gen)
    yield "three clusters", torch.rand(n, generator=gen), clusters
    zeros = torch.randn(n, 5, generator=gen)
    zeros[::3] = 0
    yield "zero vectors", torch.rand(n, generator=gen), zeros
    yield "ties and clusters", torch.tensor([1.0, 1.0, 2.0, 2.0] * 3), clusters


def test_nms_hand_worked():
    # 1 and 2 point the same way, 3 is orthogonal, 0 opposite: order 1, 2, 0, 3 (1 and 2 tie on 0.9).
    features = torch.tensor([[-1.0, 0], [1, 0], [2, 0.1], [0, 1]])
    saliency = torch.tensor([0.5, 0.9, 0.9, 0.1])
    assert nms_reference(saliency, features, 1) == [1]
    assert nms_reference(saliency, features, 2) == [0, 1]  # 2 is suppressed by 1
    assert nms_reference(saliency, features, 3) == [0, 1, 3]
    assert nms_reference(saliency, features, 4) == [0, 1, 2, 3]  # fill pass takes the suppressed 2
    for keep in range(1, 5):
        assert nms_static(saliency[None], features[None], keep).tolist() == [nms_reference(saliency, features, keep)]


@pytest.mark.parametrize("keep", [1, 2, 5, 11, 12])
def test_static_nms_matches_the_reference(keep):
    cases = list(nms_cases())
    for name, saliency, features in cases:
        got = nms_static(saliency[None], features[None], keep)
        assert got.tolist() == [nms_reference(saliency, features, keep)], name
    # A batch: rows are independent.
    saliency = torch.stack([c[1] for c in cases])
    features = torch.stack([c[2] for c in cases])
    expected = [nms_reference(s, f, keep) for s, f in zip(saliency, features)]
    assert nms_static(saliency, features, keep).tolist() == expected


def test_descending_rank_breaks_ties_by_index():
    assert descending_rank(torch.tensor([1.0, 3, 3, 0, 3])).tolist() == [3, 0, 1, 4, 2]
    with pytest.raises(PioError, match=r"keep must be an integer in \[1, 3\]"):
        nms_static(torch.rand(1, 3), torch.rand(1, 3, 2), 4)


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def model64():
    return llama(bias=True, seed=11)


def stage_rows(gen, lengths_and_starts, dtype=torch.float64):
    rows, starts = [], []
    for n, start in lengths_and_starts:
        rows.append(torch.randn(n, HIDDEN, generator=gen, dtype=dtype))
        starts.append(start)
    hidden, mask, positions = left_padded(rows)
    pads = [hidden.shape[1] - r.shape[0] for r in rows]
    return rows, hidden, mask, positions, torch.tensor([p + s for p, s in zip(pads, starts)]), pads, starts


@pytest.mark.parametrize("num_visual, keep", [(16, 5), (16, 15), (16, 1), (9, 4)])
@torch.no_grad()
def test_stage_matches_the_reference(model64, num_visual, keep):
    lm, head = model64
    proxy = PioProxy.from_language_model(lm, head, 1)
    stage = PioPruningStage(proxy, num_visual=num_visual, keep=keep)
    gen = torch.Generator().manual_seed(num_visual * 100 + keep)
    # Spans at the start, in the middle, and at the very end (covering the supervised rows).
    rows, hidden, mask, positions, starts, pads, local_starts = stage_rows(
        gen, [(num_visual + 12, 4), (num_visual + 3, 0), (num_visual + 7, 7), (num_visual + 2, 2)])
    check_stage_inputs(stage, hidden, mask, positions, starts)
    out, mask_out, positions_out, kept, saliency = stage(hidden, mask, positions, starts)
    length_out = hidden.shape[1] - num_visual + keep
    assert out.shape == (len(rows), length_out, HIDDEN) and kept.shape == (len(rows), keep)
    for b, row in enumerate(rows):
        ref = pio_stage_reference(proxy, row, torch.arange(row.shape[0]), (local_starts[b], num_visual), keep)
        pad = pads[b]
        assert kept[b].tolist() == ref.kept_local.tolist(), b
        assert float((saliency[b] - ref.saliency).abs().max() / ref.saliency.max()) <= 1e-9
        assert torch.equal(out[b, pad:], ref.hidden)  # rows gathered bit for bit
        assert positions_out[b, pad:].tolist() == ref.position_ids.tolist()  # renumbered 0..S'-1
        assert bool((mask_out[b, pad:] == 1).all()) and bool((mask_out[b, :pad] == 0).all())
        assert bool((positions_out[b, :pad] == 1).all())  # padding keeps its positions


def test_stage_input_errors(model64):
    lm, head = model64
    proxy = PioProxy.from_language_model(lm, head, 1)
    with pytest.raises(PioError, match="prunes nothing"):
        PioPruningStage(proxy, num_visual=8, keep=8)
    with pytest.raises(PioError, match="keep must be an integer >= 1"):
        PioPruningStage(proxy, num_visual=8, keep=0)
    stage = PioPruningStage(proxy, num_visual=8, keep=3)
    hidden, mask, positions = left_padded([torch.randn(12, HIDDEN), torch.randn(10, HIDDEN)])
    with pytest.raises(PioError, match="falls outside the 12-token sequence"):
        check_stage_inputs(stage, hidden, mask, positions, torch.tensor([0, 5]))
    with pytest.raises(PioError, match="covers padding"):
        check_stage_inputs(stage, hidden, mask, positions, torch.tensor([0, 1]))
    with pytest.raises(PioError, match="image_start must be"):
        check_stage_inputs(stage, hidden, mask, positions, torch.tensor([0]))
    with pytest.raises(PioError, match="not a Llama-style decoder layer"):
        PioProxy(nn.Linear(2, 2), lm.norm, head, lm.rotary_emb)


# ----------------------------------------------------------------------------- ONNX export


@pytest.fixture(scope="module")
def exported_stage():
    import onnx

    lm, head = llama(bias=True, dtype=torch.float32, seed=5)
    stage = PioPruningStage(PioProxy.from_language_model(lm, head, 1), num_visual=24, keep=6).eval()
    model = export_pio_stage(stage)
    onnx.checker.check_model(model, full_check=True)
    return lm, head, stage, model


def _run_stage_in_ort(model, stage, seed=9):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(PioPruningStage.OUTPUTS)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    for layout in ([(40, 3)], [(30, 0), (36, 12)], [(31, 7), (50, 20), (27, 3)]):
        rows, hidden, mask, positions, starts, _, _ = stage_rows(gen, layout, torch.float32)
        feeds = {"hidden_states": hidden.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(),
                 "image_start": starts.numpy()}
        got = session.run(None, feeds)
        with torch.no_grad():
            expected = [t.numpy() for t in stage(hidden, mask, positions, starts)]
        np.testing.assert_array_equal(got[3], expected[3])  # kept_indices
        for i in (0, 1, 2):  # hidden rows, mask and positions are gathers: exact
            np.testing.assert_array_equal(got[i], expected[i])
        saliency, ref = got[4], expected[4]
        assert float(np.abs(saliency - ref).max() / np.abs(ref).max()) <= 1e-5
        checked += 1
    return checked


def test_exported_stage_matches_the_closed_form_in_onnxruntime(exported_stage):
    import onnx

    _, _, stage, model = exported_stage
    assert {p.key: p.value for p in model.metadata_props} == {
        "pio.num_visual": "24", "pio.keep": "6", "pio.tau": "0.8", "pio.k_pos": "4", "pio.proxy_layer": "1"}
    # standard opset-18 ops and one fsr.PioNms node, whose body (a local function) runs the NMS as a Loop
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx", "fsr"}
    [nms] = [n for n in model.graph.node if n.domain == "fsr"]
    assert nms.op_type == "PioNms" and {a.name: onnx.helper.get_attribute_value(a) for a in nms.attribute} == {
        "keep": 6, "tau": pytest.approx(0.8)}
    [function] = model.functions
    assert [n.op_type for n in function.node].count("Loop") == 1
    assert not {n.op_type for n in model.graph.node} & {"Loop", "If", "Scan"}
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["hidden_states"][:2] == ["batch", "sequence"] and dims["image_start"] == ["batch"]
    assert _run_stage_in_ort(model, stage) == 3


def test_exported_stage_runs_with_the_nms_inlined(exported_stage):
    """``inline_pio_nms``: the fsr.PioNms body inlined (the Loop at the top level) runs the same."""
    from fsr.pruning.pio_nms_onnx import inline_pio_nms

    _, _, stage, model = exported_stage
    inlined = inline_pio_nms(model)
    assert not inlined.functions and [n.op_type for n in inlined.graph.node].count("Loop") == 1
    assert _run_stage_in_ort(inlined, stage, seed=3) == 3


NMS_KEEPS = [1, 2, 5, 11, 12]


@pytest.fixture(scope="module")
def nms_sessions():
    import onnxruntime as ort

    from fsr.pruning.pio_nms_onnx import make_pio_nms_model

    sessions = {}
    for keep in NMS_KEEPS:
        model = make_pio_nms_model(keep=keep)
        import onnx

        onnx.checker.check_model(model, full_check=True)
        sessions[keep] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sessions


@pytest.mark.parametrize("keep", NMS_KEEPS)
def test_pio_nms_node_matches_the_reference(nms_sessions, keep):
    """The fsr.PioNms function alone (one node, ONNX Runtime) against the two-pass reference: every
    NMS case (ties, constant saliency, duplicates, clusters, zero vectors), one row each and as a batch."""
    session = nms_sessions[keep]
    cases = list(nms_cases())
    for name, saliency, features in cases:
        [got] = session.run(None, {"saliency": saliency[None].numpy(), "features": features[None].numpy()})
        assert got.tolist() == [nms_reference(saliency, features, keep)], name
    saliency = torch.stack([c[1] for c in cases])
    features = torch.stack([c[2] for c in cases])
    [got] = session.run(None, {"saliency": saliency.numpy(), "features": features.numpy()})
    assert got.tolist() == [nms_reference(s, f, keep) for s, f in zip(saliency, features)]


def test_pio_nms_node_on_random_spans_and_its_checks():
    import onnxruntime as ort

    from fsr.pruning.pio_nms_onnx import add_pio_nms_function, check_pio_nms_nodes, make_pio_nms_model

    gen = torch.Generator().manual_seed(5)
    for n, keep, width in [(576, 92, 16), (92, 54, 16), (40, 39, 8)]:
        session = ort.InferenceSession(make_pio_nms_model(keep=keep).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        base = torch.randn(8, width, generator=gen)
        features = base[torch.randint(0, 8, (2, n), generator=gen)] + 0.4 * torch.randn(2, n, width, generator=gen)
        saliency = torch.rand(2, n, generator=gen)
        [got] = session.run(None, {"saliency": saliency.numpy(), "features": features.numpy()})
        assert got.tolist() == nms_static(saliency, features, keep).tolist()
        assert got.tolist() == [nms_reference(s, f, keep) for s, f in zip(saliency, features)]
    model = make_pio_nms_model(keep=3)
    del model.functions[:]
    with pytest.raises(PioError, match="not the fsr.PioNms function"):
        check_pio_nms_nodes(model)
    assert add_pio_nms_function(model) == 1 and check_pio_nms_nodes(model) == 1
    model.graph.node[0].attribute[0].i = 0
    with pytest.raises(PioError, match="keep must be an integer >= 1"):
        check_pio_nms_nodes(model)


def test_stage_weights_are_the_decoder_segments_weights(exported_stage, tmp_path):
    """Every weight of the pruning graph is byte-identical to a tensor of the decoder segment that
    starts at the proxy layer (layer 1, final norm, LM head): one copy can serve both graphs."""
    import onnx
    from onnx import numpy_helper

    from fsr.models.parts import DecoderStep

    lm, head, _, model = exported_stage
    step = DecoderStep(lm, head, 1, 2).eval()
    cfg = lm.config
    past = [torch.zeros(2, cfg.num_key_value_heads, 4, cfg.head_dim) for _ in range(2)]
    args = (torch.randn(2, 3, HIDDEN), torch.ones(2, 7, dtype=torch.int64), torch.arange(4, 7).repeat(2, 1), *past)
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past", "total"))
    from fsr.onnx_io import quiet_exporter

    with quiet_exporter():
        decoder = torch.onnx.export(step, args, dynamo=True, dynamic_shapes=(
            {0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past)),
            verbose=False).model_proto
    def tensors(m):
        return [numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]

    def find(arrays, array):
        return [i for i, a in enumerate(arrays) if a.shape == array.shape and a.tobytes() == array.tobytes()]

    stage_tensors, decoder_tensors = tensors(model), tensors(decoder)
    proxy = PioProxy.from_language_model(lm, head, 1)
    for name, param in proxy.named_parameters():
        forms = [param.detach().numpy()] + ([param.detach().numpy().T.copy()] if param.dim() == 2 else [])
        in_stage = [(f, i) for f in range(len(forms)) for i in find(stage_tensors, forms[f])]
        assert len(in_stage) == 1, (name, "must be in the pruning graph once, in one layout")
        form = forms[in_stage[0][0]]
        assert find(decoder_tensors, form), (name, "the decoder segment holds it in the same layout")
    matrices = sum(p.dim() == 2 for p in proxy.parameters())
    assert matrices == 8  # q, k, v, o, gate, up, down, LM head


# ----------------------------------------------------------------------------- encoder-side stage


def test_encoder_stage_counts():
    assert encoder_stage_counts(576, 96) == (24, 3, 48)  # the README default: 16 * 3 local + 48 global
    assert encoder_stage_counts(576, 100) == (24, 3, 50)  # nl = 50: 48 local, so 98 kept
    with pytest.raises(PioError, match="square patch grid divisible into 4 x 4"):
        encoder_stage_counts(575, 96)
    with pytest.raises(PioError, match=r"keeps an integer in \[1, 575\]"):
        encoder_stage_counts(576, 576)


def test_encoder_stage_hand_worked():
    # 4 x 4 grid, 2 x 2 windows of 2 x 2; keep 8: nl = 4, one local pick per window, 4 global.
    local = torch.tensor([[9, 1, 0, 5], [2, 3, 6, 7], [0, 0, 1, 1], [0, 4, 1, 1]], dtype=torch.float32).flatten()
    glob = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    # token i points along axis i % 4, scaled by a power of two: cosines are exactly 1 or 0
    tokens = torch.stack([torch.eye(4)[i % 4] * 2.0 ** (i % 3) for i in range(16)])
    merged, kept = encoder_stage_reference(local, glob, tokens, 8, windows=2)
    # windows: {0,1,4,5} -> 0; {2,3,6,7} -> 7; {8,9,12,13} -> 13 (4 beats 0s); {10,11,14,15} -> 10 (tie: lower)
    # global among the rest, highest first: 15, 14, 12, 11
    assert kept == [0, 7, 10, 11, 12, 13, 14, 15]
    # dropped tokens join the first kept token on their axis: 0 (axis 0), 13 (1), 10 (2), 7 (3)
    expected = tokens[kept].clone()
    for slot, members in ((0, [0, 4, 8]), (5, [13, 1, 5, 9]), (2, [10, 2, 6]), (1, [7, 3])):
        expected[slot] = tokens[members].sum(0) / len(members)
    torch.testing.assert_close(merged, expected)
    stage = PioEncoderStage(num_visual=16, keep=8, windows=2)
    got_merged, got_kept = stage(local[None], glob[None], tokens[None])
    assert got_kept.tolist() == [kept]
    torch.testing.assert_close(got_merged[0], expected)


@pytest.mark.parametrize("keep", [96, 100, 17])
def test_encoder_stage_matches_the_reference(keep):
    gen = torch.Generator().manual_seed(keep)
    n, batch = 576, 4
    local = torch.softmax(torch.randn(batch, n, generator=gen) * 3, -1)
    glob = torch.softmax(torch.randn(batch, n, generator=gen) * 3, -1)
    local[1] = 1.0 / n  # constant maps: every choice is a tie
    glob[1] = 1.0 / n
    local[2] = (local[2] * 2000).round() / 2000 + 1e-4  # many ties, all positive
    glob[2] = (glob[2] * 2000).round() / 2000 + 1e-4
    tokens = torch.randn(batch, n, 8, generator=gen)
    tokens[3, 100:200] = tokens[3, 7]  # duplicated tokens
    stage = PioEncoderStage(num_visual=n, keep=keep)
    merged, kept = stage(local, glob, tokens)
    assert kept.shape == (batch, stage.kept_count)
    for b in range(batch):
        ref_merged, ref_kept = encoder_stage_reference(local[b], glob[b], tokens[b], keep)
        assert kept[b].tolist() == ref_kept, b
        torch.testing.assert_close(merged[b], ref_merged, atol=1e-5, rtol=1e-5)


def test_encoder_stage_exports_and_runs_in_onnxruntime():
    import onnx
    import onnxruntime as ort

    from fsr.onnx_io import quiet_exporter

    n, keep = 64, 16
    stage = PioEncoderStage(num_visual=n, keep=keep).eval()
    gen = torch.Generator().manual_seed(2)
    args = (torch.rand(2, n, generator=gen), torch.rand(2, n, generator=gen), torch.randn(2, n, 8, generator=gen))
    batch = torch.export.Dim("batch", min=1)
    with quiet_exporter():
        model = torch.onnx.export(stage, args, dynamo=True, opset_version=18, input_names=list(stage.INPUTS),
                                  output_names=list(stage.OUTPUTS), dynamic_shapes=tuple({0: batch} for _ in args),
                                  verbose=False).model_proto
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        feeds = (torch.rand(b, n, generator=gen), torch.rand(b, n, generator=gen), torch.randn(b, n, 8, generator=gen))
        merged, kept = session.run(None, dict(zip(stage.INPUTS, (t.numpy() for t in feeds))))
        ref_merged, ref_kept = stage(*feeds)
        np.testing.assert_array_equal(kept, ref_kept.numpy())
        np.testing.assert_allclose(merged, ref_merged.numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- a segmented decoder


class _Llava(nn.Module):
    def __init__(self, lm, head):
        super().__init__()
        self.model = nn.Module()
        self.model.language_model = lm
        self.lm_head = head


def run_segments(llava, schedule, embeds, mask, image_start, num_visual, max_new_tokens):
    """What a runtime does with a pruned, segmented decoder: ``DecoderStep`` segments cut at the
    schedule's layers, a `PioPruningStage` before each segment but the first (prefill only); each
    segment keeps its own attention mask (its own KV length) and decode position offset."""
    from fsr.models.parts import DecoderStep

    lm = llava.model.language_model
    cfg = lm.config
    bounds = [0, *schedule.layers, cfg.num_hidden_layers]
    segments = [DecoderStep(lm, llava.lm_head, a, b) for a, b in zip(bounds, bounds[1:])]
    stages = [PioPruningStage(PioProxy.from_language_model(lm, llava.lm_head, st.layer), num_visual=n, keep=keep)
              for st, (n, keep) in zip(schedule.stages, schedule.token_counts(num_visual))]
    batch = embeds.shape[0]
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    last_position = positions[:, -1]
    h, seg_mask, seg_positions = embeds, mask, positions
    masks, offsets, pasts, kept_original, offset = [], [], [], [], 0
    origin = torch.arange(num_visual).repeat(batch, 1)
    for i, segment in enumerate(segments):
        if i:
            stage = stages[i - 1]
            check_stage_inputs(stage, h, seg_mask, seg_positions, image_start)
            h, seg_mask, seg_positions, kept, _ = stage(h, seg_mask, seg_positions, image_start)
            origin = torch.gather(origin, 1, kept)
            kept_original.append(origin.tolist())
            offset += stage.num_visual - stage.keep
        empty = [torch.zeros(batch, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=h.dtype)
                 for _ in range(2 * len(segment.layers))]
        out = segment(h, seg_mask, seg_positions, *empty)
        h, pasts_i = out[0], list(out[1:])
        masks.append(seg_mask)
        offsets.append(offset)
        pasts.append(pasts_i)
    kv_lengths = [p[0].shape[2] for p in pasts]
    tokens = [[] for _ in range(batch)]
    logits = h
    for step in range(max_new_tokens):
        next_ids = logits[:, -1].argmax(-1)
        for b in range(batch):
            tokens[b].append(int(next_ids[b]))
        if step == max_new_tokens - 1:
            break
        last_position = last_position + 1
        h = lm.embed_tokens(next_ids[:, None])
        for i, segment in enumerate(segments):
            masks[i] = torch.cat([masks[i], torch.ones(batch, 1, dtype=torch.int64)], dim=1)
            out = segment(h, masks[i], (last_position - offsets[i])[:, None], *pasts[i])
            h, pasts[i] = out[0], list(out[1:])
        logits = h
    return tokens, kept_original, kv_lengths, offsets


@torch.no_grad()
def test_segmented_decoder_generates_what_the_reference_generates():
    """16 LLM layers, the spec's LLaVA-1.5 layers and counts (1:92,10:54,15:22, 576 image tokens),
    batch 2 with left padding and image spans at different places, float64: the segmented decoder
    with closed-form stages generates the tokens and keeps the tokens of the autograd reference."""
    lm, head = llama(layers=16, heads=4, kv_heads=2, seed=21, vocab=64)
    llava = _Llava(lm, head).eval()
    schedule = llava15_schedule(64)
    n = 576
    gen = torch.Generator().manual_seed(4)
    rows, spans = [], []
    for before, after in ((5, 12), (3, 8)):
        ids = torch.randint(4, 64, (before + after,), generator=gen)
        text = lm.embed_tokens(ids)
        image = torch.randn(n, HIDDEN, generator=gen, dtype=torch.float64) * text.std()
        rows.append(torch.cat([text[:before], image, text[before:]]))
        spans.append(before)
    embeds, mask, _ = left_padded(rows)
    pads = [embeds.shape[1] - r.shape[0] for r in rows]
    image_start = torch.tensor([p + s for p, s in zip(pads, spans)])
    tokens, kept, kv_lengths, offsets = run_segments(llava, schedule, embeds, mask, image_start, n, 6)
    assert offsets == [0, 484, 522, 554]
    assert kv_lengths == [embeds.shape[1] - n + k for k in (n, 92, 54, 22)]
    for b, row in enumerate(rows):
        ref = pio_generate_reference(lm, head, row, (spans[b], n), schedule, max_new_tokens=6)
        assert tokens[b] == ref.token_ids, b
        assert [stage[b] for stage in kept] == [r.kept_original for r in ref.stages], b
        assert ref.position_offsets == [0] + [484] * 9 + [522] * 5 + [554]
        assert ref.kv_lengths == [row.shape[0] - n + k for k in [n] + [92] * 9 + [54] * 5 + [22]]
