"""The pruning-method registry: one object per method, its settings, its forms."""

from __future__ import annotations

import pytest
import torch

from fsr.pruning.methods import MethodError, get_method, method_names, methods
from fsr.settings import SettingsError


def test_registered_methods():
    assert method_names() == ["none", "fsr", "visionzip", "saliency-topk", "uniform", "random", "pio-fvlm"]
    assert method_names(exportable=True) == ["none", "fsr", "visionzip", "pio-fvlm"]
    assert method_names(prunes=False) == ["none"]
    with pytest.raises(MethodError, match="unknown pruning method 'fastv'; known: none, fsr"):
        get_method("fastv")


@pytest.mark.parametrize("options, message", [
    ({"budget": 0}, "--budget must be an integer >= 1 (got 0)"),
    ({"budget": 2.5}, "--budget must be an integer"),
    ({"budget": True}, "--budget must be an integer"),
    ({"alpha": float("nan")}, "--alpha must be a finite number"),
    ({"beta": -1.0}, "--beta must be >= 0"),
    ({"rho": 0.0}, "--rho must be > 0"),
    ({"kappa": float("inf")}, "--kappa must be a finite number"),
    ({"relevance": "off"}, "--relevance must be one of auto, clip, llm, none"),
    ({"gamma": 1.0}, "unknown FocusScanRefine option(s) ['gamma']"),
])
def test_fsr_settings_are_validated(options, message):
    with pytest.raises(SettingsError) as info:
        get_method("fsr").settings(**options)
    assert message in str(info.value)


def test_settings_json_round_trip_and_budget_sweeps():
    fsr = get_method("fsr")
    settings = fsr.settings(budget=32, alpha=2.0)
    assert fsr.settings_from_json(settings.to_json()) == settings
    assert fsr.with_budget(settings, 8).budget == 8 and fsr.with_budget(settings, 8).alpha == 2.0
    assert fsr.kept_tokens(settings, 576) == 32 and fsr.kept_tokens(settings, 20) == 20
    none = get_method("none")
    assert none.kept_tokens(none.settings(), 576) == 576 and none.budget(none.settings()) is None
    with pytest.raises(SettingsError, match="must be a JSON object"):
        fsr.settings_from_json([1, 2])


def _inputs(batch=2, n=40, d=8, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randn(batch, n, d, generator=g), "features": torch.randn(batch, n, f, generator=g),
            "saliency": torch.rand(batch, n, generator=g), "relevance": torch.rand(batch, n, generator=g) * 2 - 1}


@pytest.mark.parametrize("name", ["fsr", "saliency-topk"])
@pytest.mark.parametrize("relevance", [True, False])
def test_the_pytorch_form_matches_the_reference(name, relevance):
    method = get_method(name)
    for seed, budget in [(0, 7), (1, 1), (2, 40), (3, 100)]:
        settings = method.settings(budget=budget)
        inputs = _inputs(seed=seed)
        if not relevance:
            inputs.pop("relevance")
        names = method.inputs(settings, relevance)
        want, want_kept = method.reference(settings)(inputs)
        got, got_kept = method.torch_module(settings, relevance=relevance)(*(inputs[n] for n in names))
        assert torch.equal(got_kept, want_kept), (name, seed)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_every_method_describes_where_it_attaches():
    from fsr.models.parts import VISION_OUTPUTS

    for method in methods():
        settings = method.settings()
        assert set(method.inputs(settings, relevance=True)) <= set(VISION_OUTPUTS), method.name
        assert method.placement in ("after_projector", "before_projector")
        assert method.outputs()[0] == "image_tokens"
        if method.prunes:
            assert method.has_reference(), method.name
        if method.exportable and method.prunes_in == "vision":
            assert method.onnx_op is not None


def test_methods_without_an_in_graph_form_refuse_export():
    uniform = get_method("uniform")
    with pytest.raises(MethodError, match="no in-graph form"):
        uniform.attach(None, uniform.settings(), relevance=False)
    with pytest.raises(MethodError, match="does not prune inside the LLM"):
        get_method("fsr").between_segments(None, 1, None, None, None)
