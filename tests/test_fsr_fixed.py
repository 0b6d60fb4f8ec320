"""FocusScanRefineFixed (fixed-shape, vectorised) against the reference on random cases."""

import functools

import pytest
import torch

from fsr.pruning import FocusScanRefineFixed, focus_scan_refine_reference
from fsr.pruning.testing import random_fsr_cases

ATTRIBUTES = ("budget", "alpha", "beta", "rho", "kappa")
INPUTS = ("tokens", "features", "saliency", "relevance")
CASES = list(random_fsr_cases(255, seed=0))
BY_NAME = {case["name"]: case for case in CASES}


def attributes(case):
    return {key: case[key] for key in ATTRIBUTES}


def inputs(case):
    return tuple(case[key] for key in INPUTS)


@functools.lru_cache(maxsize=None)
def reference(name):
    case = BY_NAME[name]
    return focus_scan_refine_reference(*inputs(case), **attributes(case), details=True)


def tolerance(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 1e-3}


@pytest.mark.parametrize("name", list(BY_NAME))
def test_fixed_matches_reference(name):
    case = BY_NAME[name]
    expected, expected_kept, info = reference(name)
    pruned, kept = FocusScanRefineFixed(**attributes(case))(*inputs(case))

    assert kept.dtype == torch.int64 and pruned.dtype == case["tokens"].dtype
    assert torch.equal(kept, expected_kept)
    torch.testing.assert_close(pruned, expected, **tolerance(pruned.dtype))
    # Tokens that received no merge (focus tokens above all) come back bit-exact.
    for row in range(kept.shape[0]):
        merged = info.merged[row] if info.merged else {}
        for slot, index in enumerate(kept[row].tolist()):
            if index not in merged:
                assert torch.equal(pruned[row, slot], case["tokens"][row, index])


def test_cases_cover_the_algorithm():
    """The generator must really exercise Scan, Refine, ties and edge cases."""
    kinds = {}
    for case in CASES:
        _, kept, info = reference(case["name"])
        k = kept.shape[1]
        stats = kinds.setdefault(case["kind"], {"cases": 0, "scan": 0, "merge": 0, "focus_only": 0})
        stats["cases"] += 1
        stats["scan"] += bool((info.focus_count < k).any())
        stats["focus_only"] += bool((info.focus_count == k).any())
        stats["merge"] += any(merged for merged in info.merged)
    assert len(CASES) >= 200
    # Peaky saliency: K_F < K (Scan runs) in every case, merges in most.
    for kind in ("peaky", "peaky_no_relevance"):
        assert kinds[kind]["scan"] == kinds[kind]["cases"], kinds[kind]
        assert kinds[kind]["merge"] >= kinds[kind]["cases"] // 2, kinds[kind]
    assert sum(s["scan"] for s in kinds.values()) >= 100
    assert sum(s["merge"] for s in kinds.values()) >= 80
    assert sum(s["focus_only"] for s in kinds.values()) >= 30
    for kind in ("ties", "zero_features", "clustered", "constant_saliency", "fp16", "large"):
        assert kinds[kind]["merge"] >= 1, (kind, kinds[kind])
    shapes = {(c["tokens"].shape[0], c["tokens"].shape[1] == 576) for c in CASES}
    assert {(1, False), (2, False), (3, False), (1, True), (2, True)} <= shapes
    assert any(c["relevance"] is None for c in CASES)
    assert any(c["budget"] >= c["tokens"].shape[1] for c in CASES)
    assert any(c["budget"] == 1 for c in CASES)
    assert {c["kappa"] for c in CASES} == {0.5, 1.0, 2.0}
    assert any(c["features"].dtype == torch.float16 for c in CASES)


def test_cumsum_rounding_cases_need_float32_prefix_sums():
    """On these cases float64 prefix sums (torch.cumsum on CPU) would change K_F."""
    differs = 0
    for case in CASES:
        if case["kind"] != "cumsum_rounding":
            continue
        _, kept, info = reference(case["name"])
        assert info.focus_count.tolist() == [1] * kept.shape[0]
        phi = info.phi.sort(dim=-1, descending=True).values
        prefix = torch.cumsum(phi.double(), dim=-1).float()
        double_kf = ((prefix < prefix[:, -1:]).sum(-1) + 1).clamp(max=kept.shape[1])
        differs += bool((double_kf != info.focus_count).any())
    assert differs >= 5


def test_batch_rows_are_independent():
    case = next(c for c in CASES if c["kind"] == "peaky" and c["tokens"].shape[0] == 3)
    module = FocusScanRefineFixed(**attributes(case))
    pruned, kept = module(*inputs(case))
    for row in range(3):
        one = tuple(None if x is None else x[row : row + 1] for x in inputs(case))
        row_pruned, row_kept = module(*one)
        assert torch.equal(row_kept[0], kept[row])
        torch.testing.assert_close(row_pruned[0], pruned[row], atol=1e-6, rtol=1e-6)


def test_one_module_serves_every_token_count():
    """No re-export per N: one module instance (budget or keep_ratio), N from 1 to 700."""
    from fsr.pruning.testing import make_fsr_inputs

    g = torch.Generator().manual_seed(11)
    modules = [FocusScanRefineFixed(budget=24, rho=0.75, kappa=2.0), FocusScanRefineFixed(budget=1, keep_ratio=0.2)]
    for n in (1, 2, 5, 24, 25, 97, 300, 700):
        inputs = make_fsr_inputs("peaky" if n % 2 else "clustered", batch=2, num_tokens=n, token_dim=6,
                                 feature_dim=9, generator=g)
        for module in modules:
            attrs = dict(budget=module.budget, alpha=module.alpha, beta=module.beta, rho=module.rho,
                         kappa=module.kappa, keep_ratio=module.keep_ratio)
            want, want_kept = focus_scan_refine_reference(*inputs.values(), **attrs)
            pruned, kept = module(*inputs.values())
            assert torch.equal(kept, want_kept), (n, attrs)
            torch.testing.assert_close(pruned, want, atol=1e-5, rtol=1e-5)


def test_call_time_errors_name_the_op_and_the_input():
    module = FocusScanRefineFixed(budget=4)
    with pytest.raises(ValueError, match=r"FocusScanRefine: input tokens has N = 0 tokens .*the op needs N >= 1"):
        module(torch.zeros(1, 0, 3), torch.zeros(1, 0, 2), torch.zeros(1, 0), None)
    with pytest.raises(ValueError, match=r"FocusScanRefine: attribute keep_ratio must be in \[0, 1\]"):
        FocusScanRefineFixed(budget=4, keep_ratio=1.5)
