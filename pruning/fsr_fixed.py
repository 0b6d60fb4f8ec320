"""FocusScanRefine vectorised over the batch, for any N: the op's tensor formulation.

Same results as `focus_scan_refine_reference` (same indices, values to float32 rounding of
the merge sums), computed the way the ONNX function body (`onnx_function.py`) computes them,
step for step, so that the two read side by side. Nothing here depends on N or K beyond the
input shapes: one module serves every token count. ``keep_ratio`` works as in the spec.

Formulation (K = `kept_count`, K_F, |S| and M are [B] tensors; every branch is a mask):

- Focus: phi sorted descending (values only), float32 prefix sums, ``K_F = min(1 + #{prefix <
  rho*total}, K)``. The focus set is the K_F largest phi, ties to the lower index, selected by
  value: ``v`` = the K_F-th sorted value, all ``phi > v`` plus the first ``K_F - #{phi > v}``
  tokens with ``phi == v`` in index order. Nothing depends on how a sort orders equal values.
- Cosines by columns (convention 6): only the columns of tokens that join the set are ever
  computed (``f @ f[c]^T``), never the N x N Gram matrix.
- Scan, in blocks: a block computes the columns of ``scan_block`` candidates (the current
  argmax of the running min-distance, lowest index on ties, and the next largest), then takes
  greedy steps on the candidates alone: the first is the global argmax; a later step's pick
  is certainly the global argmax when its value is above every other token's value at the
  block's start (those only decrease). The first step that is not certain ends the block; the
  next block starts from there. Every block takes at least one step, so the result is exactly
  the greedy k-center of the spec; the candidates decide only how many matrix products it
  takes (benchmark inputs at N = 2,880, K = 320: 13 blocks of 32 instead of 319 steps).
- Refine: j*(i) and its similarity are kept up to date over the anchors as they are taken
  (ties to the lower anchor index); D_top is the M most similar discarded tokens selected by
  value as for Focus; the merge touches only the A anchors that receive D_top tokens: an
  [A, M] weight matrix times the M gathered token rows; every other kept row is gathered as is.
"""

from __future__ import annotations

import torch

from ._numerics import (
    check_attributes,
    check_inputs,
    column_cosines,
    focus_count,
    fsr_scores,
    merge_count_limit,
    self_dots,
)
from .fsr_identity import kept_count

#: Candidates per Scan block (speed only: any value >= 1 gives the same result).
SCAN_BLOCK = 32

# Sentinels outside every real value: distances lie in [0, 2], cosines in [-1, 1]
# (each up to float32 rounding).
TAKEN = -4.0  # running min-distance of a taken token
FAR = 4.0  # a distance that changes no minimum
BELOW = -5.0  # below every running min-distance, TAKEN included
NOT_ANCHOR = -2.0  # similarity before any anchor is seen
NOT_DISCARDED = -3.0  # similarity score of a kept token


def select_largest(values: torch.Tensor, count: torch.Tensor, sorted_values: torch.Tensor) -> torch.Tensor:
    """Mask of the ``count [B]`` largest ``values [B, N]`` per row, ties to the lower index.

    ``sorted_values`` are ``values`` sorted descending (only values are read, so the order a
    sort gives equal values does not matter). Rows with ``count == 0`` select nothing.
    """
    take = count.clamp(min=1).unsqueeze(-1)
    v = torch.gather(sorted_values, -1, take - 1)  # [B, 1] the count-th largest value
    above = values > v
    tie = values == v
    need = take - above.sum(dim=-1, keepdim=True)
    tie_rank = torch.cumsum(tie.to(torch.int64), dim=-1) - tie.to(torch.int64)  # exclusive
    return (above | (tie & (tie_rank < need))) & (count > 0).unsqueeze(-1)


def first_indices(mask: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` int64: the indices where ``mask [B, N]`` is true, ascending, then the
    indices where it is false (padding). Keys are distinct, so no tie question."""
    n = mask.shape[-1]
    index = torch.arange(n, device=mask.device)
    key = index + torch.where(mask, 0, n)
    return torch.topk(key, width, dim=-1, largest=False, sorted=True).indices


def argmax_lowest(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1]``: index of the largest value per row, the lowest index on ties."""
    return torch.argmax(x, dim=-1, keepdim=True)  # documented: the first maximal value


class FocusScanRefineFixed(torch.nn.Module):
    """FocusScanRefine as tensor operations; ``forward`` returns ``(pruned, kept_indices)``.

    Inputs ``tokens [B, N, D]``, ``features [B, N, F]``, ``saliency [B, N]``,
    ``relevance [B, N]`` or None, any N >= 1. Outputs ``[B, K, D]`` in tokens.dtype and
    ``[B, K]`` int64 (`kept_count`: ``min(budget, N)``, or from ``keep_ratio``); K = N is
    the identity. Attributes are checked here, inputs at each call (`FsrOpError`).
    """

    def __init__(
        self,
        budget: int,
        alpha: float | None = None,
        beta: float | None = None,
        rho: float | None = None,
        kappa: float | None = None,
        keep_ratio: float | None = None,
        scan_block: int = SCAN_BLOCK,
    ):
        super().__init__()
        attrs = check_attributes(budget, alpha, beta, rho, kappa, keep_ratio)
        self.budget = attrs["budget"]
        self.alpha, self.beta = attrs["alpha"], attrs["beta"]
        self.rho, self.kappa = attrs["rho"], attrs["kappa"]
        self.keep_ratio = attrs["keep_ratio"]
        if isinstance(scan_block, bool) or not isinstance(scan_block, int) or scan_block < 1:
            raise ValueError(f"scan_block must be an int >= 1, got {scan_block!r}")
        self.scan_block = scan_block

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, alpha={self.alpha}, beta={self.beta}, rho={self.rho}, "
            f"kappa={self.kappa}, keep_ratio={self.keep_ratio}"
        )

    def forward(self, tokens, features, saliency, relevance=None):
        batch, n = check_inputs(tokens, features, saliency, relevance)
        device = tokens.device
        index = torch.arange(n, device=device)
        k = kept_count(n, self.budget, self.keep_ratio)
        if k >= n:
            return tokens, index.unsqueeze(0).expand(batch, n)

        # Scores and Focus.
        phi = fsr_scores(saliency, relevance, self.alpha, self.beta)  # [B, N] f32
        phi_sorted = torch.topk(phi, n, dim=-1, largest=True, sorted=True).values
        kf = focus_count(phi_sorted, self.rho, k)  # [B] int64
        focus = select_largest(phi, kf, phi_sorted)  # [B, N]

        # Running min-distance to the focus set, from the focus tokens' columns (only when
        # Scan runs).
        f = features.to(torch.float32)
        steps = k - kf  # [B] = |S|
        if bool((steps > 0).any()):
            sq_norm = self_dots(f)
            width = int(kf.max())
            columns = first_indices(focus, width)  # [B, width]: focus tokens first
            real = torch.arange(width, device=device) < kf.unsqueeze(-1)
            columns = torch.where(real, columns, columns[:, :1])  # pad with a focus token: same minimum
            cos = column_cosines(f @ _rows(f, columns).transpose(-1, -2), columns, sq_norm)
            # min_j (1 - cos) == 1 - max_j cos: rounding 1 - x is monotone.
            dmin = torch.where(focus, TAKEN, 1.0 - cos.amax(dim=-1))  # [B, N]
        else:  # no Scan step anywhere: the focus set is what is kept
            sq_norm, dmin = None, torch.where(focus, TAKEN, 0.0)

        # Scan, block by block.
        done = torch.zeros_like(steps)
        best_sim = torch.full_like(dmin, NOT_ANCHOR)  # max cos to an anchor so far
        best_anchor = torch.full_like(steps, n).unsqueeze(-1).expand(batch, n).clone()
        while bool((done < steps).any()):
            dmin, done, best_sim, best_anchor = self._scan_block(
                f, sq_norm, dmin, done, steps, best_sim, best_anchor, index)

        # Refine: D_top, the M most similar discarded tokens.
        taken = dmin == TAKEN
        discarded = ~taken
        limit = torch.minimum(merge_count_limit(self.kappa, steps), torch.tensor(n - k, device=device))  # M
        width = max(int(limit.max()), 1)
        score = torch.where(discarded, best_sim, NOT_DISCARDED)
        top_values = torch.topk(score, width, dim=-1, largest=True, sorted=True).values
        top = select_largest(score, limit, top_values) & discarded

        # Kept slots in ascending index order; merge D_top into their anchors.
        kept = first_indices(taken, k)  # [B, K]
        kept_tokens = _rows(tokens, kept)
        slot_of = torch.cumsum(taken.to(torch.int64), dim=-1) - taken.to(torch.int64)  # [B, N]
        members = first_indices(top, width)  # [B, W]: D_top first
        member = torch.arange(width, device=device) < limit.unsqueeze(-1)  # [B, W]
        anchor_of = torch.gather(best_anchor, 1, members).clamp(max=n - 1)  # padding: any valid index
        target = torch.gather(slot_of, 1, anchor_of)  # [B, W] the kept slot of j*(i)
        # The kept slots that receive D_top tokens ("groups", ascending): only their rows are merged.
        slots = torch.arange(k, device=device)
        is_target = (member.unsqueeze(1) & (target.unsqueeze(1) == slots[:, None])).any(dim=-1)  # [B, K]
        groups = first_indices(is_target, max(int(is_target.sum(dim=-1).max()), 1))  # [B, A]
        assigned = member.unsqueeze(1) & (target.unsqueeze(1) == groups.unsqueeze(-1))  # [B, A, W]
        weight = torch.where(assigned, torch.gather(phi, 1, members).unsqueeze(1), 0.0)
        group_token = torch.gather(kept, 1, groups)  # [B, A]
        phi_group = torch.gather(phi, 1, group_token)
        numerator = phi_group.unsqueeze(-1) * _rows(tokens, group_token).to(torch.float32) + weight @ _rows(
            tokens, members).to(torch.float32)
        denominator = phi_group + weight.sum(dim=-1)  # [B, A]
        nonzero = denominator != 0
        merged = (numerator / torch.where(nonzero, denominator, 1.0).unsqueeze(-1)).to(tokens.dtype)
        # Each kept slot: its merged row when it is a group with a non-zero denominator, else its token.
        position = (torch.cumsum(is_target.to(torch.int64), dim=-1) - is_target.to(torch.int64)).clamp(
            max=groups.shape[-1] - 1)
        use = is_target & torch.gather(nonzero, 1, position)
        pruned = torch.where(use.unsqueeze(-1), _rows(merged, position), kept_tokens)
        return pruned, kept

    def _scan_block(self, f, sq_norm, dmin, done, steps, best_sim, best_anchor, index):
        """One Scan block (see the module docstring); returns the updated state."""
        batch, n = dmin.shape
        width = min(self.scan_block - 1, n)
        candidates = torch.cat([argmax_lowest(dmin), torch.topk(dmin, width, dim=-1).indices], dim=-1)  # [B, C]
        cos = column_cosines(f @ _rows(f, candidates).transpose(-1, -2), candidates, sq_norm)  # [B, N, C]
        # distance[b, i, m]: token i to candidate m; TAKEN where i is candidate m itself.
        itself = index.view(1, n, 1) == candidates.unsqueeze(1)
        distance = torch.where(itself, TAKEN, 1.0 - cos)
        rows = _rows(distance, candidates).transpose(-1, -2)  # rows[b, s, m]: candidate m to candidate s
        # The greedy steps run on the C candidates alone. The first takes the global argmax (the
        # first candidate); a later step's pick is sure to be the global argmax when its value is
        # above every other token's value at the block's start (those only go down). A step that
        # is not sure ends the block.
        bound = torch.where(itself.any(dim=-1), BELOW, dmin).amax(dim=-1)  # [B]
        remaining = steps - done
        current = start = torch.gather(dmin, 1, candidates)  # [B, C]
        for step in range(candidates.shape[-1]):
            top = current.amax(dim=-1, keepdim=True)
            slot = torch.where(current == top, candidates, n).argmin(dim=-1)  # lowest token index at the top
            live = remaining > step
            if step:
                live = live & (top.squeeze(-1) > bound)
            if not bool(live.any()):
                break  # (the graph runs the remaining steps as no-ops)
            row = rows[torch.arange(batch, device=f.device), slot]  # [B, C]
            current = torch.where(live.unsqueeze(-1), torch.minimum(current, row), current)
        picked = (current == TAKEN) & (start != TAKEN)  # [B, C]
        # Every token's running minimum over the anchors this block took (TAKEN for them).
        nearest = torch.where(picked.unsqueeze(1), distance, FAR).amin(dim=-1)
        before = (dmin == TAKEN).sum(dim=-1)
        dmin = torch.minimum(dmin, nearest)
        done = done + ((dmin == TAKEN).sum(dim=-1) - before)

        # Nearest anchor and similarity of every token, over the anchors this block took.
        masked = torch.where(picked.unsqueeze(1), cos, NOT_ANCHOR)  # [B, N, C]
        block_best = masked.amax(dim=-1)  # [B, N]
        lowest = torch.where(masked == block_best.unsqueeze(-1), candidates.unsqueeze(1), index.shape[0])
        block_anchor = lowest.amin(dim=-1)
        better = (block_best > best_sim) | ((block_best == best_sim) & (block_anchor < best_anchor))
        better = better & (block_best > NOT_ANCHOR)
        best_sim = torch.where(better, block_best, best_sim)
        best_anchor = torch.where(better, block_anchor, best_anchor)
        return dmin, done, best_sim, best_anchor


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, W]`` rows at ``index [B, C]`` -> ``[B, C, W]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
