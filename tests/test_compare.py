"""fsr-compare: Polygraphy graph comparisons, end to end, pruning fidelity (compare/)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fsr.compare import CompareOptions, compare_export
from fsr.compare.cli import compare as compare_command
from fsr.compare.end_to_end import agreement, first_difference
from fsr.compare.graphs import polygraphy_command
from fsr.compare.near_tie import explain_row
from fsr.compare.tolerances import EXACT, Tolerance, ToleranceError, ToleranceTable, parse_overrides
from fsr.compare.trt import unavailable_reason

BUDGETS = (576, 192, 128, 64)


def cli(*args):
    import typer

    app = typer.Typer()
    app.command()(compare_command)
    return CliRunner().invoke(app, [str(a) for a in args])


def run_polygraphy(command: str):
    return subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=300)


def graph(report, name, backend="ort"):
    return next(g for g in report["graphs"] if g["graph"] == name and g["backend"] == backend)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def export_fp16(tmp_path_factory):
    from fsr.export import ExportSettings, export_model
    from fsr.models import load_model

    out = tmp_path_factory.mktemp("exports") / "fsr64-fp16"
    export_model(load_model("tiny"), out, ExportSettings("fsr", budget=64, dtype="fp16"))
    return out


@pytest.fixture(scope="module")
def report_fsr64(export_fsr64, tmp_path_factory):
    """Graphs + end to end on the FSR export, default back ends (torch, ort, trt)."""
    out = tmp_path_factory.mktemp("compare-fsr64")
    return compare_export(export_fsr64, CompareOptions(out_dir=out, fidelity=False, max_new_tokens=8))


@pytest.fixture(scope="module")
def cli_none(export_none, tmp_path_factory):
    """The CLI on the unpruned export, with the fidelity report at 576/192/128/64."""
    folder = tmp_path_factory.mktemp("compare-none")
    result = cli(export_none, "--backends", "torch,ort", "--budgets", ",".join(map(str, BUDGETS)),
                 "--out", folder / "polygraphy", "--json", folder / "report.json", "--max-new-tokens", 8)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result, json.loads((folder / "report.json").read_text())


# ---------------------------------------------------------------------------- torch vs ONNX Runtime


def test_fsr64_torch_vs_ort_passes(report_fsr64):
    assert report_fsr64["passed"], report_fsr64["failures"]
    ort = [g for g in report_fsr64["graphs"] if g["backend"] == "ort"]
    assert {g["graph"] for g in ort} == {"vision", "embed", "text_encoder", "decoder"}
    assert all(g["status"] == "pass" for g in ort)
    vision = graph(report_fsr64, "vision")
    kept = [o for o in vision["outputs"] if o["output"] == "kept_indices"]
    assert kept and all(o["atol"] == 0 and o["rtol"] == 0 and o["max_absdiff"] == 0 for o in kept)
    decoder = graph(report_fsr64, "decoder")
    assert {o["iteration"] for o in decoder["outputs"]} == {0, 1}  # prefill chunk and decode step
    [e2e] = [e for e in report_fsr64["end_to_end"] if e["backend"] == "ort"]
    assert e2e["status"] == "pass" and e2e["token_agreement"] == 1.0 and e2e["exact_sequences"] == 3


def test_none_cli_passes_and_writes_json(cli_none):
    result, report = cli_none
    assert result.exit_code == 0, result.output
    assert report["passed"] and report["method"] == "none"
    assert "PASSED" in result.output and "polygraphy run" in result.output
    assert all(g["status"] == "pass" for g in report["graphs"])
    assert "kept_indices" not in {o["output"] for o in graph(report, "vision")["outputs"]}


def test_fp16_torch_vs_ort_passes(export_fp16, tmp_path):
    report = compare_export(export_fp16, CompareOptions(backends=("torch", "ort"), out_dir=tmp_path, fidelity=False,
                                                        max_new_tokens=8))
    assert report["dtype"] == "fp16"
    assert report["passed"], report["failures"]
    logits = [o for o in graph(report, "decoder")["outputs"] if o["output"] == "logits"]
    assert logits[0]["atol"] == ToleranceTable("fp16")("logits").atol
    assert max(o["max_absdiff"] for o in logits) > 0  # really fp16 arithmetic, not a copy of the reference


# ---------------------------------------------------------------------------- Polygraphy files and commands


@pytest.mark.parametrize("name", ["vision", "decoder"])
def test_printed_polygraphy_command_reproduces(report_fsr64, export_fsr64, name):
    [command] = [c for c in report_fsr64["commands"] if f"/{name}.onnx" in c]
    assert command.startswith("polygraphy run ") and "--onnxrt --load-inputs" in command
    assert str(export_fsr64) in command
    done = run_polygraphy(command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PASSED" in done.stdout + done.stderr


def test_saved_files_are_polygraphy_json(report_fsr64):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    files = graph(report_fsr64, "decoder")["files"]
    feeds = load_json(files["inputs"])
    assert isinstance(feeds, list) and len(feeds) == 2
    assert all(f["past_key_values.0.key"].shape[2] > 0 for f in feeds)  # past length > 0
    reference = RunResults.load(files["reference_outputs"])
    assert list(reference.keys()) == ["torch"] and len(reference["torch"]) == 2
    # the decoder's default: the last position's logits (every position's K/V is compared as present.*)
    assert reference["torch"][0]["logits"].shape == feeds[0]["inputs_embeds"].shape[:1] + (1, 261)
    assert reference["torch"][0]["present.0.key"].shape[2] == feeds[0]["attention_mask"].shape[1]


# ---------------------------------------------------------------------------- a corrupted weight fails


def test_corrupted_decoder_weight_fails_naming_graph_and_output(export_fsr64, tmp_path):
    import onnx
    from onnx import numpy_helper

    export = tmp_path / "export"
    shutil.copytree(export_fsr64, export)
    model = onnx.load(export / "decoder.onnx")  # with its external data (decoder.onnx.data)
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if "logits" in n.output)  # the LM head
    assert node.op_type == "MatMul"
    # the weight is kept in the module's layout: MatMul(h, Transpose(lm_head.weight))
    weight = next(i if i in initializers else producers[i].input[0] for i in node.input
                  if i in initializers or (i in producers and producers[i].op_type == "Transpose"
                                           and producers[i].input[0] in initializers))
    array = numpy_helper.to_array(initializers[weight])
    initializers[weight].CopyFrom(numpy_helper.from_array(array * 1.5, weight))
    onnx.save(model, export / "decoder.onnx")

    report_path = tmp_path / "report.json"
    refused = cli(export, "--backends", "torch,ort", "--no-fidelity")  # verified first, like fsr-run
    assert refused.exit_code == 2 and "graph 'decoder'" in refused.output and "changed since export" in refused.output
    result = cli(export, "--backends", "torch,ort", "--graphs", "decoder", "--no-fidelity", "--no-end-to-end",
                 "--out", tmp_path / "polygraphy", "--json", report_path, "--no-verify")
    assert result.exit_code == 1, result.output
    report = json.loads(report_path.read_text())
    assert not report["passed"]
    assert len(report["failures"]) == 1 and "graph 'decoder' output 'logits'" in report["failures"][0]
    assert "graph 'decoder' output 'logits'" in result.output
    decoder = graph(report, "decoder")
    assert decoder["failed_outputs"] == ["logits"]  # the KV cache does not go through the LM head
    assert any("changed since export" in w for w in report["integrity_warnings"])
    # The printed command shows the same failure by hand.
    assert run_polygraphy(report["commands"][0]).returncode != 0
    assert fsr64_untouched(export_fsr64)


def fsr64_untouched(export_dir) -> bool:
    from fsr.manifest import read_manifest

    read_manifest(export_dir, verify=True)  # raises when a file changed
    return True


# ---------------------------------------------------------------------------- pruning fidelity


def test_random_weights_are_explained(cli_none):
    """Issue 9: FSR at 0 % next to random at 100 % on the random-weight model, with no explanation."""
    result, report = cli_none
    output = " ".join(result.output.split())
    assert report["random_weights"] is True and report["preset"] == "tiny"
    assert "note: this export has random weights (the built-in 'tiny' preset)" in output
    assert "the pruning-fidelity figures do not rank methods" in output
    margin = report["fidelity"]["unpruned_margin"]
    assert 0.0 <= margin["min"] <= margin["median"] <= margin["max"] <= 1.0 and margin["steps"] >= 3
    assert "Unpruned model's confidence: top-1 minus top-2 next-token probability" in output


def test_fidelity_json_on_tiny_export(cli_none):
    _, report = cli_none
    fidelity = report["fidelity"]
    from fsr.compare.fidelity import available_methods
    from fsr.pruning import PRUNING_METHODS

    ran = [m for m in available_methods() if m not in fidelity["skipped"]]  # pio-fvlm: skipped, see below
    assert fidelity["num_image_tokens"] == 576 and fidelity["methods"] == ran
    assert set(PRUNING_METHODS) | {"visionzip"} == set(fidelity["methods"])  # FSR, VisionZip and the baselines
    assert "no re-export" in fidelity["computed_in"]
    # PIO-FVLM's schedules prune after LLM layers 1, 10, 15: the 2-layer tiny LLM cannot run them
    assert "out of range for an LLM with 2 layers" in fidelity["skipped"]["pio-fvlm"]
    rows = {row["budget"]: row for row in fidelity["rows"] if row["method"] == "fsr"}
    assert sorted(rows) == sorted(BUDGETS)
    for budget, row in rows.items():
        assert row["kept_tokens"] == budget
        assert row["samples"] == 3 and row["steps"] >= 3
        for key in ("first_token_agreement", "top1_agreement"):
            assert 0.0 <= row[key] <= 1.0
        assert row["kl_mean"] >= 0.0 and row["kl_max"] >= row["kl_mean"]
        assert len(row["per_sample"]) == 3
    identity = rows[576]
    assert identity["identity"] and not any(rows[b]["identity"] for b in (192, 128, 64))
    assert identity["first_token_agreement"] == 1.0 and identity["top1_agreement"] == 1.0
    assert identity["kl_mean"] == 0.0 and identity["kl_max"] == 0.0
    assert all(rows[b]["kl_mean"] > 0.0 for b in (192, 128, 64))  # pruning does change the distribution
    zipped = {row["budget"]: row for row in fidelity["rows"] if row["method"] == "visionzip"}
    assert sorted(zipped) == sorted(BUDGETS)  # VisionZip beside FSR and the baselines, [CLS] kept at every budget
    assert all(r["kept_tokens"] == b and not r["identity"] and r["kl_mean"] > 0.0 for b, r in zipped.items())


# ---------------------------------------------------------------------------- TensorRT


def test_trt_skipped_with_reason_or_run(report_fsr64, export_fsr64):
    from fsr.manifest import read_manifest

    trt_graphs = [g for g in report_fsr64["graphs"] if g["backend"] == "trt"]
    [trt_e2e] = [e for e in report_fsr64["end_to_end"] if e["backend"] == "trt"]
    assert len(trt_graphs) == 4
    reason = unavailable_reason(read_manifest(export_fsr64))
    if reason is None:  # a machine with TensorRT and a GPU: the comparisons must run and pass
        assert all(g["status"] in ("pass", "near-tie") for g in trt_graphs + [trt_e2e])
        return
    assert report_fsr64["trt_skipped_reason"] == reason
    assert report_fsr64["skipped"] == [f"trt: {reason}"]  # the report's own list (and its last lines)
    assert all(g["status"] == "skipped" and g["reason"] == reason for g in trt_graphs)
    assert trt_e2e["status"] == "skipped" and trt_e2e["reason"] == reason
    assert "no TensorRT engines" in reason and "fsr-build" in reason  # the fixture export has none
    assert ("GPU" in reason) == (not torch.cuda.is_available())


# ---------------------------------------------------------------------------- kept_indices judged in a graph comparison


def swapped_kept_runner(reference, manifest):
    """A stand-in back end for the vision graph: the reference's outputs, except that row 0 of every
    iteration keeps one other token (its last kept index replaced by the first dropped one) and so
    gets other image tokens."""
    from fsr.compare.reference_runner import ReferenceRunner

    class Swapped(ReferenceRunner):
        def infer_impl(self, feed_dict):
            out = super().infer_impl(feed_dict)
            kept = out["kept_indices"].copy()
            dropped = next(i for i in range(kept.max() + 2) if i not in set(kept[0]))
            kept[0] = np.sort(np.concatenate([kept[0][:-1], [dropped]]))
            tokens = out["image_tokens"].copy()
            tokens[0] += 1.0
            out["kept_indices"], out["image_tokens"] = kept, tokens
            return out

    return Swapped(reference, manifest, "vision", name="onnxrt")


@pytest.mark.parametrize("tol, status", [(1e-9, "fail"), (10.0, "near-tie")])
def test_differing_kept_indices_fail_unless_near_tie(export_fsr64, tmp_path, monkeypatch, tol, status):
    from fsr.compare import graphs as graphs_module
    from fsr.compare.feeds import graph_feeds
    from fsr.compare.samples import make_samples
    from fsr.compare.reference_runner import ReferenceFromExport
    from fsr.manifest import read_manifest

    manifest = read_manifest(export_fsr64)
    reference = ReferenceFromExport(export_fsr64)
    monkeypatch.setattr(graphs_module, "backend_runner", lambda backend, export_dir, manifest_, graph_: (
        swapped_kept_runner(reference, manifest_), (export_fsr64 / "vision.onnx", ["--onnxrt"], "")))
    feeds = graph_feeds(reference(), manifest, "vision", make_samples())
    result = graphs_module.compare_graph(export_fsr64, manifest, reference, "vision", "ort", feeds,
                                         ToleranceTable("fp32"), tmp_path, near_tie_tol=tol)
    assert result.status == status
    kept = [o for o in result.outputs if o.output == "kept_indices"]
    assert len(kept) == 2 and all(o.status == status for o in kept)
    assert [t["row"] for t in result.near_ties] == [0, 0]  # one differing row per iteration
    tokens = [o for o in result.outputs if o.output == "image_tokens"]
    assert all(o.status == status for o in tokens)
    if status == "fail":
        assert result.failed_outputs == ["image_tokens", "kept_indices"]
    else:  # batch-2 iteration: row 1 is still compared, and it matches
        assert "other rows are within tolerance" in tokens[1].note


# ---------------------------------------------------------------------------- near-ties of FSR decisions


def _reference(saliency, features, budget, rho):
    """phi (= norm01(saliency): no relevance, beta 1) and the reference's kept indices."""
    from fsr.pruning import focus_scan_refine_reference, fsr_scores

    n = saliency.numel()
    _, kept = focus_scan_refine_reference(torch.randn(1, n, 4), features[None], saliency[None], None, budget=budget,
                                          beta=1.0, rho=rho)
    return fsr_scores(saliency[None], None, 3.0, 1.0)[0], kept[0].tolist()


def _scan_case():
    """10 tokens, one dominant phi (K_F = 1); tokens 5 and 6, almost the same point opposite the
    focus token, are the first Scan pick: a near-tie between them."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(10, 8, generator=gen)
    features[5] = -features[0]
    features[6] = features[5] + 1e-4 * torch.randn(8, generator=gen)
    saliency = torch.zeros(10)
    saliency[0] = 1.0
    return saliency, features


def test_near_tie_in_scan_is_reported_as_near_tie():
    saliency, features = _scan_case()
    phi, kept = _reference(saliency, features, budget=4, rho=0.5)
    assert (5 in kept) != (6 in kept)  # one of the twins is an anchor
    twin = 6 if 5 in kept else 5
    other = sorted(twin if i == 11 - twin else i for i in kept)
    verdict = explain_row(phi, features, kept, other, budget=4, rho=0.5, tol=1e-4)
    assert verdict.near_tie and verdict.stage == "scan", verdict
    assert {verdict.reference_token, verdict.other_token} == {5, 6} and verdict.gap < 1e-4


def test_real_difference_in_scan_is_a_mismatch():
    saliency, features = _scan_case()
    features[9] = features[0] * 2  # same direction as the focus token: Scan distance 0, never a good pick
    phi, kept = _reference(saliency, features, budget=4, rho=0.5)
    assert 9 not in kept
    anchor = next(i for i in kept if i != 0)
    other = sorted(9 if i == anchor else i for i in kept)
    verdict = explain_row(phi, features, kept, other, budget=4, rho=0.5, tol=1e-4)
    assert not verdict.near_tie and verdict.stage == "scan", verdict


def test_near_tie_in_focus_order():
    saliency = torch.tensor([1.0, 0.5, 0.5 - 1e-7, 0.1, 0.1, 0.05, 0.02, 0.0])
    features = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    features[2] = features[1] * 1.01  # next to token 1: never a Scan anchor once 1 is kept
    phi, kept = _reference(saliency, features, budget=4, rho=0.6)
    assert 1 in kept and 2 not in kept
    other = sorted(2 if i == 1 else i for i in kept)
    verdict = explain_row(phi, features, kept, other, budget=4, rho=0.6, tol=1e-4)
    assert verdict.near_tie and verdict.stage == "focus" and verdict.reference_token == 1, verdict
    low = next(i for i in range(3, 8) if i not in kept)  # phi <= 0.1, far below token 1's 0.5
    other = sorted(low if i == 1 else i for i in kept)
    verdict = explain_row(phi, features, kept, other, budget=4, rho=0.6, tol=1e-4)
    assert not verdict.near_tie and verdict.stage == "focus", verdict


def test_kept_set_of_wrong_size_is_a_mismatch():
    saliency, features = _scan_case()
    verdict = explain_row(saliency, features, [0, 1, 2, 3], [0, 1, 2, 2], budget=4, rho=0.5, tol=1e-4)
    assert not verdict.near_tie and verdict.stage == "size"


# ---------------------------------------------------------------------------- small pieces


def test_tolerance_overrides_and_defaults():
    table = ToleranceTable("fp32", parse_overrides(["logits=1e-3,1e-2", "present.*=5e-4"]))
    assert table("logits") == Tolerance(1e-3, 1e-2)
    assert table("present.3.value") == Tolerance(5e-4, 5e-4)
    assert table("kept_indices") == EXACT
    assert table("text_embeds") == ToleranceTable("fp32")("anything")
    assert ToleranceTable("fp16")("logits").atol > ToleranceTable("fp32")("logits").atol
    for bad in (["logits"], ["logits=a,b"], ["logits=1,2,3"], ["=1e-3"], ["logits=-1"]):
        with pytest.raises(ToleranceError):
            parse_overrides(bad)


def test_bad_tol_option_exits_2(export_none):
    result = cli(export_none, "--tol", "logits", "--no-fidelity")
    assert result.exit_code == 2 and "ATOL,RTOL" in result.output


def test_polygraphy_command_lists_per_output_tolerances(tmp_path):
    tols = {"image_tokens": Tolerance(1e-4, 1e-3), "kept_indices": EXACT}
    command = polygraphy_command(tmp_path / "vision.onnx", "ort", tmp_path / "in.json", tmp_path / "ref.json", tols,
                                 Tolerance(1e-4, 1e-3))
    args = shlex.split(command)
    assert args[:3] == ["polygraphy", "run", str(tmp_path / "vision.onnx")]
    assert args[args.index("--atol") + 1: args.index("--rtol")] == ["0.0001", "kept_indices:0"]
    assert args[args.index("--rtol") + 1:] == ["0.001", "kept_indices:0"]


def test_sequence_agreement_helpers():
    assert agreement([1, 2, 3], [1, 2, 3]) == 1.0 and first_difference([1, 2, 3], [1, 2, 3]) is None
    assert agreement([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3) and first_difference([1, 2], [1, 5]) == 1
    assert agreement([1, 2], [1, 2, 7, 8]) == 0.5 and first_difference([1, 2], [1, 2, 7]) == 2


def test_reference_runner_is_a_polygraphy_runner(export_fsr64):
    from polygraphy.backend.base import BaseRunner

    from fsr.compare import ReferenceFromExport, ReferenceRunner
    from fsr.manifest import read_manifest

    manifest = read_manifest(export_fsr64)
    runner = ReferenceRunner(ReferenceFromExport(export_fsr64), manifest, "embed")
    assert isinstance(runner, BaseRunner)
    with runner:
        out = runner.infer({"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
    assert list(out) == ["inputs_embeds"] and out["inputs_embeds"].shape == (1, 3, 64)
    assert list(meta) == ["input_ids"]


def test_pio_nms_near_tie_and_mismatch():
    """PIO-FVLM's NMS replayed on the reference's saliency: a swap of two tokens whose saliencies are
    within the tolerance is a near-tie; keeping a token far down the order instead is a mismatch."""
    import torch

    from fsr.compare.near_tie import explain_nms_row
    from fsr.pruning.pio_fvlm import nms_reference

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(20, 8, generator=gen)
    saliency = torch.linspace(1.0, 0.05, 20)
    saliency[4] = saliency[3] - 1e-6  # 3 and 4 nearly tie
    keep = 4
    reference = nms_reference(saliency, features, keep)
    assert 3 in reference and 4 not in reference
    swapped = sorted(set(reference) - {3} | {4})
    verdict = explain_nms_row(saliency, features, reference, swapped, tau=0.8, tol=1e-4)
    assert verdict.near_tie and verdict.reference_token == 3 and verdict.other_token == 4
    far = sorted(set(reference) - {3} | {19})
    verdict = explain_nms_row(saliency, features, reference, far, tau=0.8, tol=1e-4)
    assert not verdict.near_tie and "reference took 3" in verdict.detail
    assert explain_nms_row(saliency, features, reference, reference, tau=0.8, tol=1e-4).stage == "equal"
