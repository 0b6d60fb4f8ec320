"""fsr-bench on the tiny exports: the machinery, the JSON, the plot, the analytic counts.

No assertion here is about how fast anything is: timings on a shared CI machine are noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fsr.bench import analytic
from fsr.bench.stats import summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMINGS = ("ttft", "instruction", "vision", "embed", "prefill", "vision_tower", "fsr_op", "decode_per_token")
ROW_FIELDS = ("method", "budget", "kept_tokens", "num_image_tokens", "batch", "prompt_tokens", "seq_len",
              "new_tokens", "export", "timings_ms", "peak_memory", "kv_cache_bytes", "kv_cache_bytes_final",
              "analytic", "roofline", "measured_over_ideal", "fsr_op_share_of_ttft", "speedup",
              "kv_cache_reduction", "baseline", "notes", "loadavg", "vs_transformers")
DOC_FIELDS = ("schema", "started", "backend", "machine", "device_peak", "settings", "model", "exports", "results",
              "transformers",
              "command", "export_s", "wall_s")
FAST = ["--warmup", "1", "--repeat", "2", "--new-tokens", "3", "--peak-matmul", "256", "--peak-copy-mib", "8"]


# ----------------------------------------------------------------------------- analytic counts


TINY_LLM = analytic.LLMDims(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                            intermediate_size=128, vocab_size=261)


def test_prefill_flops_match_a_hand_count():
    # batch 1, 10 positions, no past; a multiply-add is 2 FLOPs
    q_proj = 2 * 10 * 64 * (4 * 16)
    k_proj = v_proj = 2 * 10 * 64 * (2 * 16)  # grouped-query: 2 KV heads
    o_proj = 2 * 10 * (4 * 16) * 64
    pairs = 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10  # causal: query i sees i + 1 keys
    scores = 2 * 4 * pairs * 16  # Q K^T: 4 query heads, head_dim 16
    weighted = 2 * 4 * pairs * 16  # P V
    mlp = 3 * (2 * 10 * 64 * 128)  # gate, up, down
    lm_head = 2 * 1 * 64 * 261  # the last position's logits
    per_layer = q_proj + k_proj + v_proj + o_proj + scores + weighted + mlp
    flops = analytic.prefill_flops(TINY_LLM, batch=1, seq=10)
    assert flops["total"] == 2 * per_layer + lm_head == 1_536_128
    assert flops["attention_scores"] == 2 * (scores + weighted)
    assert analytic.prefill_flops(TINY_LLM, batch=3, seq=10)["total"] == 3 * flops["total"]
    # every position's logits; a decode step after 9 positions sees 10 keys
    assert analytic.prefill_flops(TINY_LLM, 1, 10, logits=10)["lm_head"] == 10 * lm_head
    step = analytic.prefill_flops(TINY_LLM, 1, 1, past=9)
    assert step["attention_scores"] == 2 * 2 * 2 * 4 * 10 * 16


def test_prefill_bytes_and_kv_cache_match_a_hand_count():
    kv = 2 * 2 * 1 * 2 * 10 * 16 * 4  # K and V, 2 layers, batch 1, 2 KV heads, 10 positions, head_dim 16, fp32
    assert analytic.kv_cache_bytes(TINY_LLM, 1, 10, "fp32") == kv == 5120
    assert analytic.kv_cache_bytes(TINY_LLM, 1, 10, "fp16") == kv // 2
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v, o, mlp, two norms
    weights = (2 * layer + 64 + 64 * 261) * 4  # + final norm + lm_head
    assert analytic.prefill_bytes(TINY_LLM, 1, 10, "fp32") == {"weights": weights, "kv_written": kv,
                                                               "total": weights + kv}


def test_dims_from_the_tiny_config_match_the_manifest(tiny_model, export_none):
    from fsr.manifest import read_manifest
    from fsr.models import get_spec

    spec = get_spec("llava")
    dims = spec.llm_dims(tiny_model.model.config)
    llm = read_manifest(export_none).llm
    assert (dims.num_layers, dims.num_kv_heads, dims.head_dim, dims.hidden_size, dims.vocab_size) == (
        llm.num_layers, llm.num_kv_heads, llm.head_dim, llm.hidden_size, llm.vocab_size)
    assert dims == llm and dims == analytic.LLMDims(2, 64, 4, 2, 16, 128, 261, 4096)
    vision = spec.vision_dims(tiny_model.model.config)
    assert vision.tokens_per_crop == 576 and vision.layers_used == 3  # 4 layers, feature layer -2
    assert vision == read_manifest(export_none).vision


def test_roofline_picks_the_binding_limit():
    from fsr.bench.roofline import DevicePeak

    peak = DevicePeak("cpu", "test", "fp32", peak_flops=1e9, peak_bandwidth=1e8, matmul_n=1, copy_bytes=1, method="")
    assert peak.ideal(2e9, 1e8) == {"seconds": 2.0, "compute_s": 2.0, "memory_s": 1.0, "bound": "compute"}
    assert peak.ideal(1e8, 3e8)["bound"] == "memory" and peak.ideal(1e8, 3e8)["seconds"] == 3.0


def test_summary_median_and_quartiles():
    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert summarize([])["n"] == 0


# ----------------------------------------------------------------------------- graph split


def test_split_vision_graph_reproduces_it(export_fsr64):
    import onnx
    import onnxruntime as ort

    from fsr.bench.split import SplitError, fsr_op_model, vision_prefix_model

    model = onnx.load(export_fsr64 / "vision.onnx")
    prefix, op = vision_prefix_model(model), fsr_op_model(model)
    for m in (prefix, op):
        onnx.checker.check_model(m, full_check=True)
    assert not any(n.domain == "fsr" for n in prefix.graph.node) and not prefix.functions
    assert [n.op_type for n in op.graph.node] == ["FocusScanRefine"]

    def session(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.RandomState(0)
    feeds = {"pixel_values": rng.randn(2, 3, 336, 336).astype(np.float32),
             "instruction_embeds": rng.randn(2, 32).astype(np.float32)}
    full = session(model).run(None, feeds)
    inner = session(prefix).run(None, feeds)
    pruned, kept = session(op).run(None, dict(zip([o.name for o in prefix.graph.output], inner)))
    np.testing.assert_array_equal(kept, full[1])
    np.testing.assert_array_equal(pruned, full[0])
    with pytest.raises(SplitError):
        vision_prefix_model(prefix)  # no FocusScanRefine node left to cut at


# ----------------------------------------------------------------------------- the benchmark


@pytest.fixture(scope="module")
def bench_run(export_none, export_fsr64, export_vz64, tmp_path_factory):
    """One fsr-bench run over the tiny exports (pruned ones first: the baseline must still be the unpruned;
    FSR and VisionZip at the same budget side by side)."""
    from fsr.bench.cli import main

    out = tmp_path_factory.mktemp("bench")
    args = [str(export_vz64), str(export_fsr64), str(export_none), "--batch", "1,2", *FAST,
            "--json", str(out / "bench.json"),
            "--plot", str(out / "bench.png"), "--markdown", str(out / "bench.md"), "--cache-dir", str(out / "cache")]
    assert main(args) == 0
    return json.loads((out / "bench.json").read_text()), out


def test_json_has_every_field(bench_run):
    doc, _ = bench_run
    for field in DOC_FIELDS:
        assert field in doc, field
    assert doc["schema"] == "fsr-bench/1" and doc["backend"] == "ort"
    for field in ("peak_flops", "peak_bandwidth", "device", "dtype", "method"):
        assert doc["device_peak"][field], field
    assert len(doc["results"]) == 6  # (unpruned, fsr 64, visionzip 64) x 2 batch sizes
    for row in doc["results"]:
        for field in ROW_FIELDS:
            assert field in row, field
        # the options the backend ran with, defaults resolved (ONNX Runtime on the CPU: chunked prefill)
        assert row["backend_options"]["prefill_chunk"] == 256 and row["backend_options"]["spin"] == "off"
        for name in TIMINGS:
            summary = row["timings_ms"][name]
            assert summary["n"] == 2 and summary["q1"] <= summary["median"] <= summary["q3"], name
        assert row["peak_memory"]["bytes"] > 0
        for key in ("prefill_flops", "prefill_bytes", "vision_flops", "decode_step_flops", "decode_step_bytes"):
            assert row["analytic"][key] > 0
        for key in ("prefill_ms", "ttft_ms", "decode_ms_per_token"):
            assert row["roofline"][key] > 0
        for part in ("ttft", "prefill", "decode_per_token"):
            assert set(row["speedup"][part]) == {"measured", "ideal", "ratio"}


def test_speedups_are_against_the_unpruned_export(bench_run, export_none, export_fsr64, export_vz64):
    doc, _ = bench_run
    rows = doc["results"]
    assert [(r["method"], r["kept_tokens"]) for r in rows] == [("none", 576), ("none", 576), ("fsr", 64), ("fsr", 64),
                                                               ("visionzip", 64), ("visionzip", 64)]
    assert [e["path"] for e in doc["exports"]] == [str(export_none), str(export_fsr64), str(export_vz64)]
    for row in rows:
        base = next(r for r in rows if r["method"] == "none" and r["batch"] == row["batch"])
        assert row["baseline"]["export"] == str(export_none)
        measured = base["timings_ms"]["ttft"]["median"] / row["timings_ms"]["ttft"]["median"]
        assert row["speedup"]["ttft"]["measured"] == pytest.approx(measured)
        ideal = base["roofline"]["prefill_ms"] / row["roofline"]["prefill_ms"]
        assert row["speedup"]["prefill"]["ideal"] == pytest.approx(ideal)
        assert row["kv_cache_reduction"] == pytest.approx(base["kv_cache_bytes"] / row["kv_cache_bytes"])
    base, pruned, zipped = rows[0], rows[2], rows[4]
    assert base["speedup"]["ttft"] == {"measured": 1.0, "ideal": 1.0, "ratio": 1.0}
    assert base["timings_ms"]["fsr_op"]["median"] == 0.0 and pruned["timings_ms"]["fsr_op"]["median"] > 0
    assert zipped["timings_ms"]["fsr_op"]["median"] > 0 and zipped["timings_ms"]["vision_tower"]["median"] > 0
    assert zipped["seq_len"] == pruned["seq_len"] and zipped["kv_cache_bytes"] == pruned["kv_cache_bytes"]
    assert pruned["seq_len"] - pruned["prompt_tokens"] == 64 and base["seq_len"] - base["prompt_tokens"] == 576
    llm = analytic.LLMDims(2, 64, 4, 2, 16, 128, 261)
    assert pruned["kv_cache_bytes"] == analytic.kv_cache_bytes(llm, 1, pruned["seq_len"], "fp32")
    assert pruned["analytic"]["prefill_flops"] == analytic.prefill_flops(llm, 1, pruned["seq_len"])["total"]


def test_plot_and_tables_are_written(bench_run):
    _, out = bench_run
    assert (out / "bench.png").read_bytes()[:8] == PNG_SIGNATURE
    text = (out / "bench.md").read_text()
    assert "| 576 (none) | 1 |" in text and "| 64 (fsr) | 2 |" in text and "| 64 (visionzip) | 2 |" in text
    assert "TTFT speedup" in text
    assert "| transformers generate (unpruned, sdpa) | 1 |" in text and "TTFT vs transformers" in text
    assert "Decode against context length" in text and "load avg" in text


def test_transformers_generate_is_measured_beside_every_budget(bench_run, export_none):
    """The side-by-side row: plain transformers generate on the unpruned export's own weights, interleaved
    (as many measured runs as every budget), and each row's ratio against it."""
    doc, _ = bench_run
    refs = doc["transformers"]
    assert [r["batch"] for r in refs] == [1, 2]
    assert all(r["source"] == str(export_none / "source") for r in refs)
    for ref in refs:
        assert ref["timings_ms"]["ttft"]["n"] == 2 and ref["timings_ms"]["decode_per_token"]["median"] > 0
        assert ref["seq_len"] == next(r["seq_len"] for r in doc["results"] if r["method"] == "none"
                                      and r["batch"] == ref["batch"])  # the same prompt, image tokens expanded
    for row in doc["results"]:
        ref = next(r for r in refs if r["batch"] == row["batch"])
        want = ref["timings_ms"]["ttft"]["median"] / row["timings_ms"]["ttft"]["median"]
        assert row["vs_transformers"]["ttft"] == pytest.approx(want)
        assert row["loadavg"]["n"] == 2


def test_ttft_breakdown_splits_the_vision_graph():
    from fsr.bench.report import breakdown

    t = {"instruction": 1.0, "vision": 30.0, "vision_tower": 20.0, "fsr_op": 5.0, "embed": 2.0, "prefill": 40.0}
    parts = breakdown({"timings_ms": {k: {"median": v} for k, v in t.items()}})
    assert parts["vision_tower"] == pytest.approx(24.0) and parts["fsr_op"] == pytest.approx(6.0)
    assert sum(parts.values()) == pytest.approx(73.0)  # = the steps of TTFT
    unpruned = breakdown({"timings_ms": {"vision": {"median": 30.0}, "fsr_op": {"median": None}}})
    assert unpruned["vision_rest"] == 30.0 and unpruned["fsr_op"] == 0.0


def test_op_benchmark_reports_share_of_ttft(bench_run, export_fsr64):
    from fsr.bench.op import bench_op, markdown

    doc, _ = bench_run
    op = bench_op(export_dir=export_fsr64, warmup=0, repeat=1, bench_json=doc)
    assert (op["num_tokens"], op["token_dim"], op["feature_dim"], op["budget"]) == (576, 64, 64, 64)
    impl = op["implementations"]
    for name in ("torch_reference_cpu", "torch_fixed_cpu", "onnxruntime"):
        assert impl[name]["median"] > 0, name
    import torch

    if not torch.cuda.is_available():
        assert impl["plugin_kernel"] == {"status": "not measured: no GPU"}
    assert set(op["ttft"]["shares"]) >= {"torch_fixed_cpu", "onnxruntime"}
    assert op["ttft"]["ttft_ms"] == doc["results"][2]["timings_ms"]["ttft"]["median"]
    assert "share of TTFT" in markdown(op)


def test_an_unpruned_export_is_required(export_fsr64, tmp_path):
    from fsr.bench.targets import BenchError, targets_from_exports

    with pytest.raises(BenchError, match="unpruned"):
        targets_from_exports([export_fsr64], "ort", None, tmp_path)


def test_missing_budget_is_an_error(export_none, export_fsr64, tmp_path):
    from fsr.bench.targets import BenchError, targets_from_exports

    with pytest.raises(BenchError, match=r"budget\(s\) \[128\]"):
        targets_from_exports([export_none, export_fsr64], "ort", [576, 128, 64], tmp_path)
    specs, _ = targets_from_exports([export_fsr64, export_none], "ort", [1000, 64], tmp_path)
    assert [(s.method, s.kept_tokens) for s in specs] == [("none", 576), ("fsr", 64)]
    with pytest.raises(BenchError, match="two exports of method fsr at budget 64"):
        targets_from_exports([export_none, export_fsr64, export_fsr64], "ort", None, tmp_path)


def test_an_export_that_keeps_every_token_but_is_not_unpruned_is_refused(export_none, export_vz64, tmp_path):
    """VisionZip at budget 576 hands the LLM 576 tokens ([CLS] + merged rows): neither a baseline nor a speedup."""
    import shutil

    from fsr.bench.targets import BenchError, targets_from_exports
    from fsr.manifest import read_manifest, write_manifest

    folder = tmp_path / "vz576"
    shutil.copytree(export_vz64, folder)
    manifest = read_manifest(folder)
    manifest.method.settings["budget"], manifest.image.kept_image_tokens = 576, 576
    write_manifest(folder, manifest)
    with pytest.raises(BenchError, match="no fewer than the unpruned model's 576"):
        targets_from_exports([export_none, folder], "ort", None, tmp_path)


# ----------------------------------------------------------------------------- torch backend


def test_torch_backend_runs_an_export_like_onnx_runtime(export_fsr64, images, prompts, tmp_path):
    from fsr.bench import harness
    from fsr.bench.targets import open_export

    ort_target = open_export(export_fsr64, "ort", tmp_path)
    torch_target = open_export(export_fsr64, "torch", tmp_path, device="cpu")
    try:
        outputs = []
        for target in (ort_target, torch_target):
            pipe = target.pipeline
            request = pipe.prepare(images[:2], prompts[:2])
            outputs.append(pipe.vision_outputs(request, pipe.instruction_embeds(request.instructions)))
        ort_out, torch_out = outputs
        np.testing.assert_array_equal(torch_out["kept_indices"], ort_out["kept_indices"])
        np.testing.assert_allclose(torch_out["image_tokens"], ort_out["image_tokens"], atol=1e-4, rtol=1e-4)
        settings = harness.BenchSettings(batches=[2], warmup=0, repeat=1, new_tokens=2)
        row = harness.measure(torch_target, 2, settings)
        assert row["timings_ms"]["fsr_op"]["median"] > 0 and row["seq_len"] - row["prompt_tokens"] == 64
    finally:
        ort_target.close()
        torch_target.close()


def test_torch_backend_benchmarks_a_preset_in_memory(tmp_path):
    from fsr.bench import harness
    from fsr.bench.roofline import measure_peak
    from fsr.bench.targets import targets_from_preset

    specs, info, records = targets_from_preset("tiny", [600, 64], "torch", tmp_path, cache_dir=tmp_path,
                                               device="cpu", methods=("fsr", "visionzip"))
    assert [(s.method, s.kept_tokens) for s in specs] == [("none", 576), ("fsr", 64), ("visionzip", 64)]
    assert not list(tmp_path.iterdir())  # nothing exported for the torch backend
    peak = measure_peak("cpu", matmul_n=128, copy_mib=4, repeats=1)
    settings = harness.BenchSettings(batches=[1], warmup=0, repeat=1, new_tokens=2)
    doc = harness.run_benchmark(specs, info, peak, settings, backend="torch", device="cpu")
    assert [r["method"] for r in doc["results"]] == ["none", "fsr", "visionzip"]
    assert doc["results"][1]["speedup"]["ttft"]["measured"] > 0
    assert doc["results"][2]["timings_ms"]["fsr_op"]["median"] > 0  # the VisionZip op timed alone (torch form)
    assert records[0]["note"].startswith("model built in memory")


def test_7b_preset_builds_on_the_meta_device_in_fp16(tmp_path):
    import torch

    from fsr.bench.targets import BenchError, targets_from_preset
    from fsr.export import ExportSettings, describe
    from fsr.models import load_model
    from fsr.runtime.torch_backend import TorchBackend

    loaded = load_model("llava-1.5-7b", device="meta", dtype=torch.float16)
    params = list(loaded.model.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in params)
    assert 6.5e9 < sum(p.numel() for p in params) < 7.5e9
    manifest = describe(loaded, ExportSettings("fsr", budget=64, dtype="fp16"))
    assert manifest.relevance.source == "clip" and manifest.image.kept_image_tokens == 64
    backend = TorchBackend.from_model(loaded, manifest, device="meta")
    runners = {name: backend.runner(name) for name in ("vision", "embed", "decoder", "text_encoder", "pruning_op")}
    assert runners["decoder"].input_names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert len(runners["decoder"].input_names) == 3 + 2 * 32 and runners["vision"].output_names[1] == "kept_indices"
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="GPU"):
            targets_from_preset("llava-1.5-7b", [576, 64], "torch", tmp_path, cache_dir=tmp_path, device="cpu")


# ----------------------------------------------------------------------------- preset export cache


def test_preset_exports_are_made_once_and_reused(tmp_path):
    from fsr.bench.targets import BenchError, ensure_preset_exports
    from fsr.export import describe
    from fsr.manifest import FileRecord, sha256, write_manifest
    from fsr.models import load_model

    calls = []
    tiny = load_model("tiny", device="meta")  # shapes only: the manifests are real, the exports are not

    def exporter(loaded, output, settings, force=False):
        calls.append((settings.method, settings.budget))
        assert force or not output.exists()
        output.mkdir(parents=True, exist_ok=True)
        manifest = describe(tiny, settings)
        for name, graph in manifest.graphs.items():  # placeholder graph files, hashed like real ones
            (output / f"{name}.onnx").write_bytes(name.encode())
            graph.files = [FileRecord(f"{name}.onnx", sha256(output / f"{name}.onnx"))]
        write_manifest(output, manifest)

    def loader(name, dtype, seed):
        return object()

    with pytest.raises(BenchError, match=r"cannot benchmark method\(s\) \['uniform'\]"):
        ensure_preset_exports("tiny", [64], tmp_path, exporter=exporter, loader=loader, methods=("uniform",))
    first = ensure_preset_exports("tiny", [64, 600, 128], tmp_path, exporter=exporter, loader=loader)
    assert calls == [("none", None), ("fsr", 128), ("fsr", 64)]
    assert [r["budget"] for r in first] == [576, 128, 64] and not any(r["reused"] for r in first)
    assert first[0]["path"].endswith("llava-tiny-fp32-seed0/none")
    second = ensure_preset_exports("tiny", [576, 64], tmp_path, exporter=exporter, loader=loader)
    assert len(calls) == 3 and all(r["reused"] for r in second)
    again = ensure_preset_exports("tiny", [64], tmp_path, exporter=exporter, loader=loader, force=True)
    assert calls[3:] == [("none", None), ("fsr", 64)] and not any(r["reused"] for r in again)
    both = ensure_preset_exports("tiny", [64], tmp_path, exporter=exporter, loader=loader,
                                 methods=("fsr", "visionzip"))
    assert calls[5:] == [("visionzip", 64)]  # the unpruned and FSR exports are reused
    assert [(r["method"], r["reused"]) for r in both] == [("none", True), ("fsr", True), ("visionzip", False)]
    assert both[2]["path"].endswith("llava-tiny-fp32-seed0/visionzip-b64")


# ----------------------------------------------------------------------------- pruning inside the LLM


def test_pio_beside_fsr_at_equal_budget_per_segment(tmp_path):
    """``--methods fsr,pio-fvlm``: both methods at average budget 64 beside the unpruned model (the torch
    backend: the 16-layer preset built in memory, nothing exported); PIO-FVLM's row has one entry per
    decoder segment with its prefill time, the pruning graph's before it and its KV cache, and its KV
    total is their sum."""
    from fsr.bench.cli import main

    out = tmp_path / "bench.json"
    assert main(["--preset", "tiny-deep", "--backend", "torch", "--methods", "fsr,pio-fvlm", "--budgets", "64",
                 "--warmup", "0", "--repeat", "2", "--new-tokens", "2", "--json", str(out), "--markdown",
                 str(tmp_path / "bench.md")]) == 0
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["results"]}
    assert set(rows) == {"none", "fsr", "pio-fvlm"}
    pio, fsr, base = rows["pio-fvlm"], rows["fsr"], rows["none"]
    assert pio["budget"] == fsr["budget"] == 64 and pio["kept_tokens"] == 106  # the mean over 16 layers
    segments = pio["segments"]
    assert [s["layers"] for s in segments] == [[0, 1], [1, 10], [10, 15], [15, 16]]
    assert [s["image_tokens"] for s in segments] == [576, 92, 54, 22]
    assert [s["seq_len"] for s in segments] == [pio["seq_len"] - 576 + k for k in (576, 92, 54, 22)]
    assert all(s["prefill_ms"]["n"] == 2 for s in segments)
    assert [s.get("pruning_ms", {}).get("n") for s in segments] == [None, 2, 2, 2]
    llm = analytic.LLMDims(16, 64, 4, 2, 16, 128, 261)
    assert [s["kv_cache_bytes"] for s in segments] == [
        analytic.kv_cache_bytes(llm, 1, s["seq_len"], "fp32", layers=s["layers"][1] - s["layers"][0])
        for s in segments]
    assert pio["kv_cache_bytes"] == sum(s["kv_cache_bytes"] for s in segments)
    assert fsr["kv_cache_bytes"] < pio["kv_cache_bytes"] < base["kv_cache_bytes"]
    assert pio["analytic"]["prefill_flops_parts"]["llm_pruning"] > 0
    markdown = (tmp_path / "bench.md").read_text()
    assert "| 64 (pio-fvlm) | 1 | decoder_1 | 1–9 | 92 |" in markdown and "| 64 (fsr) | 1 |" in markdown


def test_backend_variants_side_by_side(export_none, tmp_path):
    """``python -m fsr.bench.variants``: one export under several backend options, interleaved."""
    from fsr.bench import variants

    out = tmp_path / "variants.json"
    assert variants.main([str(export_none), "--variant", "default:", "--variant", "plain:fused=false,spin=on,"
                          "embed_lookup=false", "--repeat", "2", "--warmup", "0", "--new-tokens", "3",
                          "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["variant"], r["options"]) for r in doc["rows"]] == [
        ("default", {}), ("plain", {"fused": False, "spin": "on", "embed_lookup": False})]
    assert all(r["timings_ms"]["ttft"]["n"] == 2 and r["loadavg"]["n"] == 2 for r in doc["rows"])
    assert variants.parse_variant("spin=stop") == ("spin=stop", {"spin": "stop"})
    with pytest.raises(variants.BenchError):
        variants.parse_variant("x:spin")
