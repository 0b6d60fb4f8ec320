"""LLaVA-NeXT (anyres), the second family: layout, parity with Hugging Face, per-crop and
per-image FocusScanRefine against an independent PyTorch reference, the scope in the
manifest, onnx.checker and TensorRT-RTX builds of every graph.

Images of four shapes (``next_images``, conftest.py): square (2x2 grid), 2:1 (1x2), 1:3 (3x1),
and 5:4, whose stitched grid loses rows to unpadding (crops with fewer than 576 tokens reach
the op). VisionZip per crop on NeXT: test_visionzip_next.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from fsr.export import ExportSettings, export_model
from fsr.manifest import read_manifest
from fsr.models import get_spec
from fsr.models.llava_next import split_budget, unpadded_box
from fsr.pruning.fsr_reference import focus_scan_refine_reference
from fsr.runtime.pipeline import Pipeline
from fsr.runtime.reference import ReferencePipeline, cut_after_eos

MAX_NEW = 6
PROMPTS = ["What is in this picture?", "Describe it.", "Which colour dominates the upper left part?"]


def _export(tmp_path_factory, loaded, name, method, **options):
    out = tmp_path_factory.mktemp("next") / name
    export_model(loaded, out, ExportSettings(method, **options))
    return out


@pytest.fixture(scope="module")
def next_crop(next_model, tmp_path_factory):
    return _export(tmp_path_factory, next_model, "crop320", "fsr", budget=320)


@pytest.fixture(scope="module")
def next_image(next_model, tmp_path_factory):
    return _export(tmp_path_factory, next_model, "image320", "fsr", budget=320, fsr_scope="image")


# -- geometry ------------------------------------------------------------------------------


def test_split_budget_adds_up():
    assert split_budget(320, 5) == [64] * 5
    assert split_budget(320, 3) == [107, 107, 106]
    assert sum(split_budget(961, 4)) == 961


@pytest.mark.parametrize("original", [(400, 500), (500, 400), (900, 300), (336, 336), (1, 2000)])
def test_unpadded_box_is_hugging_faces_unpad(original):
    current = (48, 72)
    codes = torch.arange(current[0] * current[1]).view(1, *current)
    expected = unpad_image(codes, torch.tensor(original))[0]
    top, bottom, left, right = unpadded_box(original, current)
    assert torch.equal(codes[0, top:bottom, left:right], expected)


def test_layout_matches_hugging_face_pack_image_features(next_model, next_images):
    """Base crop, unpadded grid, a newline per row: the tokens of get_image_features, exactly."""
    spec, model, processor = get_spec("llava-next"), next_model.model, next_model.processor
    batch = spec.preprocess_images(processor, list(next_images.values()))
    tower = spec.vision_tower(next_model, ("tokens",), None)
    with torch.no_grad():
        tokens, newline = tower(torch.from_numpy(batch.pixel_values))
        hf = processor.image_processor(images=list(next_images.values()), return_tensors="pt")
        expected = model.model.get_image_features(hf["pixel_values"], hf["image_sizes"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
    got = spec.image_features({"tokens": tokens.numpy(), "image_newline": newline.numpy()}, batch)
    assert batch.rows_per_image == [5, 3, 4, 5]
    for mine, theirs in zip(got.embeddings, expected):
        np.testing.assert_array_equal(mine[0], theirs.numpy())
    assert expected[3].shape[0] < expected[0].shape[0]  # the 5:4 image lost grid rows to unpadding


# -- method none: exactly Hugging Face's generate ----------------------------------------------


def hf_generate(source, images, prompts):
    model = LlavaNextForConditionalGeneration.from_pretrained(source).eval()
    processor = AutoProcessor.from_pretrained(source)
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in prompts]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    eos = {model.generation_config.eos_token_id}
    return [cut_after_eos(row.tolist(), eos) for row in out[:, inputs["input_ids"].shape[1]:]]


def test_none_generates_exactly_hf_generate(next_none, next_images):
    """Three aspect ratios at batch 1, then batch 2 with two sizes (5 and 4 crops) in one call."""
    source = next_none / "source"
    ims = next_images
    cases = [([ims["square"]], PROMPTS[:1]), ([ims["wide"]], PROMPTS[1:2]), ([ims["tall"]], PROMPTS[2:3]),
             ([ims["square"], ims["tall"]], PROMPTS[:2])]
    with Pipeline(next_none) as pipe:
        for images, prompts in cases:
            expected = hf_generate(source, images, prompts)
            got = pipe.generate(images, prompts, max_new_tokens=MAX_NEW)
            assert [g.token_ids for g in got] == expected
            assert all(len(g.token_ids) > 1 for g in got)
    manifest = read_manifest(next_none)
    assert manifest.family == "llava-next" and list(manifest.graphs) == ["vision", "embed", "decoder"]


# -- FocusScanRefine per crop / per image: an independent PyTorch reference ----------------------


class Reference:
    """The HF model's own tower outputs, the readable FSR reference per crop (or per image) on the
    unpadded tokens, and the spec's newline layout, written here from fsr-op.md without the spec's
    code; then HF generate on the assembled embeddings."""

    def __init__(self, export_dir):
        self.ref = ReferencePipeline.from_export(export_dir)  # its model, CLIP and host steps (tokens, text side)
        self.manifest = self.ref.manifest
        self.model = self.ref.model
        settings = self.manifest.method.settings
        self.budget, self.scope = settings["budget"], settings["fsr_scope"]
        self.attrs = {k: settings[k] for k in ("alpha", "beta", "rho", "kappa")}
        self.model.model.vision_tower.config._attn_implementation = "eager"  # attention probabilities

    @torch.no_grad()
    def crops(self, image, prompt):
        """Per crop: tokens, features, saliency, relevance (all 576 patches)."""
        model, clip = self.model, self.ref.loaded.clip
        hf = self.ref.processor.image_processor(images=[image], return_tensors="pt")
        size = hf["image_sizes"][0]
        rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints,
                                                 model.config.vision_config.image_size)
        pixels = hf["pixel_values"][0, :1 + rows * cols]
        out = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        layer = len(out.hidden_states) - 1 + model.config.vision_feature_layer  # the feature layer's index
        features = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        saliency = out.attentions[layer].mean(dim=1)[:, 0, 1:]
        tokens = model.model.multi_modal_projector(features)
        text = torch.from_numpy(self.ref.instruction_embeds([prompt])).float()
        image_side = clip.visual_projection(clip.vision_model.post_layernorm(features))
        relevance = torch.nn.functional.cosine_similarity(image_side, text[:, None, :], dim=-1)
        return tokens, features, saliency, relevance, (rows, cols), (int(size[0]), int(size[1]))

    @torch.no_grad()
    def image_tokens(self, image, prompt):
        tokens, features, saliency, relevance, (rows, cols), size = self.crops(image, prompt)
        side = int(round(tokens.shape[1] ** 0.5))
        # the stitched grid of (crop, patch) codes, unpadded as Hugging Face does
        codes = torch.arange(1, 1 + rows * cols)[:, None] * tokens.shape[1] + torch.arange(tokens.shape[1])
        grid = codes.view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)
        grid = unpad_image(grid, size)[0]
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731  code -> row of t
        chosen = {}  # code -> the token the LLM receives
        kept = []
        if self.scope == "image":
            order = torch.cat([torch.arange(tokens.shape[1]), grid.flatten()])
            args = [flat(t)[order][None] for t in (tokens, features, saliency, relevance)]
            pruned, idx = focus_scan_refine_reference(*args, budget=self.budget, **self.attrs)
            chosen = {int(order[i]): pruned[0, j] for j, i in enumerate(idx[0])}
            kept = idx[0].numpy()
        else:
            n = 1 + rows * cols
            budgets = [self.budget // n + (c < self.budget % n) for c in range(n)]
            for c in range(n):
                members = torch.arange(tokens.shape[1]) + c * tokens.shape[1]
                if c:
                    members = grid.flatten()[(grid.flatten() // tokens.shape[1]) == c]  # grid raster order
                args = [flat(t)[members][None] for t in (tokens, features, saliency, relevance)]
                pruned, idx = focus_scan_refine_reference(*args, budget=budgets[c], **self.attrs)
                chosen.update({int(members[i]): pruned[0, j] for j, i in enumerate(idx[0])})
                kept.append(np.sort((members[idx[0]] % tokens.shape[1]).numpy()))
        newline = self.model.model.image_newline
        seq = [chosen[c] for c in range(tokens.shape[1]) if c in chosen]  # base crop, raster order
        for row in grid:
            seq += [chosen[int(c)] for c in row if int(c) in chosen] + [newline]
        return torch.stack(seq), kept

    @torch.no_grad()
    def generate(self, image, prompt):
        embeds, kept = self.image_tokens(image, prompt)
        ref = self.ref
        ids = ref.tokenizer(ref.spec.format_prompt(ref.processor, prompt))["input_ids"]
        at = ids.index(self.manifest.image.image_token_id)
        text = self.model.get_input_embeddings()(torch.tensor([ids]))[0]
        full = torch.cat([text[:at], embeds, text[at + 1:]])[None]
        out = self.model.generate(inputs_embeds=full, attention_mask=torch.ones(full.shape[:2], dtype=torch.long),
                                  max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=ref.pad_id,
                                  eos_token_id=sorted(ref.eos))
        return cut_after_eos(out[0].tolist(), ref.eos), kept


def _same_kept(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


@pytest.mark.parametrize("which", ["next_crop", "next_image"])
def test_fsr_generates_exactly_the_pytorch_reference(which, request, next_images):
    export = request.getfixturevalue(which)
    reference = Reference(export)
    with Pipeline(export) as pipe:
        for name, prompt in zip(["square", "unpadded"], PROMPTS):
            expected, kept = reference.generate(next_images[name], prompt)
            [got] = pipe.generate([next_images[name]], [prompt], max_new_tokens=MAX_NEW)
            assert got.token_ids == expected, name
            assert _same_kept(got.kept_indices, kept), name
            if which == "next_crop":
                assert sum(len(k) for k in got.kept_indices) == 320
        # batch 2, two sizes: each row as at batch 1, and as the reference pipeline (spec steps, PyTorch)
        images, prompts = [next_images["wide"], next_images["tall"]], PROMPTS[1:]
        got = pipe.generate(images, prompts, max_new_tokens=MAX_NEW)
        ref = reference.ref.generate(images, prompts, max_new_tokens=MAX_NEW)
        assert [g.token_ids for g in got] == [r.token_ids for r in ref]
        assert all(_same_kept(g.kept_indices, r.kept_indices) for g, r in zip(got, ref))
        for image, prompt, g in zip(images, prompts, got):
            assert _same_kept(g.kept_indices, reference.image_tokens(image, prompt)[1])


def test_scope_is_recorded_and_read_back(next_crop, next_image):
    crop, image = read_manifest(next_crop), read_manifest(next_image)
    assert crop.method.settings["fsr_scope"] == "crop" and image.method.settings["fsr_scope"] == "image"
    # crop scope: a graph per per-crop budget (3, 4 or 5 crops); image scope: the total
    assert [g for g in crop.graphs if g.startswith("prune_")] == ["prune_b64", "prune_b80", "prune_b106",
                                                                  "prune_b107"]
    assert [g for g in image.graphs if g.startswith("prune_")] == ["prune_b320"]
    with Pipeline(next_image) as pipe:
        hp = pipe.host_pruning()
        assert (hp.scope, hp.budget) == ("image", 320)


# -- onnx.checker (full) and TensorRT-RTX on this CPU ------------------------------------------


@pytest.mark.parametrize("which", ["next_none", "next_crop", "next_image"])
def test_every_graph_passes_the_full_checker(which, request):
    export = request.getfixturevalue(which)
    manifest = read_manifest(export, verify=True)
    for name, entry in manifest.graphs.items():
        onnx.checker.check_model(str(export / entry.file), full_check=True)
    for name in manifest.graphs:
        if name.startswith("prune_"):
            model = onnx.load(export / manifest.graphs[name].file)
            [node] = [n for n in model.graph.node if n.op_type == "FocusScanRefine"]
            budget = next(a.i for a in node.attribute if a.name == "budget")
            assert f"prune_b{budget}" == name


def test_every_graph_builds_with_tensorrt(next_none, next_crop, next_image, tmp_path):
    """fp32 engines of every graph of the none and per-crop exports, and the image scope's prune graph."""
    import os
    import shutil

    from fsr.engines.builder import BuildSettings, build_engines
    from fsr.engines.trt_import import TensorRTMissing, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs tensorrt-rtx (the test extra) and must build engines: {exc}")
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc}")
    for export, graphs in [(next_none, ()), (next_crop, ()), (next_image, ("prune_b320",))]:
        copy = tmp_path / export.name
        shutil.copytree(export, copy)
        build_engines(copy, BuildSettings(precision="fp32", max_batch=2, max_seq=1024, graphs=graphs))
        manifest = read_manifest(copy)
        for graph in graphs or manifest.graphs:
            assert (copy / manifest.engines[f"{graph}.fp32"].file).stat().st_size > 10_000


# -- fsr-compare and fsr-bench on NeXT exports -------------------------------------------------


def test_compare_runs_on_a_next_export(next_crop, tmp_path):
    """Every graph (the prune graphs on real crop rows, two token counts) and end to end, torch vs ort."""
    from fsr.compare.run import CompareOptions, compare_export

    report = compare_export(next_crop, CompareOptions(backends=("torch", "ort"), out_dir=tmp_path, builtin_samples=2,
                                                      max_new_tokens=3))
    assert report["passed"], report["failures"]
    graphs = {g["graph"]: g for g in report["graphs"] if g["backend"] == "ort"}
    assert set(graphs) == set(read_manifest(next_crop).graphs)
    assert all(g["status"] == "pass" for g in graphs.values())
    assert report["end_to_end"][0]["status"] == "pass"
    assert "prunes crops on the host" in report["fidelity_skipped_reason"]


def test_bench_runs_on_next_exports(next_crop, next_none, tmp_path):
    import json

    from fsr.bench.cli import main

    args = [str(next_crop), str(next_none), "--batch", "1", "--warmup", "0", "--repeat", "1", "--new-tokens", "2",
            "--peak-matmul", "128", "--peak-copy-mib", "4", "--json", str(tmp_path / "bench.json"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["budget"]: row for row in doc["results"]}
    assert set(rows) == {320, None}  # None: the unpruned export
    assert rows[320]["seq_len"] < rows[None]["seq_len"]
    # transformers generate gets the same images (the crop grid the pipelines see): the same prompt length
    [ref] = doc["transformers"]
    assert ref["seq_len"] == rows[None]["seq_len"]


def test_7b_preset_plans_its_graphs_on_the_meta_device():
    """The real LLaVA-v1.6-7B dimensions (no weights): the graphs an export at 640 per crop / 960 per image plans."""
    from fsr.export import ExportSettings, describe

    loaded = get_spec("llava-next").build_preset("llava-v1.6-7b", dtype=torch.float16, device="meta")
    crop = describe(loaded, ExportSettings("fsr", budget=640))
    assert (crop.llm.hidden_size, crop.llm.num_layers, crop.vision.tokens_per_crop) == (4096, 32, 576)
    assert crop.image.num_image_tokens == 576 + 48 * 49  # 672x672: base + 2x2 tiles + a newline per grid row
    assert [g for g in crop.graphs if g.startswith("prune_")] == ["prune_b128", "prune_b160", "prune_b213",
                                                                  "prune_b214"]
    image = describe(loaded, ExportSettings("fsr", budget=960, fsr_scope="image"))
    assert [g for g in image.graphs if g.startswith("prune_")] == ["prune_b960"]


def test_pruning_inside_the_llm_is_refused_with_a_message(tmp_path):
    """A NeXT image's token count varies with its grid; a method that prunes inside the LLM plans fixed
    token counts per stage: fsr-export refuses it (exit 2, the reason, nothing written)."""
    from typer.testing import CliRunner

    from fsr.export.cli import app

    out = tmp_path / "x"
    r = CliRunner().invoke(app, ["llava-next", "--method", "pio-fvlm", "--pio-schedule", "1:32", "-o", str(out)])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "gives each image a variable number of tokens" in text and "cannot be exported for it" in text
    assert not out.exists() and list(tmp_path.iterdir()) == []
