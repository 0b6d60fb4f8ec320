"""Random FocusScanRefine test cases, shared by every implementation's tests.

`random_fsr_cases(n, seed)` yields complete cases (inputs and attributes);
`make_fsr_inputs(pattern, ...)` makes inputs of a given pattern and sizes;
`OPERATOR_SETTINGS` and `operator_sweep` drive the sweep of one compiled form of the op
(ONNX function, plugin) over node attributes and token counts: one setting per node, many
inputs of every N per setting.
Everything is deterministic in ``seed`` (case ``i`` depends only on ``seed`` and ``i``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

#: Input patterns `make_fsr_inputs` knows.
INPUT_PATTERNS = (
    "generic",  # tokens, features ~ N(0, 1); saliency ~ U(0, 1); relevance ~ U(-1, 1)
    "peaky",  # a few saliency spikes over a near-flat floor: K_F small, Scan and Refine run
    "ties",  # quantised saliency/relevance, duplicated feature and token rows
    "constant_saliency",  # saliency all equal: s_hat = 1
    "constant_relevance",  # relevance all equal: r_hat = 1
    "constant_both",  # phi = 1 everywhere: every decision is a tie
    "zero_features",  # some feature rows zero; in one batch row all of them
    "clustered",  # features around a few centres: many similar cosines
    "duplicates",  # features: a few distinct rows, each repeated: Scan meets distance-0 ties
    "cumsum_rounding",  # phi = [1, 2^-24, ...]: float32 vs float64 prefix sums differ
)

#: Exponents that every implementation evaluates bit-identically (see README.md).
EXACT_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)

_CASE_KINDS = (
    "generic",
    "peaky",
    "peaky_no_relevance",
    "ties",
    "constant_saliency",
    "constant_relevance",
    "constant_both",
    "no_relevance",
    "budget_ge_n",
    "budget_one",
    "fp16",
    "fp16_all",
    "zero_features",
    "clustered",
    "duplicates",
    "shared_tensor",
    "cumsum_rounding",
    "keep_ratio",
    "large",
)

#: ``keep_ratio`` values the tests use (0 = unused); 1/3 and 0.1 are not exact binary fractions.
KEEP_RATIOS = (0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0)


def make_fsr_inputs(
    pattern: str,
    *,
    batch: int,
    num_tokens: int,
    token_dim: int,
    feature_dim: int,
    generator: torch.Generator,
    has_relevance: bool = True,
    dtype: torch.dtype = torch.float32,
    feature_dtype: torch.dtype = torch.float32,
    score_dtype: torch.dtype = torch.float32,
) -> dict:
    """Inputs ``tokens, features, saliency, relevance`` (None without relevance) of one pattern."""
    if pattern not in INPUT_PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; known: {INPUT_PATTERNS}")
    b, n, d, f, g = batch, num_tokens, token_dim, feature_dim, generator
    tokens = torch.randn(b, n, d, generator=g)
    features = torch.randn(b, n, f, generator=g)
    saliency = torch.rand(b, n, generator=g)
    relevance = torch.rand(b, n, generator=g) * 2 - 1

    if pattern == "peaky":
        saliency = torch.rand(b, n, generator=g) * 1e-3
        spikes = max(1, n // 16)
        for row in range(b):
            where = torch.randperm(n, generator=g)[:spikes]
            saliency[row, where] = 1 + 9 * torch.rand(spikes, generator=g)
        relevance = 0.5 + 0.5 * torch.rand(b, n, generator=g)  # keep the spikes visible
    elif pattern == "ties":
        saliency = torch.randint(0, 4, (b, n), generator=g).float() / 4
        relevance = torch.randint(0, 3, (b, n), generator=g).float() / 2
        _duplicate_rows(features, g)
        _duplicate_rows(tokens, g)
        features[:, n // 2 :] = features[:, : n - n // 2].clone()  # whole halves repeat
    elif pattern == "constant_saliency":
        saliency = torch.full((b, n), 0.25)
    elif pattern == "constant_relevance":
        relevance = torch.full((b, n), -0.5)
    elif pattern == "constant_both":
        saliency = torch.full((b, n), 3.0)
        relevance = torch.full((b, n), 0.1)
    elif pattern == "zero_features":
        zero = torch.rand(b, n, generator=g) < 0.3
        features[zero] = 0
        features[0] = 0
    elif pattern == "clustered":
        centres = torch.randn(b, 3, f, generator=g)
        member = torch.randint(0, 3, (b, n), generator=g)
        features = torch.gather(centres, 1, member.unsqueeze(-1).expand(-1, -1, f))
        # Spread 0.05: distances ~1e-3, far above the float32 ulp of 1 - cos (6e-8), so
        # GEMM rounding differences between back ends do not reorder them.
        features = features + 0.05 * torch.randn(b, n, f, generator=g)
    elif pattern == "duplicates":
        distinct = torch.randn(b, max(2, n // 6), f, generator=g)
        pick = torch.randint(0, distinct.shape[1], (b, n), generator=g)
        features = torch.gather(distinct, 1, pick.unsqueeze(-1).expand(-1, -1, f))
    elif pattern == "cumsum_rounding":
        # norm01 keeps these exactly; with beta = 1 and rho = 1 sequential float32 sums
        # stay at 1.0 (K_F = 1) while float64 accumulation would cross the threshold later.
        saliency = torch.zeros(b, n)
        for row in range(b):
            order = torch.randperm(n, generator=g)
            saliency[row, order[0]] = 1.0
            saliency[row, order[1 : 1 + max(2, n // 3)]] = 2.0**-24

    return {
        "tokens": tokens.to(dtype),
        "features": features.to(feature_dtype),
        "saliency": saliency.to(score_dtype),
        "relevance": relevance.to(score_dtype) if has_relevance else None,
    }


def random_fsr_cases(n: int, seed: int = 0) -> Iterator[dict]:
    """Yield ``n`` cases: dicts with ``name``, the four inputs and the five attributes.

    Kinds cycle in a fixed order (generic, peaky, ties, constant scores, relevance
    omitted, budget >= N, budget 1, fp16, zero features, clusters, features = tokens,
    prefix-sum rounding, keep_ratio, N = 576); batch 1-3, N 5-64 (576 for ``large``),
    exponents from `EXACT_EXPONENTS`, rho in [0.3, 1], kappa in {0.5, 1, 2}; ``keep_ratio``
    is 0 (unused) except in the ``keep_ratio`` kind.
    """
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        kind = _CASE_KINDS[i % len(_CASE_KINDS)]
        yield _make_case(kind, i, g)


def _make_case(kind: str, i: int, g: torch.Generator) -> dict:
    pick = lambda options: options[int(torch.randint(len(options), (), generator=g))]  # noqa: E731
    batch = pick((1, 2, 3))
    num_tokens = int(torch.randint(5, 65, (), generator=g))
    token_dim = int(torch.randint(1, 17, (), generator=g))
    feature_dim = int(torch.randint(1, 17, (), generator=g))
    attributes = {
        "alpha": pick(EXACT_EXPONENTS[2:] + (3.0, 3.0)),
        "beta": pick((1.0, 1.0, 2.0, 0.5, 1.5)),
        "rho": pick((0.9, 0.9, 0.5, 0.75, 0.3, 0.99, 1.0)),
        "kappa": pick((0.5, 1.0, 1.0, 2.0)),
        "keep_ratio": 0.0,
    }
    pattern, has_relevance = kind, True
    dtype = feature_dtype = score_dtype = torch.float32

    if kind in ("peaky", "peaky_no_relevance"):
        pattern, has_relevance = "peaky", kind == "peaky"
        attributes["rho"] = pick((0.5, 0.75, 0.9))
        attributes["beta"] = pick((1.0, 0.5))
    elif kind in ("no_relevance", "budget_ge_n", "budget_one", "shared_tensor", "large", "keep_ratio"):
        pattern = pick(("generic", "peaky", "ties", "clustered", "duplicates"))
        has_relevance = kind != "no_relevance" and bool(torch.rand((), generator=g) < 0.7)
    elif kind in ("fp16", "fp16_all"):
        pattern = pick(("generic", "peaky", "ties", "duplicates"))
        dtype = torch.float16
        if kind == "fp16_all":
            feature_dtype = score_dtype = torch.float16
    elif kind == "cumsum_rounding":
        has_relevance = False
        attributes.update(beta=1.0, rho=1.0)

    if kind == "large":
        num_tokens, token_dim, feature_dim = 576, pick((4, 8)), pick((8, 16))
        batch = pick((1, 2))
    if kind == "shared_tensor":
        feature_dim = token_dim

    if kind == "keep_ratio":
        attributes["keep_ratio"] = pick(KEEP_RATIOS)
    if kind == "budget_ge_n":
        budget = num_tokens + pick((0, 0, 1, 7))
    elif kind == "budget_one":
        budget = 1
    elif kind == "large":
        budget = pick((64, 144, 192))
    elif pattern == "peaky" or kind == "cumsum_rounding":
        budget = int(torch.randint(max(2, num_tokens // 4), num_tokens, (), generator=g))
    else:
        budget = int(torch.randint(1, num_tokens + 2, (), generator=g))

    inputs = make_fsr_inputs(
        pattern,
        batch=batch,
        num_tokens=num_tokens,
        token_dim=token_dim,
        feature_dim=feature_dim,
        generator=g,
        has_relevance=has_relevance,
        dtype=dtype,
        feature_dtype=feature_dtype,
        score_dtype=score_dtype,
    )
    if kind == "shared_tensor":
        inputs["features"] = inputs["tokens"]
    name = f"{i:03d}-{kind}-b{batch}-n{num_tokens}-k{budget}"
    if attributes["keep_ratio"]:
        name += f"-r{attributes['keep_ratio']:.3g}"
    return {"name": name, "kind": kind, **inputs, "budget": budget, **attributes}


def _duplicate_rows(x: torch.Tensor, g: torch.Generator) -> None:
    """Copy a random third of the rows of ``x [B, N, ...]`` over other rows, in place."""
    n = x.shape[1]
    count = max(1, n // 3)
    src = torch.randint(0, n, (count,), generator=g)
    dst = torch.randint(0, n, (count,), generator=g)
    x[:, dst] = x[:, src].clone()


# --------------------------------------------------------------------------- operator sweep

#: Node settings of the sweep: attributes, whether relevance is wired, token / feature /
#: score dtypes. Budgets 1, 32, 128, 200 and >= N, keep_ratio values, every exact exponent,
#: rho from 0.3 to 1, kappa from 0 to 3.
OPERATOR_SETTINGS = (
    dict(budget=1),
    dict(budget=32),
    dict(budget=128),
    dict(budget=200),
    dict(budget=4096),
    dict(budget=32, alpha=1.0, beta=2.0, rho=0.5, kappa=2.0),
    dict(budget=128, alpha=0.0, beta=0.5, rho=0.75, kappa=0.5),
    dict(budget=200, alpha=2.5, beta=1.5, rho=0.99, kappa=3.0),
    dict(budget=32, alpha=1.5, beta=0.0, rho=0.3, kappa=0.0),
    dict(budget=64, rho=1.0, kappa=1.0),
    dict(budget=1000, keep_ratio=0.1),
    dict(budget=1, keep_ratio=0.25, alpha=2.0),
    dict(budget=7, keep_ratio=1 / 3, rho=0.5, kappa=2.0),
    dict(budget=7, keep_ratio=0.5),
    dict(budget=3, keep_ratio=1.0),
    dict(budget=32, relevance=False),
    dict(budget=128, relevance=False, beta=2.0, rho=0.5),
    dict(budget=1, relevance=False, rho=1.0),
    dict(budget=7, relevance=False, keep_ratio=0.25, kappa=2.0),
    dict(budget=32, dtype=torch.float16),
    dict(budget=128, dtype=torch.float16, feature_dtype=torch.float16, score_dtype=torch.float16, alpha=2.0),
    dict(budget=200, dtype=torch.float16, relevance=False, keep_ratio=0.5),
    dict(budget=64, feature_dtype=torch.float16, kappa=2.0, rho=0.75),
    dict(budget=16, alpha=0.5, beta=2.5, rho=0.9, kappa=1.0),
)

_SWEEP_PATTERNS = tuple(p for p in INPUT_PATTERNS if p != "cumsum_rounding")


def setting_attributes(setting: dict) -> dict:
    """The node attributes of an `OPERATOR_SETTINGS` entry (defaults filled in by the op)."""
    return {k: v for k, v in setting.items() if k in ("budget", "alpha", "beta", "rho", "kappa", "keep_ratio")}


def setting_dtypes(setting: dict) -> dict:
    return {"dtype": setting.get("dtype", torch.float32), "feature_dtype": setting.get("feature_dtype", torch.float32),
            "score_dtype": setting.get("score_dtype", torch.float32)}


def operator_sweep(setting: dict, cases: int, seed: int = 0, *, large: tuple[int, ...] = ()) -> Iterator[dict]:
    """Inputs for one node setting: ``cases`` inputs of every pattern and batch 1-4, N drawn
    from 1..160 (every other case up to budget + 80 when that is more, at most 400; every 17th
    case N = 1, 2 or 3), every 10th case from 161..700 (batch 1-2),
    then one case at each N in ``large`` (batch 1).

    Widths are small (D 1-16, F 1-24) so that the readable reference stays quick.
    """
    g = torch.Generator().manual_seed(seed)
    has_relevance = setting.get("relevance", True)
    budget = setting["budget"] if not setting.get("keep_ratio") else 0
    top = max(160, min(budget + 80, 400)) if budget < 1000 else 160  # enough N > K for Scan to run
    draws = [("small", i) for i in range(cases)] + [("large", n) for n in large]
    for i, (kind, value) in enumerate(draws):
        if kind == "large":
            n, batch = value, 1
        else:
            n = int(torch.randint(1, (160 if i % 2 else top) + 1, (), generator=g))
            n = (1, 2, 3)[i % 3] if i % 17 == 16 else n
            batch = 1 + i % 4
            if i % 10 == 9:
                n, batch = int(torch.randint(161, 701, (), generator=g)), 1 + (i // 10) % 2
        pattern = _SWEEP_PATTERNS[i % len(_SWEEP_PATTERNS)]
        if i % 23 == 22 and not has_relevance:
            pattern = "cumsum_rounding"
        inputs = make_fsr_inputs(
            pattern, batch=batch, num_tokens=n, token_dim=int(torch.randint(1, 17, (), generator=g)),
            feature_dim=int(torch.randint(1, 25, (), generator=g)), generator=g, has_relevance=has_relevance,
            **setting_dtypes(setting))
        yield {"name": f"{i:03d}-{pattern}-b{batch}-n{n}", **inputs}
