"""The traceable LLaVA parts compute what transformers computes."""

from __future__ import annotations

import pytest
import torch

from fsr.models import ModelError, get_spec, load_model, resolve_model_path
from fsr.models.llava import PRESETS

FSR_INPUTS = ("tokens", "features", "saliency", "relevance")
SPEC = get_spec("llava")


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 336, 336)


def test_tiny_preset_geometry(tiny_model):
    cfg = tiny_model.model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads  # grouped-query attention
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert tiny_model.processor.tokenizer.image_token == "<image>"
    assert tiny_model.clip is not None and set(PRESETS) >= {"tiny", "small", "llava-1.5-7b"}


def test_preset_is_deterministic():
    a, b = load_model("tiny", seed=3).model.state_dict(), load_model("tiny", seed=3).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vision_prefix_matches_transformers(tiny_model, pixels):
    llava = tiny_model.model
    prefix = SPEC.vision_tower(tiny_model, FSR_INPUTS, "clip")
    with torch.no_grad():
        tokens, features, saliency, relevance = prefix(pixels, torch.randn(2, 32))
        hf = llava.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default")
        hidden = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert tokens.shape == (2, 576, llava.config.text_config.hidden_size)
    torch.testing.assert_close(tokens, torch.stack(list(hf.pooler_output)))
    torch.testing.assert_close(features, hidden[-2][:, 1:])
    assert relevance.shape == saliency.shape == (2, 576)
    assert relevance.abs().max() <= 1 + 1e-6


def test_saliency_is_cls_attention_of_the_feature_layer(tiny_model, pixels):
    """CLS-row attention computed alone equals the eager attention probabilities of layer -2."""
    eager = load_model("tiny").model
    eager.model.vision_tower.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager.model.vision_tower(pixels, output_attentions=True).attentions
        tower = SPEC.vision_tower(tiny_model, FSR_INPUTS, "llm-embedding-mean")
        _, _, saliency, _ = tower(pixels, torch.randn(2, 64))
    expected = att[-2].mean(1)[:, 0, 1:]
    torch.testing.assert_close(saliency, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(saliency, att[-1].mean(1)[:, 0, 1:])  # and not the last layer's


def test_decoder_segments_compose(tiny_model):
    """Layers [0,1) then [1,2) give the same logits and caches as [0,2): the split a method that
    prunes inside the LLM (PIO-FVLM) will use."""
    cfg = tiny_model.model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    b, s, p = 2, 5, 3
    torch.manual_seed(0)
    past = [torch.randn(b, cfg.num_key_value_heads, p, hd) for _ in range(2 * cfg.num_hidden_layers)]
    x = torch.randn(b, s, cfg.hidden_size)
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[0, :2] = 0
    pos = torch.arange(p, p + s).repeat(b, 1)
    with torch.no_grad():
        full = SPEC.decoder_step(tiny_model, 0, 2)(x, mask, pos, *past)
        h, *pres0 = SPEC.decoder_step(tiny_model, 0, 1)(x, mask, pos, *past[:2])
        logits, *pres1 = SPEC.decoder_step(tiny_model, 1, 2)(h, mask, pos, *past[2:])
    torch.testing.assert_close(logits, full[0])
    for a, e in zip(pres0 + pres1, full[1:]):
        torch.testing.assert_close(a, e)
    with pytest.raises(ModelError, match="outside the LLM"):
        SPEC.decoder_step(tiny_model, 1, 5)


def test_segmented_export_generates_the_same(tmp_path, export_none, images, prompts):
    """An export whose decoder is cut after layer 1 generates exactly what the single decoder does."""
    from fsr.export import ExportSettings, export_model
    from fsr.runtime.pipeline import Pipeline

    out = tmp_path / "split"
    export_model(load_model("tiny"), out, ExportSettings("none", decoder_splits=(1,)))
    with Pipeline(out) as split, Pipeline(export_none) as whole:
        assert split.segments == ["decoder_0", "decoder_1"]
        a = split.generate(images[:2], prompts[:2], max_new_tokens=6)
        b = whole.generate(images[:2], prompts[:2], max_new_tokens=6)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch, export_none):
    """A hub id already in the HF cache loads without any network (HF_HUB_OFFLINE=1)."""
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-llava"
    commit = "0" * 40
    shutil.copytree(export_none / "source", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("someone/tiny-llava") == repo / "snapshots" / commit
    loaded = load_model("someone/tiny-llava")
    assert loaded.clip is not None and loaded.model.config.image_token_id == 4
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve_model_path("someone/other-model")
