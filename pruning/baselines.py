"""Training-free baseline pruning methods, to compare FocusScanRefine against.

Every method has FSR's call shape::

    method(tokens, features, saliency, relevance=None, *, budget, **settings)
        -> (pruned [B, K, D] in tokens.dtype, kept_indices [B, K] int64, ascending)

with ``K = min(budget, N)``; ``budget >= N`` is the identity (all tokens, indices
``0..N-1``); a budget that is not an int >= 1 raises ValueError; rows are independent.
The baselines keep tokens unchanged (no merging): ``pruned[b, i] == tokens[b, kept[b, i]]``.
They take (and shape-check) all four FSR inputs so any method can stand in for another;
each one reads only what it needs.

- `saliency_topk_reference`: the K tokens with the highest [CLS]-attention saliency (the
  "dominant tokens" idea of FastV / VisionZip). Saliency is compared in float32 (exact for
  fp16/bf16 inputs); equal saliency goes to the lower index (a stable sort). NaN saliency
  is rejected.
- `uniform_reference`: K tokens evenly spaced over the patch order (row-major grid):
  ``kept[i] = floor(i * N / K)`` for ``i = 0..K-1``, computed in integers. Distinct and
  ascending because ``N / K >= 1``; it starts at token 0 and never reaches past ``N - 1``.
- `random_reference`: K distinct indices drawn per row ``b`` by
  ``torch.randperm(N, generator=torch.Generator().manual_seed(seed + b))[:K]``, sorted.
  Reproducible for a given seed (and torch version: the stream is torch's); a control that
  ignores the image.
- `SaliencyTopKFixed`: `saliency_topk_reference` as a fixed-shape, batch-vectorised module
  that exports to ONNX opset 18 (TopK, CumSum, compares, Gather; no Loop, dynamic batch).
- `PRUNING_METHODS`: name -> reference function (``fsr`` included), the registry the
  pruning-fidelity report (``fsr-compare``) iterates over.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import torch

from ._numerics import check_inputs
from .fsr_reference import focus_scan_refine_reference


def check_budget(budget) -> None:
    """Raise ValueError unless ``budget`` is an int >= 1 (bools are not ints here)."""
    if isinstance(budget, bool) or not isinstance(budget, Integral):
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")


def _identity(tokens: torch.Tensor):
    batch, num_tokens = tokens.shape[:2]
    kept = torch.arange(num_tokens, dtype=torch.int64, device=tokens.device).repeat(batch, 1)
    return tokens.clone(), kept


def _gather_rows(tokens: torch.Tensor, kept_rows: list[torch.Tensor], budget: int):
    """``(tokens[b, kept_rows[b]] stacked, kept [B, K] int64)`` on tokens' device."""
    if not kept_rows:  # batch 0
        return tokens[:, :budget].clone(), torch.zeros(0, budget, dtype=torch.int64, device=tokens.device)
    kept = torch.stack(kept_rows).to(device=tokens.device, dtype=torch.int64)
    pruned = torch.stack([tokens[b, kept[b]] for b in range(kept.shape[0])])
    return pruned, kept


# --------------------------------------------------------------------------- references


def saliency_topk_reference(
    tokens: torch.Tensor,
    features: torch.Tensor,
    saliency: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    budget: int,
):
    """Keep the ``K = min(budget, N)`` tokens with the highest saliency, per row.

    Saliency is compared in float32; equal values go to the lower index. Returns
    ``(pruned [B, K, D] tokens.dtype, kept_indices [B, K] int64 ascending)``.
    """
    check_budget(budget)
    batch, num_tokens = check_inputs(tokens, features, saliency, relevance)
    if torch.isnan(saliency).any():
        raise ValueError("saliency contains NaN; saliency-topk needs comparable scores")
    if budget >= num_tokens:
        return _identity(tokens)
    scores = saliency.to(torch.float32)
    kept_rows = []
    for b in range(batch):
        # Stable sort: equal saliency keeps ascending index order, so the lower index wins.
        order = torch.sort(scores[b], descending=True, stable=True).indices
        kept_rows.append(torch.sort(order[:budget]).values)
    return _gather_rows(tokens, kept_rows, budget)


def uniform_indices(num_tokens: int, budget: int) -> torch.Tensor:
    """``[floor(i * N / K) for i in 0..K-1]`` (int64), ``K = min(budget, N)``."""
    check_budget(budget)
    k = min(budget, num_tokens)
    return torch.tensor([(i * num_tokens) // k for i in range(k)], dtype=torch.int64)


def uniform_reference(
    tokens: torch.Tensor,
    features: torch.Tensor,
    saliency: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    budget: int,
):
    """Keep ``K`` tokens evenly spaced over the patch order: indices ``floor(i * N / K)``.

    The same indices for every row. Returns ``(pruned, kept_indices)`` like FSR.
    """
    check_budget(budget)
    batch, num_tokens = check_inputs(tokens, features, saliency, relevance)
    if budget >= num_tokens:
        return _identity(tokens)
    row = uniform_indices(num_tokens, budget)
    return _gather_rows(tokens, [row] * batch, budget)


def random_reference(
    tokens: torch.Tensor,
    features: torch.Tensor,
    saliency: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    budget: int,
    seed: int = 0,
):
    """Keep ``K`` distinct random tokens per row, reproducibly.

    Row ``b`` keeps ``sorted(torch.randperm(N, generator=Generator().manual_seed(seed + b))[:K])``
    (CPU generator, whatever the tokens' device). ``seed`` is an int >= 0.
    """
    check_budget(budget)
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    batch, num_tokens = check_inputs(tokens, features, saliency, relevance)
    if budget >= num_tokens:
        return _identity(tokens)
    kept_rows = []
    for b in range(batch):
        generator = torch.Generator().manual_seed(int(seed) + b)
        draw = torch.randperm(num_tokens, generator=generator)[:budget]
        kept_rows.append(torch.sort(draw).values)
    return _gather_rows(tokens, kept_rows, budget)


# --------------------------------------------------------------------------- fixed shape


class SaliencyTopKFixed(torch.nn.Module):
    """`saliency_topk_reference` with static output shapes, batch-vectorised, ONNX-exportable.

    ``forward(tokens, features, saliency, relevance=None) -> (pruned [B, K, D], kept [B, K])``
    (features and relevance are accepted for FSR's call shape and not used). Saliency must
    not contain NaN (not checked here: the module is traced).

    No result depends on how a TopK orders equal values (ONNX Runtime and torch put the lower
    index first, TensorRT promises nothing), so ties are broken explicitly:

    1. ``v`` = the K-th largest saliency (float32): the minimum of ``TopK(k=K)``'s values;
    2. keep every token with ``s > v``, plus the first ``K - #{s > v}`` tokens with ``s == v``
       in index order (a ``CumSum`` over the ``s == v`` mask; counts are exact in float32);
    3. the kept slots in ascending index order: ``TopK(k=K, smallest)`` of the distinct keys
       ``index + N * (not kept)``, then a ``Gather`` of the token rows.
    """

    def __init__(self, budget: int):
        super().__init__()
        check_budget(budget)
        self.budget = int(budget)

    def extra_repr(self) -> str:
        return f"budget={self.budget}"

    def forward(self, tokens, features, saliency, relevance=None):
        check_inputs(tokens, features, saliency, relevance)
        n = tokens.shape[1]
        index = torch.arange(n, device=tokens.device)
        if self.budget >= n:
            return tokens, index.unsqueeze(0).expand(tokens.shape[0], n)
        k = self.budget
        s = saliency.to(torch.float32)  # [B, N]
        kth = torch.topk(s, k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        above = s > kth
        equal = s == kth
        need = k - above.to(torch.float32).sum(dim=-1, keepdim=True)  # >= 1 copies of v to keep
        tie_order = torch.cumsum(equal.to(torch.float32), dim=-1)  # 1, 2, ... over equal tokens
        keep = above | (equal & (tie_order <= need))
        key = index.to(torch.float32) + torch.where(keep, 0.0, float(n))
        kept = torch.topk(key, k, dim=-1, largest=False, sorted=True).indices  # [B, K] ascending
        d = tokens.shape[2]
        pruned = torch.gather(tokens, 1, kept.unsqueeze(-1).expand(-1, -1, d))
        return pruned, kept


# --------------------------------------------------------------------------- registry

#: A pruning method: ``(tokens, features, saliency, relevance=None, *, budget, **settings)
#: -> (pruned, kept_indices)``.
PruningMethod = Callable[..., tuple[torch.Tensor, torch.Tensor]]

#: Every method in ``fsr.pruning``, by the name ``fsr-compare --methods`` takes.
#: ``fsr`` takes alpha/beta/rho/kappa, ``random`` a seed; the others budget only.
PRUNING_METHODS: dict[str, PruningMethod] = {
    "fsr": focus_scan_refine_reference,
    "saliency-topk": saliency_topk_reference,
    "uniform": uniform_reference,
    "random": random_reference,
}


def get_pruning_method(name: str) -> PruningMethod:
    """The registered method ``name``; ValueError naming the known ones otherwise."""
    try:
        return PRUNING_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(PRUNING_METHODS)}") from None
