"""Fixed-shape FocusScanRefine: vectorised over the batch, exportable to ONNX.

Same results as `focus_scan_refine_reference` (same indices, values to float32
rounding of the merge sums), written without data-dependent shapes or Python control
flow on tensor values: K_F, |S| and M are [B] tensors, and every branch is a mask.
N (the token count) is static at export time; the batch may be dynamic.

Formulation (spec, "Fixed-shape formulation"):

- Focus: phi sorted descending (``TopK`` values), float32 ``CumSum``,
  ``K_F = min(1 + #{prefix < rho*total}, K)``. The focus set is the tokens whose
  stable descending rank is below K_F; ranks come from an [N, N] comparison, so no
  result depends on how a TopK orders equal values.
- Scan: after the focus set (taken all at once: the running minimum over it is the
  same whatever order it is taken in) K-1 unrolled greedy steps; step s is live while
  ``s < K - K_F`` and takes the argmax of the running min-distance over untaken tokens
  (taken ones masked out; ArgMax returns the first maximum = lowest index).
- Refine: masked argmax over anchor columns of the cosine matrix, D_top = discarded
  tokens whose rank by similarity is below M, then a [K, N] weight matrix product.
"""

from __future__ import annotations

import torch

from ._numerics import (
    check_attributes,
    check_inputs,
    cosine_matrix,
    focus_count,
    fsr_scores,
    merge_count_limit,
)

# Sentinels outside every real value: distances lie in [0, 2], cosines in [-1, 1]
# (each up to float32 rounding).
_TAKEN = -4.0  # masked min-distance of a taken token
_FAR = 4.0  # min-distance before any set member is seen
_NOT_ANCHOR = -2.0  # masked cosine towards a non-anchor column
_NOT_DISCARDED = -3.0  # masked similarity of a kept token


def rank_descending(x: torch.Tensor) -> torch.Tensor:
    """Stable descending rank along the last dim: ties go to the lower index first.

    ``rank[i] = #{k : x[k] > x[i]} + #{k < i : x[k] == x[i]}`` (int64, via an [N, N] compare).
    """
    n = x.shape[-1]
    index = torch.arange(n, device=x.device)
    lower = index.unsqueeze(0) < index.unsqueeze(1)  # [i, k]: k < i
    xi = x.unsqueeze(-1)
    xk = x.unsqueeze(-2)
    ahead = (xk > xi) | ((xk == xi) & lower)
    return ahead.sum(dim=-1)


class FocusScanRefineFixed(torch.nn.Module):
    """FocusScanRefine with static output shapes; ``forward`` returns ``(pruned, kept_indices)``.

    Inputs ``tokens [B, N, D]``, ``features [B, N, F]``, ``saliency [B, N]``,
    ``relevance [B, N]`` or None. Outputs ``[B, K, D]`` in tokens.dtype and ``[B, K]``
    int64 with ``K = min(budget, N)``; ``budget >= N`` is the identity.
    """

    def __init__(
        self,
        budget: int,
        alpha: float = 3.0,
        beta: float = 1.0,
        rho: float = 0.9,
        kappa: float = 1.0,
    ):
        super().__init__()
        check_attributes(budget, alpha, beta, rho, kappa)
        self.budget = int(budget)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.rho = float(rho)
        self.kappa = float(kappa)

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, alpha={self.alpha}, beta={self.beta}, "
            f"rho={self.rho}, kappa={self.kappa}"
        )

    def forward(self, tokens, features, saliency, relevance=None):
        check_inputs(tokens, features, saliency, relevance)
        n = tokens.shape[1]
        index = torch.arange(n, device=tokens.device)
        if self.budget >= n:
            kept = index.unsqueeze(0).expand(tokens.shape[0], n)
            return tokens, kept
        k = self.budget

        # Scores and Focus.
        phi = fsr_scores(saliency, relevance, self.alpha, self.beta)  # [B, N] f32
        # Only the sorted values are used, so how TopK orders equal values does not matter.
        phi_sorted = torch.topk(phi, n, dim=-1, largest=True, sorted=True).values
        kf = focus_count(phi_sorted, self.rho, k)  # [B] int64
        taken = rank_descending(phi) < kf.unsqueeze(-1)  # [B, N] focus set

        # Scan.
        cos = cosine_matrix(features)  # [B, N, N]
        distance = 1.0 - cos
        min_distance = torch.where(taken.unsqueeze(-2), distance, _FAR).amin(dim=-1)
        anchor = torch.zeros_like(taken)
        scan_steps = k - kf  # [B] = |S|
        for step in range(k - 1):
            candidate = torch.where(taken, _TAKEN, min_distance)
            pick = candidate.argmax(dim=-1, keepdim=True)  # [B, 1]
            hit = (index == pick) & (scan_steps > step).unsqueeze(-1)
            taken = taken | hit
            anchor = anchor | hit
            column = torch.gather(distance, 2, pick.unsqueeze(-1).expand(-1, n, 1))
            min_distance = torch.minimum(min_distance, column.squeeze(-1))

        # Kept slots in ascending index order (distinct float keys: no tie question).
        key = index.to(torch.float32) + torch.where(taken, 0.0, float(n))
        kept = torch.topk(key, k, dim=-1, largest=False, sorted=True).indices  # [B, K]
        d = tokens.shape[2]
        kept_tokens = torch.gather(tokens, 1, kept.unsqueeze(-1).expand(-1, -1, d))

        # Refine (skipped when M is 0 for every possible K_F).
        if min(merge_count_limit(self.kappa, k - 1), n - k) == 0:
            return kept_tokens, kept
        discarded = ~taken
        anchor_cos = torch.where(anchor.unsqueeze(-2), cos, _NOT_ANCHOR)  # [B, N, N]
        nearest = anchor_cos.argmax(dim=-1)  # [B, N] j*(i), lowest index on ties
        similarity = anchor_cos.amax(dim=-1)
        score = torch.where(discarded, similarity, _NOT_DISCARDED)
        limit = merge_count_limit(self.kappa, scan_steps)  # [B] M
        limit = torch.minimum(limit, torch.tensor(n - k, device=limit.device))
        top = discarded & (rank_descending(score) < limit.unsqueeze(-1))  # D_top

        slot = kept.unsqueeze(-1)  # [B, K, 1]
        assigned = top.unsqueeze(-2) & (nearest.unsqueeze(-2) == slot)  # [B, K, N]
        weight = torch.where(assigned | (index == slot), phi.unsqueeze(-2), 0.0)
        numerator = torch.matmul(weight, tokens.to(torch.float32))  # [B, K, D]
        denominator = weight.sum(dim=-1, keepdim=True)
        merge = assigned.any(dim=-1, keepdim=True) & (denominator > 0)
        merged = numerator / torch.where(merge, denominator, 1.0)
        pruned = torch.where(merge, merged.to(tokens.dtype), kept_tokens)
        return pruned, kept
