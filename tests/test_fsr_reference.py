"""Hand-worked cases for the FocusScanRefine reference (fsr.pruning.fsr_reference).

Every expected value below is derived by hand in the comments from the spec
(shared/docs/fsr-op.md) and the conventions in pruning/README.md. Unless said otherwise
relevance is omitted and beta = 1, so phi = norm01(saliency).
"""

import math

import pytest
import torch

from fsr.pruning import (
    FocusScanRefineFixed,
    cosine_matrix,
    focus_scan_refine_reference,
    norm01,
    pow_f32,
)


def run(tokens, features, saliency, relevance=None, **attributes):
    """Reference on one row given as lists; returns (pruned [K, D], kept list, details)."""
    tokens = torch.tensor(tokens, dtype=torch.float32)[None]
    features = torch.tensor(features, dtype=torch.float32)[None]
    saliency = torch.tensor(saliency, dtype=torch.float32)[None]
    if relevance is not None:
        relevance = torch.tensor(relevance, dtype=torch.float32)[None]
    pruned, kept, info = focus_scan_refine_reference(
        tokens, features, saliency, relevance, details=True, **attributes
    )
    # The fixed-shape module must agree on every hand-worked case too.
    fixed_pruned, fixed_kept = FocusScanRefineFixed(**attributes)(tokens, features, saliency, relevance)
    assert torch.equal(fixed_kept, kept)
    torch.testing.assert_close(fixed_pruned, pruned, atol=1e-6, rtol=1e-6)
    return pruned[0], kept[0].tolist(), info


DISTINCT_TOKENS = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0], [5.0, 5.0]]


def test_focus_only():
    # saliency [0, 4, 2, 1] -> s_hat = phi = [0, 1, .5, .25]. Sorted: idx 1, 2, 3, 0.
    # sum = 1.75, threshold = 0.9 * 1.75 = 1.575; prefixes 1, 1.5, 1.75 -> k = 3,
    # clamped to K = 2: F = {1, 2}, no Scan, nothing to refine.
    tokens = DISTINCT_TOKENS[:4]
    features = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]
    pruned, kept, info = run(tokens, features, [0.0, 4.0, 2.0, 1.0], budget=2)
    assert kept == [1, 2]
    assert info.focus_count.tolist() == [2]
    assert info.anchors == [[]]
    assert torch.equal(pruned, torch.tensor([[1.0, 1.0], [2.0, 2.0]]))


def test_focus_count_reaches_threshold_exactly():
    # saliency [2, 1, 1, 0] -> phi = [1, .5, .5, 0]; rho = .75: threshold = .75 * 2 = 1.5.
    # Prefixes 1, 1.5: the 2nd reaches 1.5 exactly (>=), so K_F = 2. Equal phi of tokens
    # 1 and 2: the lower index goes first, F = [0, 1].
    # Scan (1 step): f2 = (1, 1) is at cosine .707 from both focus tokens (distance .29),
    # f3 = (-1, -1) at -.707 (distance 1.71): token 3 is taken. kept = [0, 1, 3].
    # Refine: S = {3}, discarded {2}, M = min(floor(1 * 1), 1) = 1, j*(2) = 3:
    # anchor 3 <- (0 * t3 + .5 * t2) / (0 + .5) = t2.
    tokens = DISTINCT_TOKENS[:4]
    features = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, -1.0]]
    pruned, kept, info = run(tokens, features, [2.0, 1.0, 1.0, 0.0], budget=3, rho=0.75)
    assert info.focus_count.tolist() == [2]
    assert info.focus == [[0, 1]]
    assert kept == [0, 1, 3]
    assert info.merged == [{3: [2]}]
    torch.testing.assert_close(pruned, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))


def test_scan_picks_farthest_then_lowest_index_and_zero_denominator_keeps_anchor():
    # saliency [0, 0, 0, 0, 8] -> phi = [0, 0, 0, 0, 1]: sum 1, threshold .9, K_F = 1, F = {4}.
    # features: f0 = (0, 1), f1 = (-1, 0), f2 = (3, 4) (unit (.6, .8)), f3 = (0, -2), f4 = (1, 0).
    # Distance to F = {4}: d0 = 1, d1 = 2, d2 = 1 - .6 = .4, d3 = 1.
    # Step 1 takes 1 (farthest, 2). Distances to f1: d0 = 1, d2 = 1.6, d3 = 1, so the
    # running minima are d0 = 1, d2 = .4, d3 = 1.  Step 2: tie 0 / 3 at exactly 1 -> 0.
    # kept = [0, 1, 4], S = {1, 0} (scan order), discarded {2, 3}, M = min(2, 2) = 2.
    # j*(2) = 0 (cos .8 vs -.6), j*(3) = 1 (cos 0 vs -1). Every phi involved is 0, so both
    # denominators are 0 and the anchors keep their own tokens.
    tokens = DISTINCT_TOKENS[:5]
    features = [[0.0, 1.0], [-1.0, 0.0], [3.0, 4.0], [0.0, -2.0], [1.0, 0.0]]
    pruned, kept, info = run(tokens, features, [0.0, 0.0, 0.0, 0.0, 8.0], budget=3)
    assert info.focus == [[4]]
    assert info.anchors == [[1, 0]]
    assert kept == [0, 1, 4]
    assert info.merged == [{0: [2], 1: [3]}]
    assert torch.equal(pruned, torch.tensor([[0.0, 0.0], [1.0, 1.0], [4.0, 4.0]]))


@pytest.mark.parametrize(
    "kappa, expected_anchor, expected_merged",
    [
        # M = floor(.5 * 1) = 0: nothing merges, anchor 1 keeps t1.
        (0.5, [6.0, 0.0], {}),
        # M = 1: only token 4 (highest sim .8): (.1 * t1 + .2 * t4) / .3
        #      = ([.6, 0] + [.6, .6]) / .3 = [4, 2].
        (1.0, [4.0, 2.0], {1: [4]}),
        # M = min(2, 3) = 2: tokens 4 (.8) and 3 (.6): (.1 t1 + .3 t3 + .2 t4) / .6
        #      = ([.6, 0] + [0, 1.8] + [.6, .6]) / .6 = [2, 4].
        (2.0, [2.0, 4.0], {1: [3, 4]}),
    ],
)
def test_refine_merge_weights(kappa, expected_anchor, expected_merged):
    # saliency [10, 1, 0, 3, 2] -> phi = [1, .1, 0, .3, .2]; rho = .5: threshold .8, K_F = 1,
    # F = {0}. f0 = (1, 0); f1 = (-1, 0) is farthest (distance 2, f4 = (-4, 3) has 1.8):
    # K = 2 so S = {1}; discarded {2, 3, 4} all go to anchor 1 with sim
    # cos(f2, f1) = 0, cos(f3 = (-3, 4), f1) = .6, cos(f4, f1) = .8.
    tokens = [[5.0, 5.0], [6.0, 0.0], [100.0, 100.0], [0.0, 6.0], [3.0, 3.0]]
    features = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [-3.0, 4.0], [-4.0, 3.0]]
    pruned, kept, info = run(
        tokens, features, [10.0, 1.0, 0.0, 3.0, 2.0], budget=2, rho=0.5, kappa=kappa
    )
    assert info.focus == [[0]] and info.anchors == [[1]]
    assert kept == [0, 1]
    assert info.merged == [expected_merged]
    assert torch.equal(pruned[0], torch.tensor([5.0, 5.0]))  # focus: never changed
    torch.testing.assert_close(pruned[1], torch.tensor(expected_anchor), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("extra", [0, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_budget_at_least_n_is_identity(extra, dtype):
    g = torch.Generator().manual_seed(3)
    b, n = 2, 7
    tokens = torch.randn(b, n, 4, generator=g).to(dtype)
    args = (tokens, torch.randn(b, n, 3, generator=g), torch.rand(b, n, generator=g), None)
    for impl in (
        lambda *a: focus_scan_refine_reference(*a, budget=n + extra),
        FocusScanRefineFixed(budget=n + extra),
    ):
        pruned, kept = impl(*args)
        assert pruned.dtype == dtype and torch.equal(pruned, tokens)
        assert kept.dtype == torch.int64
        assert torch.equal(kept, torch.arange(n).repeat(b, 1))


def test_budget_one_takes_highest_phi_lower_index_on_tie():
    # saliency [1, 3, 3, 0] -> phi = [1/3, 1, 1, 0]: tokens 1 and 2 tie; K = 1, K_F = 1.
    pruned, kept, info = run(DISTINCT_TOKENS[:4], [[1.0]] * 4, [1.0, 3.0, 3.0, 0.0], budget=1)
    assert kept == [1]
    assert info.focus_count.tolist() == [1]
    assert torch.equal(pruned, torch.tensor([[1.0, 1.0]]))


def test_relevance_omitted_means_r_hat_one():
    # saliency [0, 1, 2, 3], relevance [3, 2, 1, 0], alpha = beta = 1:
    # r_hat = [1, 2/3, 1/3, 0], s_hat = [0, 1/3, 2/3, 1], phi = [0, 2/9, 2/9, 0]
    # (the same float32 product both ways) -> budget 1 keeps token 1 (tie, lower index).
    # Omitted relevance: phi = s_hat -> token 3. alpha = 0 makes r_hat**0 = 1: also token 3.
    features = [[1.0]] * 4
    saliency = [0.0, 1.0, 2.0, 3.0]
    relevance = [3.0, 2.0, 1.0, 0.0]
    _, kept, _ = run(DISTINCT_TOKENS[:4], features, saliency, relevance, budget=1, alpha=1.0)
    assert kept == [1]
    _, kept, info = run(DISTINCT_TOKENS[:4], features, saliency, budget=1, alpha=1.0)
    assert kept == [3]
    assert torch.equal(info.phi[0], torch.tensor(saliency) / 3)
    _, kept, _ = run(DISTINCT_TOKENS[:4], features, saliency, relevance, budget=1, alpha=0.0)
    assert kept == [3]


def test_constant_score_is_neutral():
    # norm01 of a constant is 1 everywhere (not 0).
    assert torch.equal(norm01(torch.full((2, 5), 7.0)), torch.ones(2, 5))
    # Constant saliency: phi = r_hat = [0, .25, 1, .5] -> budget 1 keeps token 2
    # (were s_hat 0, phi would be 0 everywhere and token 0 would win the tie).
    features = [[1.0, 0.0]] * 4
    _, kept, _ = run(DISTINCT_TOKENS[:4], features, [5.0] * 4, [0.0, 1.0, 4.0, 2.0], budget=1, alpha=1.0)
    assert kept == [2]
    # Both constant: phi = 1 everywhere, prefixes 1, 2, 3, 4, threshold .9 * 4 = 3.6,
    # K_F = 4 clamped to K = 2; all tie, so F = the two lowest indices.
    _, kept, info = run(DISTINCT_TOKENS[:4], features, [5.0] * 4, [0.3] * 4, budget=2)
    assert kept == [0, 1] and info.focus == [[0, 1]]


def test_prefix_sums_are_sequential_float32():
    # phi = [1, 2^-24, 2^-24, 2^-24, 0], rho = 1. In float32, 1 + 2^-24 rounds back to 1
    # (tie to even), so every prefix and the total are 1: threshold 1, K_F = 1.
    # (float64 accumulation, as torch.cumsum does on CPU, would reach 1 + 2^-22 and
    # give K_F = 4; the convention is float32.)
    eps = 2.0**-24
    _, _, info = run(DISTINCT_TOKENS[:5], [[1.0, 0.0]] * 5, [1.0, eps, eps, eps, 0.0], budget=4, rho=1.0)
    assert info.focus_count.tolist() == [1]
    double = torch.cumsum(torch.tensor([1.0, eps, eps, eps, 0.0], dtype=torch.float64), 0).float()
    assert int((double < double[-1]).sum()) + 1 == 4  # the case does tell the two apart


def test_zero_feature_vectors_have_distance_one_to_everything():
    # All features zero: every cosine is 0, every distance 1.
    # phi = [0, 0, 1, 0, 0, 0]: F = {2}. Scan ties everywhere -> takes 0, then 1.
    # Refine: S = {0, 1}; discarded 3, 4, 5 all at sim 0 -> j* = 0 (lower anchor index),
    # M = min(2, 3) = 2 -> D_top = {3, 4}; their phi is 0, so token 0 stays unchanged.
    tokens = DISTINCT_TOKENS
    pruned, kept, info = run(tokens, [[0.0, 0.0]] * 6, [0.0, 0.0, 5.0, 0.0, 0.0, 0.0], budget=3)
    assert kept == [0, 1, 2]
    assert info.anchors == [[0, 1]]
    assert info.merged == [{0: [3, 4]}]
    assert torch.equal(pruned, torch.tensor(tokens[:3]))


def test_rows_are_independent_and_dtype_kept():
    g = torch.Generator().manual_seed(5)
    b, n = 3, 12
    tokens = torch.randn(b, n, 4, generator=g).half()
    features = torch.randn(b, n, 5, generator=g)
    saliency = torch.rand(b, n, generator=g) ** 4
    relevance = torch.rand(b, n, generator=g)
    pruned, kept = focus_scan_refine_reference(tokens, features, saliency, relevance, budget=5)
    assert pruned.shape == (b, 5, 4) and pruned.dtype == torch.float16
    assert kept.shape == (b, 5) and kept.dtype == torch.int64
    for row in range(b):
        one, one_kept = focus_scan_refine_reference(
            tokens[row : row + 1], features[row : row + 1], saliency[row : row + 1],
            relevance[row : row + 1], budget=5,
        )
        assert torch.equal(one_kept[0], kept[row]) and torch.equal(one[0], pruned[row])
        assert torch.all(kept[row][1:] > kept[row][:-1])  # ascending


def test_pow_convention():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    x[0] = 0.0
    assert torch.equal(pow_f32(x, 3.0), x * x * x)
    exact_sqrt = torch.sqrt(x.double()).float()  # correctly rounded (torch's float32 CPU sqrt is not)
    assert torch.equal(pow_f32(x, 2.5), x * x * exact_sqrt)
    assert torch.equal(pow_f32(x, 0.5), exact_sqrt)
    assert torch.equal(pow_f32(x, 1.0), x)
    assert torch.equal(pow_f32(x, 0.0), torch.ones_like(x))  # including 0**0
    torch.testing.assert_close(pow_f32(x, 2.7), x**2.7)  # library pow for other exponents


def test_cosine_convention():
    # Duplicated rows have cosine exactly 1 (so distance exactly 0) at any magnitude;
    # a zero row has cosine 0 with everything; otherwise it is f_bar f_bar^T.
    g = torch.Generator().manual_seed(2)
    distinct = torch.randn(2, 6, 33, generator=g) * torch.logspace(-4, 4, 6)[:, None]
    distinct[1, 0] = 0.0
    pick = torch.randint(0, 6, (2, 40), generator=g)
    features = torch.gather(distinct, 1, pick[..., None].expand(-1, -1, 33))
    cos = cosine_matrix(features)
    same = pick[:, :, None] == pick[:, None, :]
    zero = (pick == 0) & (torch.arange(2) == 1)[:, None]
    either_zero = zero[:, :, None] | zero[:, None, :]
    assert torch.all(cos[same & ~either_zero] == 1.0)
    assert torch.all(cos[either_zero] == 0.0)
    unit = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(cos, unit @ unit.transpose(-1, -2), atol=1e-6, rtol=0)


def _inputs(b=2, n=6, d=3, f=4):
    return (torch.randn(b, n, d), torch.randn(b, n, f), torch.rand(b, n), torch.rand(b, n))


@pytest.mark.parametrize(
    "attributes, message",
    [
        ({"budget": 0}, "budget must be >= 1"),
        ({"budget": -2}, "budget must be >= 1"),
        ({"budget": 2.0}, "budget must be an int"),
        ({"budget": True}, "budget must be an int"),
        ({"budget": 2, "alpha": -1.0}, "alpha must be >= 0"),
        ({"budget": 2, "beta": -0.5}, "beta must be >= 0"),
        ({"budget": 2, "kappa": -1.0}, "kappa must be >= 0"),
        ({"budget": 2, "rho": math.nan}, "rho must be a finite number"),
        ({"budget": 2, "alpha": math.inf}, "alpha must be a finite number"),
    ],
)
def test_bad_attributes(attributes, message):
    with pytest.raises(ValueError, match=message):
        focus_scan_refine_reference(*_inputs(), **attributes)
    with pytest.raises(ValueError, match=message):
        FocusScanRefineFixed(**attributes)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, f, s, r: (t[0], f, s, r), "tokens must have 3 dims"),
        (lambda t, f, s, r: (t, f[:, :5], s, r), "features has shape"),
        (lambda t, f, s, r: (t, f[:1], s, r), "features has shape"),
        (lambda t, f, s, r: (t, f, s[:, :5], r), "saliency has shape"),
        (lambda t, f, s, r: (t, f, s[:1], r), "saliency has shape"),
        (lambda t, f, s, r: (t, f, s, r[:, :4]), "relevance has shape"),
        (lambda t, f, s, r: (t, f, s[..., None], r), "saliency must have 2 dims"),
        (lambda t, f, s, r: (t, f, (s * 10).long(), r), "saliency must be a floating-point"),
        (lambda t, f, s, r: (t, f.numpy(), s, r), "features must be a torch.Tensor"),
    ],
)
def test_bad_inputs(change, message):
    args = change(*_inputs())
    with pytest.raises(ValueError, match=message):
        focus_scan_refine_reference(*args, budget=2)
    with pytest.raises(ValueError, match=message):
        FocusScanRefineFixed(budget=2)(*args)
