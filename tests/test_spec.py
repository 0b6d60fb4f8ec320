"""The model spec: families from the registry, checkpoint detection, the graphs the exporter,
the PyTorch back end and the comparisons share, and the prefill assembly for images of
different token counts (what a multi-crop family needs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fsr.manifest import read_manifest
from fsr.models import ModelError, check_checkpoint, family_of, get_spec
from fsr.models.spec import EXPORT, REFERENCE, TORCH


def test_family_is_detected_from_config_json(export_none, tmp_path):
    assert family_of(export_none / "source") == "llava"
    check_checkpoint(export_none / "source", "llava")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    assert family_of(tmp_path) == "llava-next"
    with pytest.raises(ModelError, match="export it with `fsr-export llava-next`"):
        check_checkpoint(tmp_path, "llava")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ModelError, match="holds a 'qwen2_5_vl' checkpoint"):
        family_of(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot be read as JSON"):
        check_checkpoint(tmp_path, "llava")


def test_config_without_the_expected_sub_configs_is_refused(tmp_path):
    spec = get_spec("llava")
    with pytest.raises(ModelError, match="no vision_config / text_config"):
        spec.check_config({"model_type": "llava"}, tmp_path)
    with pytest.raises(ModelError, match="CLIP vision tower"):
        spec.check_config({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"},
                           "text_config": {"model_type": "llama"}}, tmp_path)
    with pytest.raises(ModelError, match="single feature layer"):
        spec.check_config({"model_type": "llava", "vision_feature_layer": [-2, -5], "vision_config": {},
                           "text_config": {"model_type": "llama"}}, tmp_path)


@pytest.mark.parametrize("which", ["export_none", "export_fsr64"])
def test_one_list_of_graphs_for_export_torch_and_reference(which, request, tiny_model):
    """The spec's graphs carry the names and I/O the export wrote, in every form."""
    export = request.getfixturevalue(which)
    manifest = read_manifest(export)
    spec = get_spec(manifest.family)
    exported = spec.graphs(tiny_model, manifest, EXPORT)
    assert [g.name for g in exported] == list(manifest.graphs)
    for form in (TORCH, REFERENCE):
        for graph in spec.graphs(tiny_model, manifest, form):
            entry = manifest.graphs[graph.name]
            assert graph.input_names == entry.input_names, (form, graph.name)
            assert graph.output_names == entry.output_names, (form, graph.name)


def test_torch_and_reference_vision_forms_agree(tiny_model, export_fsr64):
    manifest = read_manifest(export_fsr64)
    spec = get_spec("llava")
    fixed = spec.vision_graph(tiny_model, manifest, TORCH).module
    reference = spec.vision_graph(tiny_model, manifest, REFERENCE).module
    torch.manual_seed(0)
    args = (torch.randn(2, 3, 336, 336), torch.randn(2, 32))
    with torch.no_grad():
        (a, ka), (b, kb) = fixed(*args), reference(*args)
    assert torch.equal(ka, kb) and ka.shape == (2, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_prefill_assembly_with_images_of_different_lengths():
    """Rows whose images give different token counts (a multi-crop family, batch rows of different
    aspect ratios): each image replaces its image token; left padding; 1-D positions; spans."""
    spec = get_spec("llava")
    image_id, hidden = 9, 4
    rows = [[1, 2, image_id, 3], [1, image_id, 3, 4, 5, 6]]
    text = [np.full((len(r), hidden), 10.0 * (b + 1), np.float32) + np.arange(len(r))[:, None] for b, r in
            enumerate(rows)]
    images = [[np.full((5, hidden), -1.0, np.float32)], [np.full((2, hidden), -2.0, np.float32)]]
    pad = np.zeros(hidden, np.float32)
    out = spec.assemble_prefill(rows, text, images, image_id, pad)
    assert out.inputs_embeds.shape == (2, 8, hidden) and out.attention_mask.tolist() == [[1] * 8, [0] + [1] * 7]
    assert out.image_spans == [[(2, 5)], [(2, 2)]]
    np.testing.assert_array_equal(out.inputs_embeds[0, 2:7], images[0][0])
    np.testing.assert_array_equal(out.inputs_embeds[1, 2:4], images[1][0])
    np.testing.assert_array_equal(out.inputs_embeds[1, 4:], text[1][2:])
    np.testing.assert_array_equal(out.inputs_embeds[1, 0], pad)
    assert out.position_ids.tolist() == [list(range(8)), [1, *range(7)]]
    with pytest.raises(ValueError, match="row 0 has 1 image token"):
        spec.assemble_prefill(rows, text, [[], images[1]], image_id, pad)


def test_dims_are_written_once(tiny_model):
    spec = get_spec("llava")
    llm = spec.llm_dims(tiny_model.config)
    assert llm.head_dim == 16 and llm.num_kv_heads == 2 and llm.num_heads == 4
    vision = spec.vision_dims(tiny_model.config)
    assert (vision.tokens_per_crop, vision.image_size, vision.patch_size, vision.has_cls) == (576, 336, 14, True)
    assert spec.num_image_tokens(tiny_model.config) == 576
