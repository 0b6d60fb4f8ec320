"""PIO-FVLM inside the exported LLM (``fsr-export llava --method pio-fvlm``) on the 16-layer
``tiny-deep`` preset with the spec's LLaVA-1.5 schedule for average budget 64 (1:92,10:54,15:22):
the plan, each exported pruning graph against the PyTorch closed form, the weights the pruning
graphs share with the decoder segments, and generation on ONNX Runtime and PyTorch against the
reference pipeline (transformers' layers with the autograd reference at the same layers)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fsr.export import ExportConfigError, ExportSettings, describe, export_model
from fsr.manifest import read_manifest
from fsr.models import get_spec, load_model
from fsr.onnx_io import SHARED_WEIGHTS_DATA, SHARED_WEIGHTS_INDEX
from fsr.runtime.pipeline import Pipeline
from fsr.runtime.reference import ReferencePipeline
from fsr.settings import SettingsError

MAX_NEW = 8
LAYERS = [[0, 1], [1, 10], [10, 15], [15, 16]]
TOKENS = [576, 92, 54, 22]


@pytest.fixture(scope="module")
def manifest(export_pio64):
    return read_manifest(export_pio64, verify=True)


@pytest.fixture(scope="module")
def source(export_pio64):
    return load_model(str(export_pio64 / "source"))


@pytest.fixture(scope="module")
def pipe(export_pio64):
    with Pipeline(export_pio64) as p:
        yield p


@pytest.fixture(scope="module")
def reference(export_pio64):
    return ReferencePipeline.from_export(export_pio64)


def test_the_plan(manifest):
    assert manifest.method.name == "pio-fvlm" and manifest.method.settings["budget"] == 64
    segments = manifest.decoder_segments
    assert [s.layers for s in segments] == LAYERS
    assert [s.prune_before for s in segments] == [None, "pruning_1", "pruning_10", "pruning_15"]
    assert [s.image_tokens for s in segments] == TOKENS
    assert list(manifest.graphs) == ["vision", "embed", "decoder_0", "pruning_1", "decoder_1", "pruning_10",
                                     "decoder_2", "pruning_15", "decoder_3"]
    # the mean over the 16 layers (the spec's 64 is over LLaVA-1.5's 32)
    assert manifest.image.kept_image_tokens == round((576 + 9 * 92 + 5 * 54 + 22) / 16)
    assert manifest.relevance.source is None and "text_encoder" not in manifest.graphs
    assert manifest.graph("vision").output_names == ["image_tokens"]
    pruning = manifest.graph("pruning_1")
    assert pruning.input_names == ["hidden_states", "attention_mask", "position_ids", "image_start"]
    assert pruning.output_names[:4] == ["hidden_states_out", "attention_mask_out", "position_ids_out",
                                        "kept_indices"]
    assert pruning.outputs[3].shape == ["batch", 92]


def test_plans_and_errors_without_exporting(source):
    explicit = describe(source, ExportSettings("pio-fvlm", pio_schedule="2:300,8:40"))
    assert [s.layers for s in explicit.decoder_segments] == [[0, 2], [2, 8], [8, 16]]
    assert [s.image_tokens for s in explicit.decoder_segments] == [576, 300, 40]
    with pytest.raises(SettingsError, match="choose one of 64, 128, 192"):
        describe(source, ExportSettings("pio-fvlm", budget=100))
    with pytest.raises(SettingsError, match="not both"):
        ExportSettings("pio-fvlm", budget=64, pio_schedule="1:92")
    with pytest.raises(SettingsError, match="--pio-encoder-tokens needs --pio-schedule"):
        ExportSettings("pio-fvlm", pio_encoder_tokens=96)
    with pytest.raises(SettingsError, match="stage 2: keeps 92 visual tokens but only 54 enter it"):
        ExportSettings("pio-fvlm", pio_schedule="1:54,10:92")
    with pytest.raises(ExportConfigError, match="layer 16 is out of range for an LLM with 16 layers"):
        describe(source, ExportSettings("pio-fvlm", pio_schedule="16:32"))
    with pytest.raises(ExportConfigError, match="stage 1 keeps 600 visual tokens but only 576 enter"):
        describe(source, ExportSettings("pio-fvlm", pio_schedule="1:600"))


def _stage_inputs(gen, n, layout, hidden_size, scale):
    """Left-padded rows (text before, text after) around an n-token image span."""
    width = max(before + n + after for before, after in layout)
    hidden = torch.randn(len(layout), width, hidden_size, generator=gen) * scale
    mask = torch.zeros(len(layout), width, dtype=torch.int64)
    starts = []
    for b, (before, after) in enumerate(layout):
        pad = width - (before + n + after)
        mask[b, pad:] = 1
        starts.append(pad + before)
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    return hidden, mask, positions, torch.tensor(starts)


@pytest.mark.parametrize("graph", ["pruning_1", "pruning_10", "pruning_15"])
def test_each_pruning_graph_matches_the_closed_form(export_pio64, manifest, source, pipe, graph):
    """Each exported pruning graph (ONNX Runtime, with the weights it shares with the decoder segments)
    against `PioPruningStage` on the source model (PyTorch): same kept indices, gathered rows, masks and
    renumbered positions exactly, saliency within 1e-5 relative (fp32); batch 1 to 3, left padding,
    spans at different places."""
    spec = get_spec("llava")
    module = spec.graph(source, manifest, graph, form="torch").module.eval()
    runner = pipe.runners[graph]
    n = module.num_visual
    gen = torch.Generator().manual_seed(int(graph.split("_")[1]))
    scale = float(source.model.get_input_embeddings().weight.detach().std())
    for layout in ([(5, 20)], [(3, 9), (12, 4)], [(6, 30), (2, 5), (9, 11)]):
        hidden, mask, positions, starts = _stage_inputs(gen, n, layout, manifest.llm.hidden_size, scale * 20)
        got = runner.infer({"hidden_states": hidden.numpy(), "attention_mask": mask.numpy(),
                            "position_ids": positions.numpy(), "image_start": starts.numpy()})
        with torch.no_grad():
            want = dict(zip(runner.output_names, module(hidden, mask, positions, starts)))
        np.testing.assert_array_equal(got["kept_indices"], want["kept_indices"].numpy())
        for name in ("hidden_states_out", "attention_mask_out", "position_ids_out"):
            np.testing.assert_array_equal(got[name], want[name].numpy())
        saliency = want["saliency"].numpy()
        assert float(np.abs(got["saliency"] - saliency).max() / np.abs(saliency).max()) <= 1e-5
        assert got["hidden_states_out"].shape[1] == hidden.shape[1] - n + module.keep


def test_the_pruning_graphs_share_the_decoder_segments_weights(export_pio64, manifest, source):
    """Each pruning graph's matrices (its proxy layer = the next segment's first layer, and the LM head)
    are not in its file: they are external data referring to the bytes the decoder segments keep in
    their own weight files (shared with their fused ONNX Runtime forms), at the segments' offsets,
    byte-identical to the model's ``W``. Nothing is stored twice: no shared_weights file is needed."""
    assert not (export_pio64 / SHARED_WEIGHTS_INDEX).exists() and not (export_pio64 / SHARED_WEIGHTS_DATA).exists()
    params = {n: p.detach().numpy() for n, p in source.model.named_parameters() if p.dim() == 2}

    def external(model):
        out = {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                out[t.name] = (info["location"], int(info["offset"]), int(info["length"]), tuple(t.dims))
        return out

    segments = {s.graph: external(onnx.load(export_pio64 / f"{s.graph}.onnx", load_external_data=False))
                for s in manifest.decoder_segments}
    stored = {(loc, off) for refs in segments.values() for loc, off, _, _ in refs.values()}
    last = manifest.decoder_segments[-1].graph
    for graph, layer in (("pruning_1", 1), ("pruning_10", 10), ("pruning_15", 15)):
        segment = next(s.graph for s in manifest.decoder_segments if s.prune_before == graph)
        model = onnx.load(export_pio64 / f"{graph}.onnx", load_external_data=False)
        found = set()
        for location, offset, length, dims in external(model).values():
            assert location in (f"{segment}.onnx.data", f"{last}.onnx.data") and (location, offset) in stored
            with open(export_pio64 / location, "rb") as f:
                f.seek(offset)
                array = np.frombuffer(f.read(length), np.float32).reshape(dims)
            found |= {n for n, p in params.items() if p.shape == array.shape and np.array_equal(p, array)}
        # the graphs keep each weight in its module's layout (fsr.export.trace): W, not W^T
        assert found == {f"model.language_model.layers.{layer}.{m}.weight" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")} | {"lm_head.weight"}
        inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and t.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(t).size >= 256]
        assert not inline, [t.name for t in inline]
        files = [f.path for f in manifest.graph(graph).files]
        assert files == [f"{graph}.onnx", *dict.fromkeys([f"{segment}.onnx.data", f"{last}.onnx.data"])]
    # every segment has its fused ONNX Runtime form, on the same weight file
    for s in manifest.decoder_segments:
        entry = manifest.graph(s.graph)
        assert list(entry.forms) == ["ort"]
        assert [f.path for f in entry.forms["ort"].files] == [f"{s.graph}.ort.onnx", f"{s.graph}.onnx.data"]


def test_pruning_graphs_do_not_grow_with_keep(export_pio64):
    """keep = 92, 54, 22: the same graph (the NMS steps are one Loop in the fsr.PioNms function)."""
    models = [onnx.load(export_pio64 / f"pruning_{layer}.onnx", load_external_data=False) for layer in (1, 10, 15)]
    assert len({len(m.graph.node) for m in models}) == 1
    keeps = [next(onnx.helper.get_attribute_value(a) for n in m.graph.node if n.op_type == "PioNms"
                  for a in n.attribute if a.name == "keep") for m in models]
    assert keeps == [92, 54, 22]
    for m in models:
        meta = {p.key: p.value for p in m.metadata_props}
        assert meta["pio.proxy_layer"] in {"1", "10", "15"} and meta["pio.tau"] == "0.8"


def _kept_lengths(result):
    return [len(k) for k in result.kept_indices]


@pytest.mark.parametrize("i", range(3))
def test_batch1_generates_the_reference(pipe, reference, images, prompts, i):
    [got] = pipe.generate([images[i]], [prompts[i]], max_new_tokens=MAX_NEW)
    [want] = reference.generate([images[i]], [prompts[i]], max_new_tokens=MAX_NEW)
    assert _kept_lengths(got) == [92, 54, 22]
    assert got.kept_indices == want.kept_indices  # per stage, as indices of the image's 576 tokens
    assert all(set(b) <= set(a) for a, b in zip(got.kept_indices, got.kept_indices[1:]))
    assert got.token_ids == want.token_ids


def test_batch2_left_padding_generates_the_reference(pipe, reference, images, prompts):
    got = pipe.generate(images[1:3], prompts[:2], max_new_tokens=MAX_NEW)
    want = reference.generate(images[1:3], prompts[:2], max_new_tokens=MAX_NEW)
    assert [g.kept_indices for g in got] == [w.kept_indices for w in want]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].token_ids != got[1].token_ids  # the model answers its input (not one token for all)


def test_the_decode_state_carries_per_segment_kv_lengths_and_offsets(pipe, images, prompts):
    request = pipe.prepare(images[:2], [prompts[0], prompts[1]])
    inputs = pipe.assemble(request.rows, pipe.vision(request, None))
    state = pipe.prefill(inputs)
    length = inputs.attention_mask.shape[1]
    assert [s.attention_mask.shape[1] for s in state.segments] == [length - 576 + k for k in TOKENS]
    assert [s.cache[0].shape[2] for s in state.segments] == [length - 576 + k for k in TOKENS]
    assert [s.position_offset.tolist() for s in state.segments] == [[0, 0], [484, 484], [522, 522], [554, 554]]
    state = pipe.decode(state, pipe.next_tokens(state))
    assert [s.cache[0].shape[2] for s in state.segments] == [length - 576 + k + 1 for k in TOKENS]


def test_torch_backend_generates_the_same(export_pio64, pipe, images, prompts):
    with Pipeline(export_pio64, backend="torch", device="cpu") as torch_pipe:
        got = torch_pipe.generate(images[:2], prompts[1:3], max_new_tokens=MAX_NEW)
    want = pipe.generate(images[:2], prompts[1:3], max_new_tokens=MAX_NEW)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.kept_indices for g in got] == [w.kept_indices for w in want]


def test_fsr_run_cli(export_pio64, images, capsys):
    from fsr.runtime.cli import main

    import sys

    argv = sys.argv
    sys.argv = ["fsr-run", str(export_pio64), "--image", str(images[0]), "--prompt", "What is this?",
                "--max-new-tokens", "4", "--json"]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = argv
    assert done.value.code == 0
    [result] = json.loads(capsys.readouterr().out)["results"]  # one shape since issue 9
    assert len(result["token_ids"]) == 4 and len(result["kept_indices"]) == 3  # one entry per stage


# ----------------------------------------------------------------------------- w/ VE


@pytest.fixture(scope="module")
def export_ve(tmp_path_factory):
    """The encoder-side stage (96 tokens enter the LLM) and one stage after layer 1 (1:32), on ``tiny``."""
    out = tmp_path_factory.mktemp("exports") / "pio_ve"
    export_model(load_model("tiny"), out, ExportSettings("pio-fvlm", pio_schedule="1:32", pio_encoder_tokens=96))
    return out


def test_encoder_side_stage(export_ve, images, prompts):
    manifest = read_manifest(export_ve)
    assert [s.image_tokens for s in manifest.decoder_segments] == [96, 32]
    assert manifest.graph("vision").output_names == ["image_tokens", "kept_indices"]
    assert manifest.graph("vision").outputs[0].shape[1] == 96
    reference = ReferencePipeline.from_export(export_ve)
    with Pipeline(export_ve) as pipe:
        got = pipe.generate(images[:2], prompts[:2], max_new_tokens=4)
    want = reference.generate(images[:2], prompts[:2], max_new_tokens=4)
    for g, w in zip(got, want):
        assert _kept_lengths(g) == [96, 32] and g.kept_indices == w.kept_indices
        assert set(g.kept_indices[1]) <= set(g.kept_indices[0])  # indices of the image's 576 tokens
        assert g.token_ids == w.token_ids


# ----------------------------------------------------------------------------- fsr-compare


def test_fsr_compare(export_pio64, tmp_path):
    """Polygraphy compares each pruning graph (ONNX Runtime) with its PyTorch reference (the readable
    reference, autograd, row by row), end to end on ONNX Runtime, and the fidelity report has
    pio-fvlm rows beside FSR's (its kept tokens: the mean over the LLM's layers)."""
    from fsr.compare.run import CompareOptions, compare_export

    report = compare_export(export_pio64, CompareOptions(
        backends=("torch", "ort"), graphs=("pruning_1", "pruning_10", "pruning_15", "decoder_1"),
        budgets=(576, 64), methods=("pio-fvlm", "fsr"), out_dir=tmp_path, builtin_samples=1, max_new_tokens=4))
    assert report["passed"], report["failures"]
    graphs = {g["graph"]: g for g in report["graphs"]}
    for name in ("pruning_1", "pruning_10", "pruning_15"):
        outputs = {o["output"]: o for o in graphs[name]["outputs"] if o["iteration"] == 0}
        assert graphs[name]["status"] == "pass" and outputs["kept_indices"]["max_absdiff"] == 0.0
        assert outputs["saliency"]["max_absdiff"] <= 1e-4 * outputs["saliency"]["reference_max_abs"]
        assert graphs[name]["command"].startswith("polygraphy run")
    [e2e] = report["end_to_end"]
    assert e2e["status"] == "pass" and e2e["exact_sequences"] == 1
    rows = {(r["method"], r["budget"]): r for r in report["fidelity"]["rows"]}
    assert rows[("pio-fvlm", 576)]["kl_mean"] == 0.0 and rows[("pio-fvlm", 576)]["top1_agreement"] == 1.0
    assert rows[("pio-fvlm", 64)]["kept_tokens"] == 106 and rows[("fsr", 64)]["kept_tokens"] == 64
    assert rows[("pio-fvlm", 64)]["kl_mean"] > 0.0


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args, message", [
    (["--budget", "100"], "no schedule for average budget 100; choose one of 64, 128, 192"),
    (["--budget", "64", "--pio-schedule", "1:92"], "not both"),
    (["--pio-schedule", "1:54,10:92"], "stage 2: keeps 92 visual tokens but only 54 enter it"),
    (["--pio-schedule", "0:92"], "layers are 1-based"),
    (["--pio-encoder-tokens", "96"], "--pio-encoder-tokens needs --pio-schedule"),
    (["--pio-schedule", "16:32", "--model", "tiny-deep"], "layer 16 is out of range for an LLM with 16 layers"),
])
def test_fsr_export_refuses_bad_pio_options(tmp_path, capsys, args, message):
    from fsr.cli import run_app
    from fsr.export.cli import app

    code = run_app(app, ["llava", "--method", "pio-fvlm", *args, "-o", str(tmp_path / "out")], prog_name="fsr-export")
    assert code == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_pio_options_do_not_apply_to_other_methods(tmp_path, capsys):
    from fsr.cli import run_app
    from fsr.export.cli import app

    assert run_app(app, ["llava", "--method", "fsr", "--pio-schedule", "1:92", "-o", str(tmp_path / "o")],
                   prog_name="fsr-export") == 2
    assert "--pio-schedule do(es) not apply to method 'fsr'" in " ".join(capsys.readouterr().err.split())
