"""VisionZip as an operator: ``fsr::VisionZip`` (version 1).

Specification: ``shared/docs/methods/visionzip.md`` (written from the authors' code); this
module's conventions and the exported form are described in ``pruning/visionzip.md``.

The op, per batch row, for the output of one ViT layer *with* its [CLS] token
(``T = 1 + N`` rows, row 0 the [CLS] token, rows ``1..N`` the patches in raster order):

1. **Dominant tokens.** ``a_j`` (the [CLS] query's attention to token ``j`` in that layer,
   summed over heads) ranks the patches; the ``dominant - 1`` highest win (float32
   comparison; equal scores go to the lower index). The dominant set is [CLS] plus these
   patches, emitted in ascending index order ([CLS] first).
2. **Contextual tokens.** The other tokens, ascending (``Rm``), are split into anchors,
   every ``step = max(1, |Rm| // contextual)``-th list position from position 0, the first
   ``contextual`` of them, and members (the rest). Each member goes to the anchor whose
   normalised key has the largest dot product with its own normalised key (equal values:
   the first anchor). Contextual token = ``anchor + sum(members) / max(1, #members)``.
3. **Output.** ``tokens [B, dominant + contextual, C]`` = [CLS, dominant patches
   ascending, contextual tokens in anchor order], and ``kept_indices [B, dominant +
   contextual]`` int64 = the input row of each output token (0, the dominant patch indices,
   then the anchor indices).

When ``dominant + contextual >= T`` nothing would be dropped or merged: the op is the
identity (all ``T`` rows in input order, ``kept_indices = 0..T-1``). In general the output
has ``K = min(dominant + contextual, T)`` rows.

What lives here (torch only; the ONNX forms are in ``visionzip_onnx.py`` and re-exported):

- the op's identity (`VISIONZIP_DOMAIN`, `VISIONZIP_OP`, ...), `visionzip_split` (budget ->
  dominant + contextual), `check_visionzip_attributes`, `visionzip_output_count`;
- `visionzip_reference`: the readable reference, per batch row with Python lists (ground
  truth for every other form);
- `VisionZipFixed`: the batch-vectorised torch module (any N, no re-build), the formulation
  the ONNX function uses;
- `visionzip_op` (``torch.ops.fsr.visionzip``): the op as a torch custom op, for models that
  trace it; it exports to one ``fsr.VisionZip`` node (see `visionzip_translation_table`);
- `visionzip_crop_layout` (with `visionzip_crop_slots`): a LLaVA-NeXT image's tokens from its
  crops' op outputs (the spec's section 5: base crop, the tiles' dominant patches in stitched-grid
  order, the tiles' [CLS] tokens, their contextual tokens);
- `clip_layer_visionzip_inputs`: the op's three inputs from a Hugging Face CLIP encoder layer,
  computing only the [CLS] query row of the attention (O(N));
- lazily (from ``visionzip_onnx.py``; they import onnx / onnxscript): `visionzip_function`,
  `build_visionzip_function`, `make_visionzip_model`, `visionzip_node_attributes`,
  `check_visionzip_nodes`, `visionzip_translation_table`, `add_visionzip_function`.
"""

from __future__ import annotations

import dataclasses
from numbers import Integral
from typing import NamedTuple

import torch

from fsr.errors import FsrError

from ._numerics import sqrt_f32

# --------------------------------------------------------------------------- op identity

VISIONZIP_DOMAIN = "fsr"
VISIONZIP_OP = "VisionZip"
VISIONZIP_OP_VERSION = 1
VISIONZIP_INPUTS = ("hidden_states", "cls_attention", "keys")
VISIONZIP_OUTPUTS = ("tokens", "kept_indices")
#: Attributes (both required ints, no defaults): ``dominant`` counts the [CLS] token.
VISIONZIP_ATTRIBUTES = ("dominant", "contextual")

#: The spec's LLaVA-1.5 table: total visual tokens -> (dominant incl. [CLS], contextual).
VISIONZIP_BUDGETS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}
#: The contextual share of a budget, 5/32 (= 10/64 = 20/128 = 30/192 = 5/32 in the table).
CONTEXTUAL_SHARE = (5, 32)
#: TensorRT's TopK limit: the exported op needs ``dominant - 1 <= 3840`` and ``K <= 3840``.
TOPK_LIMIT = 3840


class VisionZipError(FsrError, ValueError):
    """Bad VisionZip attributes, budget or inputs; the message names the rule and the fix."""


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_visionzip_attributes(dominant, contextual) -> None:
    """Raise `VisionZipError` unless ``dominant >= 1`` and ``contextual >= 1`` are ints."""
    if not _is_int(dominant) or dominant < 1:
        raise VisionZipError(
            f"VisionZip attribute dominant must be an int >= 1 (it counts the [CLS] token), got {dominant!r}"
        )
    if not _is_int(contextual) or contextual < 1:
        raise VisionZipError(
            f"VisionZip attribute contextual must be an int >= 1 (0 would divide by zero upstream and is "
            f"not part of the method), got {contextual!r}; use a budget split with visionzip_split(budget)"
        )


def visionzip_split(budget) -> tuple[int, int]:
    """Split a total visual-token budget into ``(dominant incl. [CLS], contextual)``.

    ``contextual = max(1, round(budget * 5 / 32))`` (halves round up; integer arithmetic:
    ``(5 * budget + 16) // 32``), ``dominant = budget - contextual``. This reproduces the
    spec's table, 64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30, and the LLaVA-NeXT
    per-crop budgets 32 -> 27 + 5, 64 -> 54 + 10, 128 -> 108 + 20 (5/32 is the table's
    contextual share; rounding to the nearest keeps other budgets closest to it).
    The smallest budget is 2 ([CLS] and one contextual token). A budget of at least the
    layer's token count ``1 + N`` makes the op the identity (see the module docstring).
    """
    if not _is_int(budget):
        raise VisionZipError(f"VisionZip budget must be an int (total visual tokens), got {budget!r}")
    if budget < 2:
        raise VisionZipError(
            f"VisionZip budget {budget} is too small to split: it keeps the [CLS] token and at least one "
            "contextual token, so the budget must be >= 2"
        )
    num, den = CONTEXTUAL_SHARE
    contextual = max(1, (num * int(budget) + den // 2) // den)
    return int(budget) - contextual, contextual


def visionzip_output_count(dominant: int, contextual: int, num_tokens: int) -> int:
    """Rows of the op's output for ``num_tokens = 1 + N`` input rows: ``min(dominant + contextual, T)``."""
    check_visionzip_attributes(dominant, contextual)
    return min(dominant + contextual, num_tokens)


def check_visionzip_inputs(hidden_states, cls_attention, keys) -> tuple[int, int]:
    """Raise `VisionZipError` unless the inputs have the op's shapes; return ``(B, T)``.

    ``hidden_states [B, T, C]``, ``cls_attention [B, T]``, ``keys [B, T, Dk]``, all floating
    point, ``T = 1 + N >= 1``, ``Dk >= 1``. (``T = 1``, the [CLS] row alone, is the identity.)
    """
    named = (("hidden_states", hidden_states, 3), ("cls_attention", cls_attention, 2), ("keys", keys, 3))
    for name, tensor, rank in named:
        if not isinstance(tensor, torch.Tensor):
            raise VisionZipError(f"VisionZip input {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            raise VisionZipError(f"VisionZip input {name} must have {rank} dims, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise VisionZipError(f"VisionZip input {name} must be floating point, got {tensor.dtype}")
    batch, num_tokens = hidden_states.shape[:2]
    for name, tensor, _ in named[1:]:
        if tuple(tensor.shape[:2]) != (batch, num_tokens):
            raise VisionZipError(
                f"VisionZip input {name} has shape {tuple(tensor.shape)}; its leading dims must be "
                f"[B={batch}, T={num_tokens}] like hidden_states {tuple(hidden_states.shape)}"
            )
    if keys.shape[2] < 1:
        raise VisionZipError(f"VisionZip input keys needs at least one channel, got shape {tuple(keys.shape)}")
    if num_tokens < 1:
        raise VisionZipError(f"VisionZip needs at least the [CLS] row (T = 1 + N >= 1), got T = {num_tokens}")
    return batch, num_tokens


def unit_keys(keys: torch.Tensor) -> torch.Tensor:
    """``keys / ||keys||`` over the last dim in float32, no epsilon; a zero key stays zero.

    ``||k|| = sqrt(sum(k * k))`` (float32 sum, correctly rounded sqrt). Upstream divides
    0 by 0 (NaN) for a zero key, which no back end orders consistently; here a zero key
    has similarity 0 with every anchor.
    """
    k = keys.to(torch.float32)
    norm = sqrt_f32((k * k).sum(dim=-1, keepdim=True))
    nonzero = norm > 0
    return torch.where(nonzero, k / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(k))


# --------------------------------------------------------------------------- reference


@dataclasses.dataclass
class VisionZipDetails:
    """What the reference decided, one entry per batch row (token indices into ``T``)."""

    identity: bool  #: dominant + contextual >= T: nothing dropped
    dominant: list[list[int]] = dataclasses.field(default_factory=list)  #: [CLS] + patches, ascending
    anchors: list[list[int]] = dataclasses.field(default_factory=list)  #: in anchor order
    members: list[dict[int, list[int]]] = dataclasses.field(default_factory=list)  #: anchor -> its members


def visionzip_reference(hidden_states, cls_attention, keys, *, dominant: int, contextual: int,
                        details: bool = False):
    """The spec step by step, one batch row at a time (ground truth).

    Returns ``(tokens [B, K, C] hidden_states.dtype, kept_indices [B, K] int64)`` with
    ``K = min(dominant + contextual, T)``, and with ``details=True`` a `VisionZipDetails`.
    Raises `VisionZipError` for bad attributes, shapes, or NaN in ``cls_attention``.
    """
    check_visionzip_attributes(dominant, contextual)
    batch, num_tokens = check_visionzip_inputs(hidden_states, cls_attention, keys)
    if torch.isnan(cls_attention).any():
        raise VisionZipError("VisionZip input cls_attention contains NaN; the dominant tokens need comparable scores")
    info = VisionZipDetails(identity=dominant + contextual >= num_tokens)
    if info.identity:
        kept = torch.arange(num_tokens, dtype=torch.int64, device=hidden_states.device).repeat(batch, 1)
        result = (hidden_states.clone(), kept)
        return (*result, info) if details else result

    token_rows, kept_rows = [], []
    for b in range(batch):
        row_tokens, kept, (dominant_set, anchors, members) = _visionzip_row(
            hidden_states[b], cls_attention[b], keys[b], dominant, contextual)
        token_rows.append(row_tokens)
        kept_rows.append(torch.tensor(kept, dtype=torch.int64, device=hidden_states.device))
        info.dominant.append(dominant_set)
        info.anchors.append(anchors)
        info.members.append(members)
    k = dominant + contextual
    if batch == 0:
        empty = hidden_states.new_zeros(0, k, hidden_states.shape[2])
        result = (empty, torch.zeros(0, k, dtype=torch.int64, device=hidden_states.device))
    else:
        result = (torch.stack(token_rows), torch.stack(kept_rows))
    return (*result, info) if details else result


def _visionzip_row(hidden, attention, keys, dominant, contextual):
    """One row: hidden [T, C], attention [T], keys [T, Dk]; dominant + contextual < T."""
    num_tokens = hidden.shape[0]
    scores = attention.to(torch.float32).tolist()  # exact float32 values as Python floats

    # Section 2: dominant tokens. Highest score first, equal scores: lower index first.
    ranked = sorted(range(1, num_tokens), key=lambda j: (-scores[j], j))
    dominant_set = [0] + sorted(ranked[: dominant - 1])

    # Section 3: contextual tokens.
    taken = set(dominant_set)
    rest = [j for j in range(num_tokens) if j not in taken]  # Rm, ascending
    step = max(1, len(rest) // contextual)
    anchor_positions = list(range(0, len(rest), step))[:contextual]
    anchors = [rest[p] for p in anchor_positions]
    anchor_position_set = set(anchor_positions)
    member_list = [j for p, j in enumerate(rest) if p not in anchor_position_set]

    unit = unit_keys(keys)  # [T, Dk] float32
    anchor_unit = unit[anchors]
    # An anchor whose key equals an earlier anchor's ties with it for every member, and ties
    # go to the first anchor: it can receive no member, so it is left out of the comparison.
    # (Rounding may differ for identical rows: ONNX Runtime's ReduceSum and torch's matmul
    # both give identical rows / columns different last bits, so the tie would not survive.)
    key32 = keys.to(torch.float32)
    candidates = [m for m in range(len(anchors))
                  if not any(torch.equal(key32[anchors[m]], key32[anchors[p]]) for p in range(m))]
    groups: dict[int, list[int]] = {a: [] for a in anchors}
    if member_list:
        sims = (unit[member_list] @ anchor_unit[candidates].T).tolist()  # [members, candidates]
        for i, row in zip(member_list, sims):
            best = max(range(len(candidates)), key=row.__getitem__)  # max() keeps the first maximum
            groups[anchors[candidates[best]]].append(i)

    x = hidden.to(torch.float32)
    out = [hidden[j] for j in dominant_set]  # unchanged, bit for bit
    for a in anchors:
        total = torch.zeros_like(x[a])
        for i in groups[a]:  # ascending member index, float32
            total = total + x[i]
        out.append((x[a] + total / max(1, len(groups[a]))).to(hidden.dtype))
    return torch.stack(out), dominant_set + anchors, (dominant_set, anchors, groups)


def visionzip_anchors(dominant_set, num_tokens: int, contextual: int) -> list[int]:
    """The anchor rows that follow from a dominant set (``[CLS]`` included) for ``T = num_tokens``."""
    taken = set(dominant_set)
    rest = [j for j in range(num_tokens) if j not in taken]
    step = max(1, len(rest) // contextual)
    return [rest[p] for p in range(0, len(rest), step)][:contextual]


def visionzip_crop_slots(num_kept: int, num_patches: int, dominant: int) -> tuple[slice, slice]:
    """Which output rows of one op row are dominant patches and which contextual tokens (row 0 is
    always [CLS]): ``(patch_rows, contextual_rows)``. ``num_kept`` rows came out of a layer of
    ``1 + num_patches`` rows; ``num_kept == 1 + num_patches`` is the identity (every row a patch,
    in input order, no contextual token)."""
    if num_kept == num_patches + 1:
        return slice(1, num_kept), slice(num_kept, num_kept)
    return slice(1, dominant), slice(dominant, num_kept)


def visionzip_crop_layout(base, tiles, positions, *, dominant: int):
    """One LLaVA-NeXT image from its crops' VisionZip outputs, as the spec's section 5 lays it out.

    ``base`` = ``(tokens [K, H], kept_indices [K])`` of the base crop (the whole image),
    ``tiles`` the same for each high-resolution tile in crop order, ``positions[t]`` [N] the
    row-major index on the stitched ``(side * rows) x (side * cols)`` grid of tile ``t``'s patch
    ``p`` (patch = kept row - 1). Returns the image's tokens (numpy):

    1. the base crop's rows as the op emits them ([CLS], dominant patches, contextual tokens);
    2. the tiles' dominant patch tokens, scattered onto the stitched grid and read in row-major
       grid order;
    3. each tile's [CLS] token, in crop order;
    4. each tile's contextual tokens, in crop order.

    No unpadding and no newline tokens. ``(1 + tiles) * (dominant + contextual)`` rows when
    the op pruned (every crop has the same ``K``).
    """
    import numpy as np

    base_tokens = np.asarray(base[0])
    patches, at, cls, contextual = [], [], [], []
    for (tokens, kept), grid in zip(tiles, positions):
        tokens, kept, grid = np.asarray(tokens), np.asarray(kept, dtype=np.int64), np.asarray(grid)
        patch_rows, contextual_rows = visionzip_crop_slots(len(kept), len(grid), dominant)
        patches.append(tokens[patch_rows])
        at.append(grid[kept[patch_rows] - 1])
        cls.append(tokens[:1])
        contextual.append(tokens[contextual_rows])
    if not tiles:
        return base_tokens
    order = np.argsort(np.concatenate(at), kind="stable")  # stitched grid, row-major
    return np.concatenate([base_tokens, np.concatenate(patches)[order], *cls, *contextual], axis=0)


def explain_visionzip_kept(cls_attention, reference_kept, other_kept, *, dominant: int, contextual: int,
                           tol: float) -> dict:
    """Why another back end's ``kept_indices`` row differs from the reference's: a near-tie or not.

    VisionZip's kept rows depend on one decision only, the dominant set (the ``dominant - 1``
    highest ``cls_attention`` patches); the anchors follow from it. So a differing row is a
    **near-tie** when both rows are well-formed (slot 0 = [CLS], the other's anchors are the
    ones its own dominant set implies) and every patch one row took and the other did not
    scores within ``tol`` (relative to the highest patch score) of the reference's
    ``(dominant-1)``-th score, the boundary of the top-k; anything else is a mismatch.
    ``cls_attention`` is the reference's row ``[T]``. Returns ``{near_tie, stage,
    reference_token, other_token, gap, detail}`` (tokens as layer rows, patch = row - 1).
    """
    ref, other = [int(i) for i in reference_kept], [int(i) for i in other_kept]
    result = {"near_tie": False, "stage": "size", "reference_token": None, "other_token": None, "gap": None}
    if ref == other:
        return {**result, "near_tie": True, "stage": "equal", "detail": "same kept rows"}
    scores = torch.as_tensor(cls_attention).to(torch.float32)
    num_tokens = int(scores.shape[0])
    k = min(dominant + contextual, num_tokens)
    if len(other) != k or len(set(other)) != k or any(not 0 <= i < num_tokens for i in other):
        return {**result, "detail": f"expected {k} distinct rows in [0, {num_tokens}), got {other}"}
    if k == num_tokens:
        return {**result, "stage": "identity", "detail": "the budget covers every row: the op is the identity "
                                                         "(rows 0..T-1), and the other back end kept others"}
    if other[0] != 0:
        return {**result, "stage": "cls", "detail": f"slot 0 must be the [CLS] row 0, got {other[0]}"}
    ref_dominant, other_dominant = set(ref[1:dominant]), set(other[1:dominant])
    if other[dominant:] != visionzip_anchors(other[:dominant], num_tokens, contextual):
        return {**result, "stage": "anchors", "detail": "the other back end's anchors do not follow from its own "
                                                        "dominant set"}
    if ref_dominant == other_dominant:
        return {**result, "stage": "order", "detail": "same dominant set, but the rows differ in order"}
    patch_scores = scores[1:]
    boundary = float(torch.topk(patch_scores, dominant - 1).values.min())
    scale = float(patch_scores.max()) or 1.0
    swapped = sorted((ref_dominant - other_dominant) | (other_dominant - ref_dominant))
    gaps = {j: abs(float(scores[j]) - boundary) / scale for j in swapped}
    worst = max(swapped, key=gaps.__getitem__)
    missing = min(ref_dominant - other_dominant, key=lambda j: float(scores[j]))
    extra = max(other_dominant - ref_dominant, key=lambda j: float(scores[j]))
    gap = gaps[worst]
    result.update(stage="dominant", reference_token=missing, other_token=extra, gap=gap)
    if gap <= tol:
        return {**result, "near_tie": True,
                "detail": f"dominant set: rows {missing} vs {extra} (of {len(swapped)} swapped) all score within "
                          f"{gap:.3g} <= {tol:g} of the top-{dominant - 1} boundary"}
    return {**result, "detail": f"dominant set: row {worst} scores {gap:.3g} away from the top-{dominant - 1} "
                                f"boundary (tolerance {tol:g}); the other back end took rows {sorted(other_dominant - ref_dominant)} "
                                f"instead of {sorted(ref_dominant - other_dominant)}"}


# --------------------------------------------------------------------------- fixed module


class VisionZipFixed(torch.nn.Module):
    """VisionZip batch-vectorised, for any token count (the ONNX function's formulation).

    ``forward(hidden_states [B, T, C], cls_attention [B, T], keys [B, T, Dk]) ->
    (tokens [B, K, C], kept_indices [B, K] int64)``, ``K = min(dominant + contextual, T)``;
    same indices as `visionzip_reference` and the same values up to float32 summation order
    in the contextual means. ``cls_attention`` must not contain NaN (not checked here).

    No result depends on how a TopK orders equal values (TensorRT promises no order):

    - dominant patches: ``v`` = the ``(dominant-1)``-th largest patch score (minimum of the
      TopK values); keep the patches with ``a > v`` and the first ``dominant - 1 - #{a > v}``
      with ``a == v`` in index order (a cumulative count over the tie mask);
    - ``Rm`` list positions by a cumulative count of the non-dominant mask; anchors where
      ``position % step == 0`` and ``position < contextual * step``;
    - output slots: dominant tokens ``0..dominant-1`` in index order, anchor ``m`` at slot
      ``dominant + m``; ``kept_indices`` sorts the distinct slot keys;
    - nearest anchor: the smallest anchor number whose similarity equals the row maximum,
      over the anchors whose key equals no earlier anchor's (a later duplicate would tie with
      the earlier one and lose; leaving it out keeps that exact whatever the rounding of the
      norms and the matrix product).
    """

    def __init__(self, dominant: int, contextual: int):
        super().__init__()
        check_visionzip_attributes(dominant, contextual)
        self.dominant = int(dominant)
        self.contextual = int(contextual)

    def extra_repr(self) -> str:
        return f"dominant={self.dominant}, contextual={self.contextual}"

    def forward(self, hidden_states, cls_attention, keys):
        batch, num_tokens = check_visionzip_inputs(hidden_states, cls_attention, keys)
        device = hidden_states.device
        index = torch.arange(num_tokens, device=device)
        d, c = self.dominant, self.contextual
        if d + c >= num_tokens:
            return hidden_states, index.unsqueeze(0).expand(batch, num_tokens)

        # Dominant patches: the (d-1) highest scores, ties to the lower index.
        patch = index >= 1
        scores = cls_attention.to(torch.float32).masked_fill(~patch, float("-inf"))
        if d > 1:
            kth = torch.topk(scores, d - 1, dim=-1).values.amin(dim=-1, keepdim=True)
            above = patch & (scores > kth)
            tie = patch & (scores == kth)
            need = (d - 1) - above.sum(dim=-1, keepdim=True)
            dominant_patch = above | (tie & (tie.cumsum(dim=-1) <= need))
        else:
            dominant_patch = torch.zeros_like(scores, dtype=torch.bool)
        keep = dominant_patch | ~patch  # [CLS] always

        # Anchors: every step-th position of Rm, the first c of them.
        rest = ~keep
        position = rest.cumsum(dim=-1) - 1  # position in Rm (valid where rest)
        step = max(1, (num_tokens - d) // c)
        anchor = rest & (position % step == 0) & (position < c * step)
        slot = torch.where(keep, keep.cumsum(dim=-1) - 1,
                           torch.where(anchor, d + position // step, num_tokens + index))
        kept = torch.sort(slot, dim=-1).indices[:, : d + c]  # distinct keys: no tie question
        anchors = kept[:, d:]  # [B, c] in anchor order

        # Nearest anchor by normalised-key dot product, ties to the first anchor.
        unit = unit_keys(keys)
        anchor_unit = torch.gather(unit, 1, anchors.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        sims = unit @ anchor_unit.transpose(1, 2).contiguous()  # [B, T, c] (a strided bmm is slow on CPU)
        number = torch.arange(c, device=device)
        anchor_key = torch.gather(keys.to(torch.float32), 1, anchors.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
        same = (anchor_key.unsqueeze(2) == anchor_key.unsqueeze(1)).all(dim=-1)  # [B, c, c]: [m, p]
        duplicate = (same & (number[None, :] < number[:, None])).any(dim=-1)  # equals an earlier anchor
        sims = sims.masked_fill(duplicate.unsqueeze(1), float("-inf"))
        best = sims.amax(dim=-1, keepdim=True)
        target = torch.where(sims == best, number, c).amin(dim=-1)  # [B, T]
        member = rest & ~anchor
        assign = (member.unsqueeze(1) & (target.unsqueeze(1) == number[:, None])).to(torch.float32)  # [B, c, T]

        x = hidden_states.to(torch.float32)
        total = assign @ x  # [B, c, C]
        count = assign.sum(dim=-1, keepdim=True).clamp_min(1.0)
        anchor_x = torch.gather(x, 1, anchors.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        contextual_tokens = (anchor_x + total / count).to(hidden_states.dtype)
        dominant_tokens = torch.gather(
            hidden_states, 1, kept[:, :d].unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
        return torch.cat([dominant_tokens, contextual_tokens], dim=1), kept


# --------------------------------------------------------------------------- torch op


@torch.library.custom_op("fsr::visionzip", mutates_args=())
def visionzip_op(hidden_states: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor,
                 dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.fsr.visionzip``: the op inside a traced model (eager: `VisionZipFixed`).

    Under ``torch.onnx.export(dynamo=True, custom_translation_table=
    visionzip_translation_table())`` it becomes one ``fsr.VisionZip`` node carrying
    ``dominant`` and ``contextual`` as attributes (``add_visionzip_function`` then adds the
    function body), with the output rows ``min(dominant + contextual, T)`` symbolic in T.
    """
    tokens, kept = VisionZipFixed(dominant, contextual)(hidden_states, cls_attention, keys)
    return tokens.clone(), kept.clone()  # a custom op may not return views of its inputs


@visionzip_op.register_fake
def _visionzip_op_shapes(hidden_states, cls_attention, keys, dominant, contextual):
    check_visionzip_attributes(dominant, contextual)
    batch, num_tokens, width = hidden_states.shape
    rows = torch.sym_min(dominant + contextual, num_tokens)
    return hidden_states.new_empty(batch, rows, width), hidden_states.new_empty(batch, rows, dtype=torch.int64)


# --------------------------------------------------------------------------- CLIP inputs


class VisionZipInputs(NamedTuple):
    """The op's three inputs, as computed from one encoder layer."""

    hidden_states: torch.Tensor  #: [B, T, C] the layer's output, in the layer's dtype
    cls_attention: torch.Tensor  #: [B, T] float32: [CLS] query row of the softmax attention, summed over heads
    keys: torch.Tensor  #: [B, T, head_dim] float32: the layer's keys (with bias), mean over heads


def clip_layer_visionzip_inputs(layer: torch.nn.Module, hidden_states: torch.Tensor) -> VisionZipInputs:
    """Run a Hugging Face ``CLIPEncoderLayer`` on its input and return the op's inputs.

    The layer runs as it is (its own attention implementation, e.g. SDPA: no attention
    matrix is requested from it); forward hooks read the outputs of its ``q_proj`` and
    ``k_proj``, so the keys are exactly the ones the layer used. Only the [CLS] query row is
    then scored: ``softmax(q_0 . K^T * scale)`` per head in float32, ``[B, heads, T]``, O(N).
    For LLaVA-1.5 the layer is ``vision_tower.encoder.layers[vision_feature_layer]``
    (index 22 of 24 for ``-2``) and its input is the previous layer's output
    (``hidden_states[vision_feature_layer - 1]`` of the HF vision model).
    Works under ``torch.export`` / ``torch.onnx.export(dynamo=True)`` (the hooks are traced).
    """
    attention = layer.self_attn
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(module, args, output):
            captured[name] = output
        return hook

    handles = [attention.q_proj.register_forward_hook(capture("q")),
               attention.k_proj.register_forward_hook(capture("k"))]
    try:
        output = layer(hidden_states, None)
    finally:
        for handle in handles:
            handle.remove()
    if isinstance(output, tuple):  # older transformers return (hidden_states,)
        output = output[0]
    queries, keys = captured["q"], captured["k"]
    batch, num_tokens, _ = keys.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    q_cls = queries[:, :1].to(torch.float32).reshape(batch, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, d]
    k = keys.to(torch.float32).reshape(batch, num_tokens, heads, head_dim).transpose(1, 2)  # [B, H, T, d]
    probs = torch.softmax((q_cls @ k.transpose(-1, -2)) * attention.scale, dim=-1)  # [B, H, 1, T]
    return VisionZipInputs(output, probs.sum(dim=1)[:, 0], k.mean(dim=1))


# --------------------------------------------------------------------------- ONNX (lazy)

_ONNX_NAMES = (
    "add_visionzip_function",
    "build_visionzip_function",
    "check_visionzip_nodes",
    "visionzip_translation_table",
    "make_visionzip_model",
    "visionzip_function",
    "visionzip_node_attributes",
)


def __getattr__(name):
    if name in _ONNX_NAMES:
        from . import visionzip_onnx

        return getattr(visionzip_onnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
