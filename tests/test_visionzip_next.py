"""VisionZip per crop on LLaVA-NeXT (issue 11, last bullet; the method spec's section 5).

One tiny NeXT export at ``--budget 64`` (per crop: 54 + 10; ``next_vz64``, conftest.py) is
checked against a PyTorch reference written here from the spec, without the project's tower,
layout or pipeline code on the vision side: the Hugging Face LLaVA-NeXT vision tower per crop
with eager attention as upstream VisionZip reads it (``hidden_states[-2]`` with [CLS], that
layer's [CLS]-query attention summed over heads, its head-mean keys), the readable
``visionzip_reference`` per crop, the HF projector, then the section-5 layout (base crop in op
order; the tiles' dominant patches scattered onto the stitched grid with a mask and read
row-major; the tiles' [CLS] tokens; their contextual tokens), then Hugging Face ``generate`` on
``inputs_embeds``. Batch 1 with three aspect ratios (5, 3 and 4 crops) and batch 2 with two
(left padding). Then the manifest, onnx.checker, TensorRT-RTX, fsr-compare and fsr-bench.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from fsr.manifest import read_manifest
from fsr.models import get_spec
from fsr.pruning.methods import get_method
from fsr.pruning.visionzip import visionzip_crop_layout, visionzip_reference, visionzip_split
from fsr.runtime.pipeline import Pipeline
from fsr.runtime.reference import ReferencePipeline, cut_after_eos

MAX_NEW = 6
BUDGET = 64
PROMPTS = ["What is in this picture?", "Describe it.", "Which colour dominates the upper left part?"]


# ---------------------------------------------------------------------------- the independent reference


class HFNextVisionZip:
    """Upstream VisionZip's reading of LLaVA-NeXT on the export's ``source/`` model (the reference
    pipeline object is used for its tokenizer and chat template only)."""

    def __init__(self, export_dir):
        self.ref = ReferencePipeline.from_export(export_dir)
        self.model = self.ref.model
        self.tower = copy.deepcopy(self.model.model.vision_tower)
        self.tower.set_attn_implementation("eager")  # attention probabilities
        self.dominant, self.contextual = visionzip_split(self.ref.manifest.method.settings["budget"])

    @torch.no_grad()
    def crops(self, image):
        """Per crop (base first): projected VisionZip tokens [C, K, H], kept rows [C, K]; the tile grid."""
        config = self.model.config
        hf = self.ref.processor.image_processor(images=[image], return_tensors="pt")
        rows, cols = get_anyres_image_grid_shape(hf["image_sizes"][0], config.image_grid_pinpoints,
                                                 config.vision_config.image_size)
        pixels = hf["pixel_values"][0, :1 + rows * cols]
        out = self.tower(pixels, output_hidden_states=True, output_attentions=True)
        layer_index = config.vision_feature_layer  # -2
        hidden = out.hidden_states[layer_index]  # with [CLS]
        attention = out.attentions[layer_index][:, :, 0, :].sum(dim=1)  # the [CLS] query row, summed over heads
        layer = self.tower.encoder.layers[layer_index]
        attn = layer.self_attn
        c, t, _ = hidden.shape
        keys = attn.k_proj(layer.layer_norm1(out.hidden_states[layer_index - 1]))
        keys = keys.view(c, t, attn.num_heads, attn.head_dim).mean(dim=2)
        tokens, kept = visionzip_reference(hidden, attention, keys, dominant=self.dominant, contextual=self.contextual)
        return self.model.model.multi_modal_projector(tokens), kept, (rows, cols), t - 1

    @torch.no_grad()
    def image_tokens(self, image):
        """The spec's section 5, written from the spec: a mask over the stitched grid, read row-major."""
        tokens, kept, (rows, cols), n = self.crops(image)
        side, width, d = int(round(n ** 0.5)), tokens.shape[-1], self.dominant
        grid = torch.zeros(rows * side, cols * side, width)
        mask = torch.zeros(rows * side, cols * side, dtype=torch.bool)
        for tile in range(rows * cols):
            r, c = divmod(tile, cols)
            patches = kept[1 + tile, 1:d] - 1  # the dominant patches of this tile (its [CLS] is row 0)
            ys, xs = r * side + patches // side, c * side + patches % side
            grid[ys, xs] = tokens[1 + tile, 1:d]
            mask[ys, xs] = True
        sequence = torch.cat([tokens[0], grid[mask], tokens[1:, 0], tokens[1:, d:].reshape(-1, width)])
        assert sequence.shape[0] == (1 + rows * cols) * (self.dominant + self.contextual)
        return sequence, [k.numpy() for k in kept]

    @torch.no_grad()
    def generate(self, images, prompts):
        """HF ``generate`` on left-padded ``inputs_embeds`` (one image per prompt)."""
        ref, embed = self.ref, self.model.get_input_embeddings()
        sequences, kept = [], []
        for image, prompt in zip(images, prompts):
            ids = ref.tokenizer(ref.spec.format_prompt(ref.processor, prompt))["input_ids"]
            at = ids.index(ref.manifest.image.image_token_id)
            text = embed(torch.tensor([ids]))[0]
            image_tokens, image_kept = self.image_tokens(image)
            sequences.append(torch.cat([text[:at], image_tokens, text[at + 1:]]))
            kept.append(image_kept)
        width = max(s.shape[0] for s in sequences)
        pad = embed(torch.tensor([ref.pad_id]))[0]
        embeds = torch.stack([torch.cat([pad.expand(width - s.shape[0], -1), s]) for s in sequences])
        mask = torch.tensor([[0] * (width - s.shape[0]) + [1] * s.shape[0] for s in sequences])
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                                  pad_token_id=ref.pad_id, eos_token_id=sorted(ref.eos))
        return [cut_after_eos(row.tolist(), ref.eos) for row in out], kept


@pytest.fixture(scope="module")
def reference(next_vz64):
    return HFNextVisionZip(next_vz64)


@pytest.fixture(scope="module")
def pipe(next_vz64):
    with Pipeline(next_vz64) as p:
        yield p


def _same_kept(got, want):
    return len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name, crops", [("square", 5), ("wide", 3), ("tall", 4)])
def test_batch1_generates_exactly_the_hf_reference(pipe, reference, next_images, name, crops):
    image, prompt = next_images[name], PROMPTS[len(name) % 3]
    [got] = pipe.generate([image], [prompt], max_new_tokens=MAX_NEW)
    [expected], [kept] = reference.generate([image], [prompt])
    assert got.token_ids == expected and len(expected) > 1
    assert len(got.kept_indices) == crops and _same_kept(got.kept_indices, kept)
    assert all(k[0] == 0 and len(k) == BUDGET for k in got.kept_indices)  # [CLS] first, 64 rows per crop
    assert json.loads(json.dumps(got.to_json()))["kept_indices"] == [k.tolist() for k in kept]  # fsr-run --json


def test_batch2_of_different_crop_counts_generates_exactly_the_hf_reference(pipe, reference, next_images):
    images, prompts = [next_images["square"], next_images["tall"]], PROMPTS[:2]  # 5 and 4 crops
    got = pipe.generate(images, prompts, max_new_tokens=MAX_NEW)
    expected, kept = reference.generate(images, prompts)
    assert [g.token_ids for g in got] == expected
    assert all(_same_kept(g.kept_indices, k) for g, k in zip(got, kept))
    request = pipe.prepare(images, prompts)
    assert request.vision.rows_per_image == [5, 4]


def test_image_tokens_match_the_hf_reference(pipe, reference, next_images):
    """The embeddings the LLM receives, before the decoder (all four shapes in one vision call)."""
    names = list(next_images)
    request = pipe.prepare([next_images[n] for n in names], PROMPTS[:1] * len(names))
    features = pipe.vision(request, None)
    for name, [tokens] in zip(names, features.embeddings):
        want, _ = reference.image_tokens(next_images[name])
        np.testing.assert_allclose(tokens, want.numpy(), atol=1e-5, rtol=1e-5)


def test_torch_backend_generates_what_ort_does(pipe, next_vz64, next_images):
    images, prompts = [next_images["wide"], next_images["unpadded"]], PROMPTS[1:]
    with Pipeline(next_vz64, backend="torch") as torch_pipe:
        got = torch_pipe.generate(images, prompts, max_new_tokens=MAX_NEW)
    want = pipe.generate(images, prompts, max_new_tokens=MAX_NEW)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(_same_kept(g.kept_indices, w.kept_indices) for g, w in zip(got, want))


# ---------------------------------------------------------------------------- the layout and the plan


def test_crop_layout_orders_the_spec_way():
    """Two tiles side by side (grid 1x2), 2x2 patches each, dominant 3 (+ [CLS]), contextual 1: values
    name their slot so the order can be read."""
    spec = get_spec("llava-next")
    positions = [spec.tile_positions((1, 2), t, 2) for t in range(2)]
    assert positions[0].tolist() == [0, 1, 4, 5] and positions[1].tolist() == [2, 3, 6, 7]
    base = (np.array([[100.0], [101.0], [102.0], [103.0]]), np.array([0, 1, 3, 2]))
    tile0 = (np.array([[10.0], [11.0], [12.0], [13.0]]), np.array([0, 2, 3, 1]))  # patches 1, 2 -> grid 1, 4
    tile1 = (np.array([[20.0], [21.0], [22.0], [23.0]]), np.array([0, 1, 4, 2]))  # patches 0, 3 -> grid 2, 7
    out = visionzip_crop_layout(base, [tile0, tile1], positions, dominant=3)
    assert out[:, 0].tolist() == [100, 101, 102, 103, 11, 21, 12, 22, 10, 20, 13, 23]
    # the identity (budget >= 1 + N): every patch on the grid, then the [CLS] tokens
    identity = [(np.arange(5.0)[:, None] + 10 * (t + 1), np.arange(5)) for t in range(2)]
    out = visionzip_crop_layout(base, identity, positions, dominant=3)
    assert out[4:, 0].tolist() == [11, 12, 21, 22, 13, 14, 23, 24, 10, 20]


def test_manifest_says_the_budget_is_per_crop(next_vz64, pipe):
    m = read_manifest(next_vz64)
    assert list(m.graphs) == ["vision", "embed", "decoder"]  # no prune_b graphs: the op is in the vision graph
    assert (m.method.name, m.method.settings) == ("visionzip", {"budget": BUDGET})
    assert (m.image.num_image_tokens, m.image.kept_image_tokens) == (2928, 5 * BUDGET)
    details = m.method.details
    assert (details["dominant"], details["contextual"], details["budget_applies_to"]) == (54, 10, "crop")
    assert details["kept_tokens_per_image"] == {"3": 192, "4": 256, "5": 320}
    assert "stitched grid" in details["crop_layout"] and "one array per crop" in details["kept_indices"]
    vision = m.graphs["vision"]
    assert vision.output_names == ["image_tokens", "kept_indices"]
    assert vision.outputs[0].shape == ["batch", BUDGET, m.llm.hidden_size]
    model = onnx.load(next_vz64 / vision.file)
    [node] = [n for n in model.graph.node if n.op_type == "VisionZip"]
    assert {a.name: a.i for a in node.attribute} == {"dominant": 54, "contextual": 10}
    assert pipe.host_pruning() is None and pipe.pruning_plan() is not None
    # FSR on NeXT is unchanged: the op on host-gathered rows
    spec, fsr = get_spec("llava-next"), get_method("fsr")
    assert spec.prunes_on_host(fsr) and not spec.op_in_vision_graph(fsr)
    assert spec.op_in_vision_graph(get_method("visionzip")) and not spec.prunes_on_host(get_method("visionzip"))


def test_export_help_and_cli_line_say_per_crop(next_model):
    from typer.testing import CliRunner

    from fsr.export import ExportSettings
    from fsr.export.cli import app

    for family, says in [("llava-next", True), ("llava", False)]:
        result = CliRunner().invoke(app, [family, "--help"], env={"COLUMNS": "300"})
        assert result.exit_code == 0
        assert ("per crop for visionzip" in " ".join(result.output.split())) == says

    spec, method = get_spec("llava-next"), get_method("visionzip")
    settings = ExportSettings("visionzip", budget=32).method_settings
    line = spec.describe_method(next_model.config, method, settings)
    assert line == ("visionzip, budget 32 (27 dominant incl. [CLS] + 5 contextual) per crop: 96-160 tokens per "
                    "image (3-5 crops)")


# ---------------------------------------------------------------------------- checker, TensorRT, compare, bench


def test_every_graph_passes_the_full_checker_and_builds_with_tensorrt(next_vz64, tmp_path):
    from fsr.engines.builder import BuildSettings, build_engines
    from fsr.engines.trt_import import TensorRTMissing, import_tensorrt

    manifest = read_manifest(next_vz64, verify=True)
    for entry in manifest.graphs.values():
        onnx.checker.check_model(str(next_vz64 / entry.file), full_check=True)
    try:
        import_tensorrt()
    except TensorRTMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs tensorrt-rtx (the test extra) and must build engines: {exc}")
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc}")
    copy_dir = tmp_path / next_vz64.name
    shutil.copytree(next_vz64, copy_dir)
    build_engines(copy_dir, BuildSettings(precision="fp32", max_batch=2, max_seq=1024))
    manifest = read_manifest(copy_dir)
    for graph in manifest.graphs:
        assert (copy_dir / manifest.engines[f"{graph}.fp32"].file).stat().st_size > 10_000


def test_compare_runs_on_it(next_vz64, tmp_path):
    from fsr.compare.run import CompareOptions, compare_export

    report = compare_export(next_vz64, CompareOptions(backends=("torch", "ort"), out_dir=tmp_path, builtin_samples=2,
                                                      max_new_tokens=3))
    assert report["passed"], report["failures"]
    graphs = {g["graph"]: g for g in report["graphs"] if g["backend"] == "ort"}
    assert set(graphs) == {"vision", "embed", "decoder"} and all(g["status"] == "pass" for g in graphs.values())
    assert report["end_to_end"][0]["status"] == "pass"
    assert "several crops per image" in report["fidelity_skipped_reason"]


def test_bench_has_a_visionzip_row(next_vz64, next_none, tmp_path):
    from fsr.bench.cli import main

    args = [str(next_vz64), str(next_none), "--batch", "1", "--warmup", "0", "--repeat", "1", "--new-tokens", "2",
            "--peak-matmul", "128", "--peak-copy-mib", "4", "--json", str(tmp_path / "bench.json"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["method"]: row for row in doc["results"]}
    assert set(rows) >= {"visionzip"}
    assert rows["visionzip"]["seq_len"] < min(r["seq_len"] for r in doc["results"] if r is not rows["visionzip"])
