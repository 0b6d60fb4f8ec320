"""Baseline pruning methods (pruning/baselines.py) and their rows in the fidelity report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fsr.pruning import (
    PRUNING_METHODS,
    SaliencyTopKFixed,
    focus_scan_refine_reference,
    get_pruning_method,
    random_reference,
    saliency_topk_reference,
    uniform_indices,
    uniform_reference,
)

BASELINES = {
    "saliency-topk": saliency_topk_reference,
    "uniform": uniform_reference,
    "random": random_reference,
}


def inputs(saliency, token_dim=2, dtype=torch.float32):
    """tokens whose rows are distinguishable by value, random features, the given saliency."""
    saliency = torch.as_tensor(saliency, dtype=torch.float32)
    if saliency.dim() == 1:
        saliency = saliency[None]
    b, n = saliency.shape
    tokens = (torch.arange(b * n * token_dim, dtype=torch.float32).reshape(b, n, token_dim) / 7).to(dtype)
    features = torch.randn(b, n, 3, generator=torch.Generator().manual_seed(1))
    return tokens, features, saliency


def assert_gathered(tokens, pruned, kept):
    """pruned[b, i] is tokens[b, kept[b, i]] bit for bit, kept is ascending int64."""
    assert kept.dtype == torch.int64 and pruned.dtype == tokens.dtype
    assert pruned.shape == (*kept.shape, tokens.shape[2])
    assert bool((kept[:, 1:] > kept[:, :-1]).all())
    for b in range(kept.shape[0]):
        assert torch.equal(pruned[b], tokens[b, kept[b]])


# ---------------------------------------------------------------------------- hand-worked cases


@pytest.mark.parametrize("budget, expected", [
    (1, [3]),  # the maximum, 0.9
    (2, [1, 3]),  # 0.9, then the first of three 0.5s (index 1)
    (3, [1, 2, 3]),  # two of the three 0.5s: the lower indices 1 and 2
    (4, [1, 2, 3, 5]),  # all three 0.5s
    (5, [0, 1, 2, 3, 5]),  # 0.1 beats 0.0
])
def test_saliency_topk_hand_worked(budget, expected):
    tokens, features, saliency = inputs([0.1, 0.5, 0.5, 0.9, 0.0, 0.5])
    for fn in (saliency_topk_reference, SaliencyTopKFixed(budget)):
        kwargs = {"budget": budget} if fn is saliency_topk_reference else {}
        pruned, kept = fn(tokens, features, saliency, **kwargs)
        assert kept.tolist() == [expected]
        assert_gathered(tokens, pruned, kept)


def test_saliency_topk_rows_independent_and_dtypes():
    # Row 0: constant saliency -> the first K indices. Row 1: -0.0 == 0.0 tie goes to index 1;
    # the negative values lose. fp16 tokens and fp16 saliency.
    saliency = torch.tensor([[0.25] * 6, [-1.0, -0.0, 0.0, -2.0, -0.5, -3.0]]).to(torch.float16)
    tokens, features, _ = inputs(torch.zeros(2, 6), dtype=torch.float16)
    for budget, expected in ((3, [[0, 1, 2], [1, 2, 4]]), (1, [[0], [1]])):
        pruned, kept = saliency_topk_reference(tokens, features, saliency, budget=budget)
        assert kept.tolist() == expected
        assert_gathered(tokens, pruned, kept)
        fixed = SaliencyTopKFixed(budget)(tokens, features, saliency)
        assert torch.equal(fixed[1], kept) and torch.equal(fixed[0], pruned)
    # Each row alone gives the same answer as in the batch.
    for b in range(2):
        _, kept_alone = saliency_topk_reference(tokens[b:b + 1], features[b:b + 1], saliency[b:b + 1], budget=3)
        assert kept_alone.tolist() == [[[0, 1, 2], [1, 2, 4]][b]]


def test_saliency_topk_ignores_relevance_and_features():
    tokens, features, saliency = inputs([0.3, 0.1, 0.2, 0.4])
    relevance = torch.tensor([[9.0, -9.0, 5.0, 0.0]])
    a = saliency_topk_reference(tokens, features, saliency, relevance, budget=2)
    b = saliency_topk_reference(tokens, features * 0 + 1, saliency, budget=2)
    assert a[1].tolist() == b[1].tolist() == [[0, 3]]


@pytest.mark.parametrize("n, k, expected", [
    (6, 4, [0, 1, 3, 4]),  # floor(0), floor(1.5), floor(3), floor(4.5)
    (10, 3, [0, 3, 6]),  # floor(0), floor(3.33), floor(6.67)
    (7, 1, [0]),
    (5, 4, [0, 1, 2, 3]),  # floor(i * 1.25)
    (576, 64, list(range(0, 576, 9))),  # stride 9 over the 24x24 grid
    (576, 192, list(range(0, 576, 3))),
    (576, 128, [(9 * i) // 2 for i in range(128)]),  # floor(4.5 i): 0, 4, 9, 13, ...
])
def test_uniform_hand_worked(n, k, expected):
    assert uniform_indices(n, k).tolist() == expected
    tokens, features, saliency = inputs(torch.rand(2, n, generator=torch.Generator().manual_seed(n)))
    pruned, kept = uniform_reference(tokens, features, saliency, budget=k)
    assert kept.tolist() == [expected, expected]  # the same for every row, whatever the saliency
    assert_gathered(tokens, pruned, kept)


def test_random_is_seeded_per_row():
    n, k = 20, 5
    tokens, features, saliency = inputs(torch.rand(3, n, generator=torch.Generator().manual_seed(0)))
    pruned, kept = random_reference(tokens, features, saliency, budget=k, seed=7)
    assert_gathered(tokens, pruned, kept)
    for b in range(3):  # the documented recipe, row by row
        draw = torch.randperm(n, generator=torch.Generator().manual_seed(7 + b))[:k]
        assert kept[b].tolist() == sorted(draw.tolist())
        assert len(set(kept[b].tolist())) == k
    # Reproducible; row 1 of seed 7 is row 0 of seed 8; default seed 0; other seeds differ.
    assert torch.equal(random_reference(tokens, features, saliency, budget=k, seed=7)[1], kept)
    assert random_reference(tokens[:1], features[:1], saliency[:1], budget=k, seed=8)[1][0].tolist() == kept[1].tolist()
    assert torch.equal(random_reference(tokens, features, saliency, budget=k)[1],
                       random_reference(tokens, features, saliency, budget=k, seed=0)[1])
    others = {tuple(random_reference(tokens[:1], features[:1], saliency[:1], budget=k, seed=s)[1][0].tolist())
              for s in range(10)}
    assert len(others) > 5
    # Saliency plays no part.
    assert torch.equal(random_reference(tokens, features, -saliency, budget=k, seed=7)[1], kept)


# ---------------------------------------------------------------------------- identity and errors


@pytest.mark.parametrize("name", sorted(PRUNING_METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_budget_at_least_n_is_identity(name, dtype):
    method = PRUNING_METHODS[name]
    tokens, features, saliency = inputs(torch.rand(2, 9, generator=torch.Generator().manual_seed(3)), dtype=dtype)
    for budget in (9, 10, 576):
        pruned, kept = method(tokens, features, saliency, budget=budget)
        assert kept.tolist() == [list(range(9))] * 2 and kept.dtype == torch.int64
        assert pruned.dtype == dtype and torch.equal(pruned, tokens)
    if name == "saliency-topk":
        fixed = SaliencyTopKFixed(9)(tokens, features, saliency)
        assert torch.equal(fixed[0], tokens) and fixed[1].tolist() == [list(range(9))] * 2


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("budget", [0, -1, 1.5, True, "3", None])
def test_bad_budget_raises(name, budget):
    tokens, features, saliency = inputs([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="budget"):
        BASELINES[name](tokens, features, saliency, budget=budget)


def test_other_argument_errors():
    tokens, features, saliency = inputs([0.1, 0.2, 0.3])
    for seed in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="seed"):
            random_reference(tokens, features, saliency, budget=2, seed=seed)
    for name, method in BASELINES.items():
        with pytest.raises(ValueError, match="saliency"):
            method(tokens, features, saliency[:, :2], budget=2)  # N mismatch
        with pytest.raises(ValueError, match="tokens"):
            method(tokens[0], features, saliency, budget=2)  # rank 2 tokens
        with pytest.raises(ValueError, match="relevance"):
            method(tokens, features, saliency, torch.zeros(1, 4), budget=2)
    with pytest.raises(ValueError, match="NaN"):
        saliency_topk_reference(tokens, features, torch.tensor([[0.1, float("nan"), 0.3]]), budget=2)
    for budget in (0, 2.0, False):
        with pytest.raises(ValueError, match="budget"):
            SaliencyTopKFixed(budget)
    with pytest.raises(ValueError, match="saliency"):
        SaliencyTopKFixed(2)(tokens, features, saliency[:, :2])


def test_registry():
    assert list(PRUNING_METHODS) == ["fsr", "saliency-topk", "uniform", "random"]
    assert PRUNING_METHODS["fsr"] is focus_scan_refine_reference
    assert get_pruning_method("uniform") is uniform_reference
    with pytest.raises(ValueError, match="known: fsr, saliency-topk, uniform, random"):
        get_pruning_method("fastv")


# ---------------------------------------------------------------------------- fixed vs reference


def random_saliency(kind: str, b: int, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "generic":
        return torch.rand(b, n, generator=g)
    if kind == "ties":  # few distinct values: ties everywhere, also at the K-th place
        return torch.randint(0, 4, (b, n), generator=g).to(torch.float32) / 4
    if kind == "constant":
        return torch.full((b, n), float(torch.rand(1, generator=g)))
    if kind == "signed_zero":  # -0.0 and 0.0 (equal) mixed with a few positives and negatives
        s = torch.randint(-1, 2, (b, n), generator=g).to(torch.float32)
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
        return s
    if kind == "fp16_close":  # fp16 saliency whose float32 values differ by one fp16 ulp
        return (1 + torch.randint(0, 3, (b, n), generator=g).to(torch.float32) * 2 ** -10).to(torch.float16)
    raise ValueError(kind)


SALIENCY_KINDS = ("generic", "ties", "constant", "signed_zero", "fp16_close")


def random_cases(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        kind = SALIENCY_KINDS[i % len(SALIENCY_KINDS)]
        b = 1 + i % 2
        n = int(torch.randint(1, 50, (1,), generator=g))
        budget = int(torch.randint(1, n + 3, (1,), generator=g))
        dtype = torch.float16 if (i // len(SALIENCY_KINDS)) % 2 else torch.float32
        tokens = torch.randn(b, n, 5, generator=g).to(dtype)
        features = torch.randn(b, n, 3, generator=g)
        yield f"{i}-{kind}-b{b}-n{n}-k{budget}-{str(dtype)[6:]}", tokens, features, random_saliency(kind, b, n, g), budget


def test_fixed_matches_reference_on_random_cases():
    seen = set()
    for label, tokens, features, saliency, budget in random_cases(150, seed=2024):
        ref_pruned, ref_kept = saliency_topk_reference(tokens, features, saliency, budget=budget)
        pruned, kept = SaliencyTopKFixed(budget)(tokens, features, saliency)
        assert torch.equal(kept, ref_kept), label
        assert pruned.dtype == tokens.dtype and torch.equal(pruned, ref_pruned), label
        k = min(budget, tokens.shape[1])
        assert kept.shape == (tokens.shape[0], k), label
        seen.add((label.split("-")[1], tokens.shape[0], tokens.dtype, budget < tokens.shape[1]))
    # The cases did cover every kind, batch 1 and 2, fp16 tokens, pruned and identity budgets.
    assert {s[0] for s in seen} == set(SALIENCY_KINDS)
    assert {s[1] for s in seen} == {1, 2} and {s[2] for s in seen} == {torch.float32, torch.float16}
    assert {s[3] for s in seen} == {True, False}


# ---------------------------------------------------------------------------- ONNX export


N, D, F, K = 40, 6, 3, 10


@pytest.fixture(scope="module")
def saliency_topk_onnx():
    import onnx

    from fsr.onnx_io import quiet_exporter

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, N, D, generator=gen), torch.randn(2, N, F, generator=gen), torch.rand(2, N, generator=gen))
    batch = torch.export.Dim("batch", min=1)
    with quiet_exporter():
        program = torch.onnx.export(
            SaliencyTopKFixed(K).eval(), args, dynamo=True, opset_version=18,
            input_names=["tokens", "features", "saliency"], output_names=["pruned", "kept_indices"],
            dynamic_shapes=tuple({0: batch} for _ in args), verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    return model


def test_saliency_topk_exports_and_runs_in_ort(saliency_topk_onnx):
    import onnxruntime as ort

    model = saliency_topk_onnx
    ops = {node.op_type for node in model.graph.node}
    assert "TopK" in ops and not ops & {"Loop", "If", "Scan", "SequenceConstruct"}
    assert all(not node.domain or node.domain == "ai.onnx" for node in model.graph.node), ops
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    assert dims["tokens"][0].dim_param and dims["saliency"][0].dim_param  # batch is dynamic
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    g = torch.Generator().manual_seed(5)
    checked = 0
    for kind in SALIENCY_KINDS:
        for b in (1, 2, 3):
            tokens = torch.randn(b, N, D, generator=g)
            features = torch.randn(b, N, F, generator=g)
            saliency = random_saliency(kind, b, N, g).to(torch.float32)
            feed = {"tokens": tokens.numpy(), "features": features.numpy(), "saliency": saliency.numpy()}
            pruned, kept = session.run(["pruned", "kept_indices"], {n: feed[n] for n in names})
            ref_pruned, ref_kept = saliency_topk_reference(tokens, features, saliency, budget=K)
            assert kept.dtype == np.int64 and kept.shape == (b, K)
            np.testing.assert_array_equal(kept, ref_kept.numpy(), err_msg=f"{kind} batch {b}")
            np.testing.assert_array_equal(pruned, ref_pruned.numpy(), err_msg=f"{kind} batch {b}")
            checked += 1
    assert checked == 15


# ---------------------------------------------------------------------------- fidelity report


def fidelity_cli(export_dir, *args):
    """``fsr-compare EXPORT --backends torch --no-graph-checks --no-end-to-end ARGS...`` (fidelity only)."""
    import typer
    from typer.testing import CliRunner

    from fsr.compare.cli import compare as compare_command

    app = typer.Typer()
    app.command()(compare_command)
    return CliRunner().invoke(app, [str(export_dir), "--backends", "torch", "--no-graph-checks", "--no-end-to-end",
                                    *map(str, args)])


def test_fidelity_lists_every_method(export_fsr64, tmp_path):
    """fsr-compare's fidelity report (JSON and table) on the tiny export: a row per method and budget;
    budget 576 is the identity (100%, KL 0) of every method but VisionZip (which hands [CLS] on)."""
    from fsr.compare.fidelity import available_methods

    available = list(available_methods())
    assert set(available) == set(PRUNING_METHODS) | {"visionzip", "pio-fvlm"}
    report_path = tmp_path / "report.json"
    result = fidelity_cli(export_fsr64, "--budgets", "576,64", "--builtin-samples", "2", "--max-new-tokens", "6",
                          "--json", report_path)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    fidelity = json.loads(report_path.read_text())["fidelity"]
    assert list(fidelity["skipped"]) == ["pio-fvlm"]  # its schedule needs LLM layer 15: not on the 2-layer tiny
    methods = [m for m in available if m not in fidelity["skipped"]]
    assert fidelity["methods"] == methods
    from fsr.manifest import read_manifest

    fsr_settings = {k: v for k, v in read_manifest(export_fsr64).method.settings.items() if k != "budget"}
    assert fidelity["method_settings"]["fsr"] == fsr_settings  # the export's own settings, budget aside
    assert fidelity["method_settings"]["random"] == {"seed": 0}  # the baselines' defaults
    assert all(fidelity["method_settings"][m] == {} for m in BASELINES if m != "random")
    rows = {(r["method"], r["budget"]): r for r in fidelity["rows"]}
    assert sorted(rows) == sorted((m, b) for m in methods for b in (576, 64))
    for (method, budget), row in rows.items():
        assert row["kept_tokens"] == budget and row["samples"] == 2 and len(row["per_sample"]) == 2
        assert row["identity"] == (budget == 576 and method != "visionzip"), method
        if row["identity"]:
            assert row["first_token_agreement"] == 1.0 and row["top1_agreement"] == 1.0, method
            assert row["kl_mean"] == 0.0 and row["kl_max"] == 0.0, method
        else:
            assert row["kl_mean"] > 0.0, method  # pruning (or VisionZip's [CLS]) changes the distribution
    # The methods keep different token sets at budget 64, so they are really different rows.
    assert len({rows[(m, 64)]["kl_mean"] for m in methods}) == len(methods)
    table = result.output[result.output.index("Pruning fidelity"):]
    for method in methods:
        assert method in table


def test_fidelity_method_selection(export_fsr64):
    result = fidelity_cli(export_fsr64, "--budgets", "64", "--builtin-samples", "1", "--max-new-tokens", "3",
                          "--methods", "uniform,random")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    table = result.output[result.output.index("Pruning fidelity"):]
    assert "uniform" in table and "random" in table and "saliency-topk" not in table and "fsr " not in table
    bad = fidelity_cli(export_fsr64, "--methods", "fastv", "--builtin-samples", "1")
    assert bad.exit_code == 2, bad.output
    assert "unknown pruning method(s) ['fastv']" in bad.output and "saliency-topk" in bad.output
