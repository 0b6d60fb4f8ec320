"""Readable PyTorch reference of the FocusScanRefine operator.

Follows ``shared/docs/fsr-op.md`` step by step, one batch row at a time, with Python
lists and sets; rounding follows the conventions in ``README.md``. It is the ground truth
the fixed-shape module, the ONNX function and the TensorRT plugin are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._numerics import (
    check_attributes,
    check_inputs,
    cosine_matrix,
    fsr_scores,
    merge_count_limit,
)
from .fsr_identity import kept_count


@dataclass
class FSRDetails:
    """Intermediate results of the reference, one entry per batch row."""

    phi: torch.Tensor  #: [B, N] float32 importance scores
    focus_count: torch.Tensor  #: [B] int64, K_F per row (N when K = N)
    focus: list[list[int]] = field(default_factory=list)  #: F, in phi order
    anchors: list[list[int]] = field(default_factory=list)  #: S, in scan order
    merged: list[dict[int, list[int]]] = field(default_factory=list)  #: anchor -> D_top tokens merged into it
    merge_limit: list[int] = field(default_factory=list)  #: M per row


def focus_scan_refine_reference(
    tokens: torch.Tensor,
    features: torch.Tensor,
    saliency: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    budget: int,
    alpha: float | None = None,
    beta: float | None = None,
    rho: float | None = None,
    kappa: float | None = None,
    keep_ratio: float | None = None,
    details: bool = False,
):
    """Prune ``tokens [B, N, D]`` to ``K`` tokens per row: ``K = min(budget, N)``, or with
    ``keep_ratio > 0`` ``K = min(N, max(1, floor(keep_ratio * N)))`` (budget ignored).

    Float attributes are taken as the float32 values an ONNX node stores.
    Returns ``(pruned [B, K, D] tokens.dtype, kept_indices [B, K] int64)``, indices
    ascending; with ``details=True`` a third value, an `FSRDetails`.
    Raises `FsrOpError` (a ValueError) for bad attributes or shapes.
    """
    attrs = check_attributes(budget, alpha, beta, rho, kappa, keep_ratio)
    batch, num_tokens = check_inputs(tokens, features, saliency, relevance)
    k = kept_count(num_tokens, attrs["budget"], attrs["keep_ratio"])  # K

    # Step 1. Scores, in float32 whatever the input dtypes.
    phi = fsr_scores(saliency, relevance, attrs["alpha"], attrs["beta"])
    info = FSRDetails(phi=phi, focus_count=torch.zeros(batch, dtype=torch.int64))

    if k >= num_tokens:  # the operator is the identity
        info.focus_count.fill_(num_tokens)
        kept = torch.arange(num_tokens, dtype=torch.int64).repeat(batch, 1)
        result = (tokens.clone(), kept)
        return (*result, info) if details else result

    pruned_rows, kept_rows = [], []
    for b in range(batch):
        row_tokens, kept, focus_count, row_info = _prune_row(
            tokens[b], features[b], phi[b], k=k, rho=attrs["rho"], kappa=attrs["kappa"]
        )
        pruned_rows.append(row_tokens)
        kept_rows.append(torch.tensor(kept, dtype=torch.int64))
        info.focus_count[b] = focus_count
        info.focus.append(row_info["focus"])
        info.anchors.append(row_info["anchors"])
        info.merged.append(row_info["merged"])
        info.merge_limit.append(row_info["merge_limit"])

    pruned = torch.stack(pruned_rows) if pruned_rows else tokens[:, :k].clone()
    kept_indices = (
        torch.stack(kept_rows) if kept_rows else torch.zeros(0, k, dtype=torch.int64)
    )
    result = (pruned.to(tokens.device), kept_indices.to(tokens.device))
    return (*result, info) if details else result


def _prune_row(tokens, features, phi, *, k, rho, kappa):
    """One batch row: tokens [N, D], features [N, F], phi [N] float32; K < N."""
    num_tokens = phi.shape[0]

    # Step 2. Focus. Stable sort: equal phi keep ascending index order.
    order = torch.sort(phi, descending=True, stable=True).indices.tolist()
    total = _f32(0.0)
    for i in order:  # sequential float32 sum, in sorted order
        total = total + phi[i]
    threshold = _f32(rho) * total
    prefix, focus_count = _f32(0.0), len(order)
    for count, i in enumerate(order, start=1):
        prefix = prefix + phi[i]
        if prefix >= threshold:  # smallest k whose top-k sum reaches rho * sum
            focus_count = count
            break
    focus_count = max(1, min(focus_count, k))
    focus = order[:focus_count]

    # Step 3. Scan: k-center greedy seeded by the focus set.
    cos = cosine_matrix(features)  # [N, N]; cos[i, j], i scored, j in the set
    distance = 1.0 - cos
    chosen = list(focus)
    anchors = []
    # min over j in A of (1 - cos(i, j)), kept up to date as A grows (min is exact).
    min_distance = distance[:, torch.tensor(chosen)].amin(dim=1)
    untaken = torch.ones(num_tokens, dtype=torch.bool)
    untaken[chosen] = False
    for _ in range(k - focus_count):
        candidates = untaken.nonzero()[:, 0]  # ascending indices of the tokens not in A
        best = int(candidates[torch.argmax(min_distance[candidates])])  # first max = lowest index
        chosen.append(best)
        anchors.append(best)
        untaken[best] = False
        min_distance = torch.minimum(min_distance, distance[:, best])

    # Step 4. Refine: merge the most similar discarded tokens into their nearest anchor.
    out = tokens.clone()
    merged: dict[int, list[int]] = {}
    merge_limit = 0
    if anchors:
        chosen_set = set(chosen)
        discarded = [i for i in range(num_tokens) if i not in chosen_set]
        anchors_by_index = torch.tensor(sorted(anchors))  # argmax ties -> lowest anchor index
        sims = cos[torch.tensor(discarded)][:, anchors_by_index]  # [discarded, anchors]
        best = torch.argmax(sims, dim=1)  # first maximum
        nearest = dict(zip(discarded, anchors_by_index[best].tolist()))
        similarity = dict(zip(discarded, sims.gather(1, best[:, None])[:, 0].tolist()))
        merge_limit = min(merge_count_limit(kappa, len(anchors)), len(discarded))
        ranked = sorted(discarded, key=lambda i: (-similarity[i], i))
        for i in sorted(ranked[:merge_limit]):
            merged.setdefault(nearest[i], []).append(i)

        tokens32 = tokens.to(torch.float32)
        for j, members in merged.items():
            numerator = phi[j] * tokens32[j]
            denominator = phi[j]
            for i in members:  # ascending i
                numerator = numerator + phi[i] * tokens32[i]
                denominator = denominator + phi[i]
            if float(denominator) != 0.0:  # else the anchor keeps its token
                out[j] = (numerator / denominator).to(tokens.dtype)

    # Step 5. Output in ascending index order.
    kept = sorted(chosen)
    info = {"focus": focus, "anchors": anchors, "merged": merged, "merge_limit": merge_limit}
    return out[kept], kept, focus_count, info


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)
