"""VisionZip end to end (issue 11): a registered method whose op runs before the projector.

The exported pipeline is checked against a PyTorch reference built the way upstream VisionZip
reads the model: the Hugging Face vision tower with eager attention (``output_hidden_states``,
``output_attentions``), ``hidden_states[-2]``, ``attentions[-2]`` summed over heads (the [CLS]
row) and the head-mean keys of that layer, the readable reference ``visionzip_reference``, the
HF projector after it, and Hugging Face ``generate``. None of our vision-tower code is used on
that side. Batch 1 and batch 2 (left padding), budgets 64 (whole export), 128 and 192 (the
vision graph), the ``torch`` back end and ``fsr-run``, the op cut out of the export, the
fidelity rows, the near-tie analysis and the registry entry.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from fsr.export.exporter import trace_graph
from fsr.pruning.methods import get_method, method_names
from fsr.pruning.visionzip import (
    explain_visionzip_kept, visionzip_anchors, visionzip_reference, visionzip_split,
)
from fsr.runtime.inputs import load_image
from fsr.runtime.pipeline import Pipeline
from fsr.runtime.reference import ReferencePipeline
from fsr.settings import SettingsError

MAX_NEW = 10


# ---------------------------------------------------------------------------- the independent reference


def hf_visionzip(model, tower, pixel_values: torch.Tensor, budget: int):
    """Upstream's reading of LLaVA-1.5: HF tower (eager) -> layer ``vision_feature_layer`` -> VisionZip
    reference -> projector. Returns (image tokens [B,K,H], kept indices [B,K])."""
    layer_index = model.config.vision_feature_layer  # -2: hidden_states[-2] is the output of attentions[-2]'s layer
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        hidden = out.hidden_states[layer_index]
        attention = out.attentions[layer_index][:, :, 0, :].sum(dim=1)  # the [CLS] query row, summed over heads
        layer = tower.encoder.layers[layer_index]
        attn = layer.self_attn
        b, t, _ = hidden.shape
        keys = attn.k_proj(layer.layer_norm1(out.hidden_states[layer_index - 1]))  # the layer's keys, with bias
        keys = keys.view(b, t, attn.num_heads, attn.head_dim).mean(dim=2)  # upstream's metric: mean over heads
        dominant, contextual = visionzip_split(budget)
        tokens, kept = visionzip_reference(hidden, attention, keys, dominant=dominant, contextual=contextual)
        return model.model.multi_modal_projector(tokens), kept


class HFVisionZipReference(ReferencePipeline):
    """The reference pipeline with the vision step replaced by `hf_visionzip` (host steps and HF
    ``generate`` as in every reference pipeline)."""

    def __init__(self, loaded, manifest, **kwargs):
        super().__init__(loaded, manifest, **kwargs)
        self.hf_tower = copy.deepcopy(self.model.model.vision_tower)
        self.hf_tower.set_attn_implementation("eager")
        self.budget = manifest.method.settings["budget"]

    def vision_outputs(self, request, instruction_embeds):
        assert instruction_embeds is None  # VisionZip reads no instruction
        tokens, kept = hf_visionzip(self.model, self.hf_tower, torch.from_numpy(request.vision.pixel_values),
                                    self.budget)
        return {"image_tokens": tokens.numpy(), "kept_indices": kept.numpy()}


@pytest.fixture(scope="module")
def pipe(export_vz64):
    with Pipeline(export_vz64) as p:
        yield p


@pytest.fixture(scope="module")
def reference(export_vz64):
    return HFVisionZipReference.from_export(export_vz64)


# ---------------------------------------------------------------------------- the export


def test_manifest_and_vision_graph(export_vz64, pipe):
    m = pipe.manifest
    assert (m.method.name, m.method.settings, m.image.kept_image_tokens, m.image.num_image_tokens) == (
        "visionzip", {"budget": 64}, 64, 576)
    details = m.method.details
    assert (details["dominant"], details["contextual"], details["keeps_cls"]) == (54, 10, True)
    assert details["placement"] == "before_projector" and details["op"] == "fsr::VisionZip"
    assert "[CLS]" in details["kept_indices"]
    assert m.relevance.source is None and "text_encoder" not in m.graphs  # no instruction input
    vision = m.graphs["vision"]
    assert vision.input_names == ["pixel_values"] and vision.output_names == ["image_tokens", "kept_indices"]
    assert vision.outputs[0].shape == ["batch", 64, m.llm.hidden_size]

    model = onnx.load(export_vz64 / "vision.onnx")
    [node] = [n for n in model.graph.node if n.op_type == "VisionZip"]
    assert node.domain == "fsr" and {a.name: a.i for a in node.attribute} == {"dominant": 54, "contextual": 10}
    assert list(node.input) == ["hidden_states", "cls_attention", "keys"]
    assert [(f.domain, f.name) for f in model.functions] == [("fsr", "VisionZip")]
    # the projector comes after the op: its first MatMul reads the op's tokens
    consumers = [n.op_type for n in model.graph.node if node.output[0] in n.input]
    assert consumers and all(op in ("MatMul", "Gemm") for op in consumers)


@pytest.mark.parametrize("i", range(3))
def test_batch1_matches_the_hf_reference(pipe, reference, images, prompts, i):
    [got] = pipe.generate([images[i]], [prompts[i]], max_new_tokens=MAX_NEW)
    [want] = reference.generate([images[i]], [prompts[i]], max_new_tokens=MAX_NEW)
    assert got.kept_indices == want.kept_indices and len(got.kept_indices) == 64
    assert got.kept_indices[0] == 0  # the [CLS] row
    assert got.kept_indices[1:54] == sorted(got.kept_indices[1:54])  # dominant patches ascending
    assert got.token_ids == want.token_ids


def test_batch2_left_padding_matches_the_hf_reference(pipe, reference, images, prompts):
    got = pipe.generate(images[1:3], prompts[:2], max_new_tokens=MAX_NEW)
    want = reference.generate(images[1:3], prompts[:2], max_new_tokens=MAX_NEW)
    assert [g.kept_indices for g in got] == [w.kept_indices for w in want]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    request = pipe.prepare(images[1:3], prompts[:2])
    assert len(request.rows[0]) != len(request.rows[1])  # different prompt lengths: row 0 is left padded


def test_image_tokens_match_the_hf_reference(pipe, reference, images, prompts):
    request = pipe.prepare(images, prompts)
    got = pipe.vision_outputs(request, None)
    want = reference.vision_outputs(request, None)
    np.testing.assert_array_equal(got["kept_indices"], want["kept_indices"])
    np.testing.assert_allclose(got["image_tokens"], want["image_tokens"], atol=1e-5, rtol=1e-5)


def test_the_torch_backend_and_fsr_run(export_vz64, reference, images, prompts, tmp_path):
    from fsr.runtime.cli import app

    with Pipeline(export_vz64, backend="torch") as torch_pipe:
        got = torch_pipe.generate(images[:2], prompts[:2], max_new_tokens=MAX_NEW)
    want = reference.generate(images[:2], prompts[:2], max_new_tokens=MAX_NEW)
    assert [g.kept_indices for g in got] == [w.kept_indices for w in want]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    result = CliRunner().invoke(app, [str(export_vz64), "--image", str(images[0]), "--prompt", prompts[0],
                                      "--backend", "torch", "--max-new-tokens", str(MAX_NEW), "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output.strip().splitlines()[-1])["results"]
    assert row["token_ids"] == want[0].token_ids and row["kept_indices"] == want[0].kept_indices


@pytest.mark.parametrize("budget", [128, 192])
def test_vision_graph_at_other_budgets(budget, tiny_model, images, prompts, tmp_path):
    """The vision graph (the only graph a budget changes) exported at 128 and 192 (108 + 20, 162 + 30)."""
    from fsr.export import ExportSettings, describe
    from fsr.models import get_spec

    manifest = describe(tiny_model, ExportSettings("visionzip", budget=budget))
    assert (manifest.method.details["dominant"], manifest.method.details["contextual"]) == visionzip_split(budget)
    path, _ = trace_graph(get_spec("llava").vision_graph(tiny_model, manifest), tmp_path)
    model = onnx.load(path)
    [node] = [n for n in model.graph.node if n.op_type == "VisionZip"]
    assert [a.i for a in node.attribute] == list(visionzip_split(budget))
    pixels = get_spec("llava").preprocess_images(tiny_model.processor, [load_image(p) for p in images]).pixel_values
    tokens, kept = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {
        "pixel_values": pixels})
    tower = copy.deepcopy(tiny_model.model.model.vision_tower)
    tower.set_attn_implementation("eager")
    want_tokens, want_kept = hf_visionzip(tiny_model.model, tower, torch.from_numpy(pixels), budget)
    assert kept.shape == (3, budget)
    np.testing.assert_array_equal(kept, want_kept.numpy())
    np.testing.assert_allclose(tokens, want_tokens.numpy(), atol=1e-5, rtol=1e-5)


def test_the_op_cut_out_of_the_export_matches_the_reference(export_vz64):
    """The function node exactly as exported, on random inputs of the export's shapes (ties in the
    attention, duplicate keys, batch 1 and 2)."""
    from fsr.bench.split import op_model

    model = op_model(onnx.load(export_vz64 / "vision.onnx"), get_method("visionzip").onnx_op)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    t, c, dk = (d.dim_value for d in (*model.graph.input[0].type.tensor_type.shape.dim[1:],
                                       model.graph.input[2].type.tensor_type.shape.dim[2]))
    g = torch.Generator().manual_seed(0)
    checked = 0
    for case in range(12):
        batch = 1 + case % 2
        hidden = torch.randn(batch, t, c, generator=g)
        attention = torch.softmax(torch.randn(batch, 4, t, generator=g) * 3, dim=-1).sum(dim=1)
        if case % 3 == 1:
            attention = torch.round(attention * 200) / 200  # ties at the dominant boundary
        keys = torch.randn(batch, t, dk, generator=g)
        if case % 4 == 2:
            keys = keys[:, torch.randint(0, 40, (t,), generator=g)]  # duplicate keys: similarity ties
        tokens, kept = session.run(None, {"hidden_states": hidden.numpy(), "cls_attention": attention.numpy(),
                                          "keys": keys.numpy()})
        want, want_kept = visionzip_reference(hidden, attention, keys, dominant=54, contextual=10)
        np.testing.assert_array_equal(kept, want_kept.numpy())
        np.testing.assert_allclose(tokens, want.numpy(), atol=1e-5, rtol=0)
        checked += batch
    assert checked == 18 and t == 577


# ---------------------------------------------------------------------------- fsr-compare


@pytest.fixture(scope="module")
def report_vz64(export_vz64, tmp_path_factory):
    from fsr.compare import CompareOptions, compare_export

    out = tmp_path_factory.mktemp("compare-vz64")
    return compare_export(export_vz64, CompareOptions(
        backends=("torch", "ort"), out_dir=out, budgets=(576, 64), methods=("visionzip", "fsr", "uniform"),
        builtin_samples=2, max_new_tokens=6))


def test_compare_graphs_end_to_end_and_fidelity(report_vz64):
    report = report_vz64
    assert report["passed"], report["failures"]
    assert report["method"] == "visionzip" and report["budget"] == 64
    vision = next(g for g in report["graphs"] if g["graph"] == "vision" and g["backend"] == "ort")
    assert vision["status"] == "pass"
    kept = [o for o in vision["outputs"] if o["output"] == "kept_indices"]
    assert kept and all(o["max_absdiff"] == 0 for o in kept)
    [e2e] = report["end_to_end"]
    assert e2e["status"] == "pass" and e2e["token_agreement"] == 1.0
    rows = {(r["method"], r["budget"]): r for r in report["fidelity"]["rows"]}
    assert set(rows) == {(m, b) for m in ("visionzip", "fsr", "uniform") for b in (576, 64)}
    # VisionZip hands [CLS] on at every budget: its 576 row is not the identity (and no failure)
    assert rows["visionzip", 576]["kept_tokens"] == 576 and not rows["visionzip", 576]["identity"]
    assert rows["visionzip", 576]["kl_mean"] > 0
    assert rows["fsr", 576]["identity"] and rows["fsr", 576]["kl_mean"] == 0.0
    assert rows["visionzip", 64]["kept_tokens"] == 64 and not rows["visionzip", 64]["identity"]


def test_differing_kept_indices_are_explained_through_the_registry(export_vz64, pipe):
    """fsr-compare's near-tie analysis for VisionZip (``near_tie_analysis = "visionzip"``): a row whose
    dominant set swaps the reference's weakest dominant patch for its strongest dropped one is a near-tie
    within a loose tolerance and a mismatch within a tight one; a row whose anchors do not follow from
    its dominant set is a mismatch whatever the tolerance."""
    from fsr.compare.feeds import vision_feeds
    from fsr.compare.near_tie import explain_kept
    from fsr.compare.reference_runner import ReferenceFromExport
    from fsr.compare.samples import make_samples

    reference = ReferenceFromExport(export_vz64)()
    manifest = pipe.manifest
    feed = vision_feeds(reference, manifest, make_samples(builtin=1))[0]
    kept = pipe._run("vision", feed)["kept_indices"]
    with torch.no_grad():
        attention = reference.tower(("cls_attention",))(torch.from_numpy(feed["pixel_values"]))[0]
    dominant = kept[0, :54].tolist()
    weakest = min(dominant[1:], key=lambda j: float(attention[j]))
    strongest = max((j for j in range(1, 577) if j not in dominant), key=lambda j: float(attention[j]))
    swapped = sorted(set(dominant) - {weakest} | {strongest})
    other = np.asarray([swapped + visionzip_anchors(swapped, 577, 10)])
    [loose] = explain_kept(reference, manifest, feed, kept, other, tol=1.0)
    [tight] = explain_kept(reference, manifest, feed, kept, other, tol=1e-12)
    assert loose.near_tie and loose.stage == "dominant" and (loose.reference_token, loose.other_token) == (
        weakest, strongest)
    assert not tight.near_tie and tight.stage == "dominant"
    broken = kept.copy()
    broken[0, 53] = strongest  # the anchors still belong to the old dominant set
    [verdict] = explain_kept(reference, manifest, feed, kept, broken, tol=1.0)
    assert verdict.stage == "anchors" and not verdict.near_tie


# ---------------------------------------------------------------------------- near-ties of VisionZip decisions


def _row(attention, dominant=4, contextual=2):
    t = attention.shape[0]
    g = torch.Generator().manual_seed(1)
    hidden, keys = torch.randn(1, t, 3, generator=g), torch.randn(1, t, 2, generator=g)
    _, kept = visionzip_reference(hidden, attention[None], keys, dominant=dominant, contextual=contextual)
    return kept[0].tolist()


def _other(dominant_set, t, contextual=2):
    return sorted(dominant_set) + visionzip_anchors(dominant_set, t, contextual)


def test_near_tie_at_the_dominant_boundary():
    attention = torch.tensor([9.0, 0.9, 0.1, 0.5, 0.30000001, 0.2, 0.3, 0.05, 0.01, 0.02])
    kept = _row(attention)
    assert kept[:4] == [0, 1, 3, 4] and kept[4:] == visionzip_anchors(kept[:4], 10, 2)
    other = _other([0, 1, 3, 6], 10)  # took 6 (0.3) instead of 4 (0.30000001)
    v = explain_visionzip_kept(attention, kept, other, dominant=4, contextual=2, tol=1e-4)
    assert v["near_tie"] and v["stage"] == "dominant" and (v["reference_token"], v["other_token"]) == (4, 6)
    assert v["gap"] < 1e-6
    v = explain_visionzip_kept(attention, kept, _other([0, 1, 3, 5], 10), dominant=4, contextual=2, tol=1e-4)
    assert not v["near_tie"] and v["stage"] == "dominant" and "boundary" in v["detail"]


@pytest.mark.parametrize("other, stage", [
    (lambda k: k, "equal"),
    (lambda k: k[:-1], "size"),
    (lambda k: [1, 0] + k[2:], "cls"),
    (lambda k: k[:4] + k[4:][::-1], "anchors"),
    (lambda k: [0, 3, 1, 4] + k[4:], "order"),
])
def test_malformed_or_equal_rows(other, stage):
    attention = torch.tensor([9.0, 0.9, 0.1, 0.5, 0.4, 0.2, 0.3, 0.05, 0.01, 0.02])
    kept = _row(attention)
    v = explain_visionzip_kept(attention, kept, other(kept), dominant=4, contextual=2, tol=1.0)
    assert v["stage"] == stage and v["near_tie"] == (stage == "equal")


def test_identity_rows_must_be_equal():
    attention = torch.rand(5)
    kept = _row(attention, dominant=4, contextual=2)  # 6 >= 5 rows: the identity
    assert kept == [0, 1, 2, 3, 4]
    v = explain_visionzip_kept(attention, kept, [0, 1, 2, 4, 3], dominant=4, contextual=2, tol=1.0)
    assert v["stage"] == "identity" and not v["near_tie"]


# ---------------------------------------------------------------------------- the registry entry


def test_registry_entry():
    vz = get_method("visionzip")
    assert "visionzip" in method_names(exportable=True, prunes=True)
    settings = vz.settings(budget=128)
    assert vz.reference_settings(settings) == {"dominant": 108, "contextual": 20}
    assert vz.inputs(settings, relevance=True) == ("hidden_states", "cls_attention", "keys")
    assert vz.relevance_mode(settings) is None and vz.placement == "before_projector"
    assert vz.kept_tokens(settings, 576) == 128 and vz.kept_tokens(vz.settings(budget=1000), 576) == 577
    assert not vz.is_identity(vz.settings(budget=1000), 576)  # [CLS] always reaches the LLM
    assert get_method("fsr").is_identity(get_method("fsr").settings(budget=576), 576)
    assert vz.describe(settings, 576) == "visionzip, budget 128 (108 dominant incl. [CLS] + 20 contextual)"
    assert vz.kept_patches(vz.settings(budget=4), [0, 5, 9, 2]) == {"cls": [0], "patches": [4, 8], "anchors": [1]}  # 3 + 1
    assert vz.kept_patches(vz.settings(budget=9), [0, 1, 2]) == {"cls": [0], "patches": [0, 1], "anchors": []}
    assert get_method("fsr").kept_patches(None, [3, 7]) == {"cls": [], "patches": [3, 7], "anchors": []}
    with pytest.raises(SettingsError, match=r"--budget must be an integer >= 2 \(got 1\).*\[CLS\]"):
        vz.settings(budget=1)


def test_the_pytorch_form_matches_the_reference_through_the_registry():
    vz = get_method("visionzip")
    g = torch.Generator().manual_seed(3)
    for budget, t in [(8, 40), (64, 577), (5, 3)]:
        settings = vz.settings(budget=budget)
        inputs = {"hidden_states": torch.randn(2, t, 6, generator=g),
                  "cls_attention": torch.rand(2, t, generator=g), "keys": torch.randn(2, t, 4, generator=g)}
        want, want_kept = vz.reference(settings)(inputs)
        got, got_kept = vz.torch_module(settings, relevance=False)(*(inputs[n] for n in vz.inputs(settings, False)))
        assert torch.equal(got_kept, want_kept)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--budget", "1"], "--budget must be an integer >= 2"),
    (["--alpha", "2"], "--alpha do(es) not apply to method 'visionzip', which takes the options --budget"),
])
def test_export_options_are_checked(args, message, tmp_path):
    from fsr.export.cli import app

    result = CliRunner().invoke(app, ["llava", "--method", "visionzip", "-o", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert message in re.sub(r"\s+", " ", result.output)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny", "--methods", "uniform"], "--methods takes pruning methods with an in-graph form"),
    (["EXPORT", "--methods", "visionzip"], "--methods applies to --preset"),
])
def test_bench_methods_option_is_checked(args, message, capsys):
    from fsr.bench.cli import main

    assert main([a.replace("EXPORT", "/nonexistent") for a in args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
