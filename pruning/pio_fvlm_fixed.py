"""PIO-FVLM, exportable: the gradient in closed form, the static NMS, the pruning stage.

``torch.export`` / ``torch.onnx.export`` cannot trace ``autograd.grad`` (spec section 10), so
the saliency is computed forward-only: `pio_gradient_closed_form` is the hand-written VJP of
the proxy loss (spec section 5.1) through RMSNorm, RoPE, grouped-query attention (with or
without q/k/v/o biases), SwiGLU, the final norm and the LM head, batched, for left-padded
rows. `nms_static` is the NMS in exactly ``keep`` unrolled steps. `PioPruningStage` is the
module that sits between two decoder segments and exports with
``torch.onnx.export(dynamo=True)`` (`export_pio_stage`); `PioEncoderStage` is the optional
encoder-side stage. The readable reference, the truth
these are tested against, is ``pio_fvlm.py``; the method as implemented: ``pio_fvlm.md``.

Batches: rows may be left-padded (``attention_mask`` 0 on padding); each row's result is
the one the reference gives for the row alone, unpadded:

- supervised positions: the ``K_POS`` valid positions before the row's last valid one
  (``rank = cumsum(mask) - 1``; targets ``m - 2 - t`` clamped at 0, ``m`` = valid count);
  a position supervised twice (rows shorter than ``K_POS + 2``) counts once;
- the proxy attention is causal and masks padding keys;
- positions after the surgery: each kept token's position minus the number of tokens
  dropped before it, which renumbers a row's valid tokens ``0..S'-1`` (spec section 8) and
  leaves the padding's positions as they were.

Precision: float64 inputs are computed in float64, anything else in float32, except the
matrix products with weights, which run in the weights' dtype (fp16 weights: fp16 products,
as upstream's fp16 autocast; the weights are never cast, so they stay shareable). The NMS
normalises features in float32 as upstream does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pio_fvlm import K_POS, NORM_EPS, TAU, VE_WINDOWS, PioError, PioProxy, encoder_stage_counts

# ----------------------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Every weight is used as ``W^T`` only (``x @ W^T`` forward, ``(W^T @ u^T)^T = u @ W`` backward),
# and matrix products run in the weight's dtype: the exported graph then holds each weight once,
# as the same [in, out] tensor the decoder graphs hold for ``nn.Linear`` (the exporter folds the
# transpose into one initializer when it is made once), so the two can share it.


class _Affine:
    """An ``nn.Linear`` used through ``W^T`` only, made once per call (see the note above)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        self.wt, self.bias, self.dtype = linear.weight.transpose(0, 1), linear.bias, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b``, the product in the weight's dtype, the result in ``dtype``."""
        y = (x.to(self.wt.dtype) @ self.wt).to(self.dtype)
        return y if self.bias is None else y + self.bias.to(self.dtype)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """``u W`` (the input's VJP), as ``(W^T u^T)^T``."""
        return (self.wt @ u.to(self.wt.dtype).transpose(-1, -2)).transpose(-1, -2).to(self.dtype)


def _rms(x: torch.Tensor, norm: nn.Module, dtype):
    """RMSNorm forward as ``LlamaRMSNorm`` computes it; returns ``(g * x * inv, inv)``."""
    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight.to(dtype) * (x * inv), inv


def _rms_vjp(x: torch.Tensor, norm: nn.Module, inv: torch.Tensor, grad: torch.Tensor, dtype) -> torch.Tensor:
    """``v'^T(x; g)[u] = (g*u) * inv - x * inv^3 * sum((g*u) * x) / D``."""
    gu = norm.weight.to(dtype) * grad
    return gu * inv - x * (inv * inv * inv) * (gu * x).sum(-1, keepdim=True) / x.shape[-1]


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """``rot([a, b]) = [-b, a]`` (transformers' ``rotate_half``)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rotate_t(x: torch.Tensor) -> torch.Tensor:
    """The transpose of `_rotate`: ``[a, b] -> [b, -a]``."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((b, -a), dim=-1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i]]`` for x [B, S, ...] and index [B, I]."""
    shape = (*index.shape, *x.shape[2:])
    return torch.gather(x, 1, index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def supervised_rows(attention_mask: torch.Tensor, k_pos: int = K_POS):
    """Supervised positions of each (padded) row: ``(positions [B, k], one-hot [B, k, S] bool,
    weight [B, k])``, weight 1 for a position's first occurrence, 0 for repeats."""
    valid = attention_mask > 0
    rank = torch.cumsum(valid.to(torch.int64), dim=1) - 1
    count = valid.to(torch.int64).sum(dim=1, keepdim=True)
    steps = torch.arange(k_pos, device=attention_mask.device)
    target = (count - 2 - steps[None]).clamp_min(0)  # [B, k]
    onehot = valid[:, None, :] & (rank[:, None, :] == target[:, :, None])
    positions = onehot.to(torch.int64).argmax(-1)
    earlier = torch.ones(k_pos, k_pos, dtype=torch.bool, device=attention_mask.device).tril(-1)
    repeat = ((positions[:, :, None] == positions[:, None, :]) & earlier[None]).any(-1)
    return positions, onehot, (~repeat).to(torch.int64)


# ----------------------------------------------------------------------------- closed form


def pio_gradient_closed_form(proxy: PioProxy, hidden: torch.Tensor, attention_mask: torch.Tensor,
                             position_ids: torch.Tensor, k_pos: int = K_POS) -> torch.Tensor:
    """``G = d loss / d H`` [B, S, D] of the proxy loss, forward-only (spec section 5.1).

    ``hidden`` [B, S, D], ``attention_mask`` [B, S] (0 = padding), ``position_ids`` [B, S].
    Rows are independent; padded rows get G = 0 at padding.
    """
    ct = _compute_dtype(hidden.dtype)
    attn, mlp = proxy.layer.self_attn, proxy.layer.mlp
    d = attn.head_dim  # head counts from the projections' widths: the layer's own geometry
    n_heads, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    group = n_heads // n_kv
    batch, length, _ = hidden.shape
    h = hidden.to(ct)
    valid = attention_mask > 0
    wq, wk, wv, wo = (_Affine(lin, ct) for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    w_gate, w_up, w_down = (_Affine(lin, ct) for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    w_lm = _Affine(proxy.lm_head, ct)

    sup, onehot, weight = supervised_rows(attention_mask, k_pos)  # [B,k], [B,k,S], [B,k]
    scatter = onehot.to(ct).transpose(1, 2)  # [B,S,k]: adds row-wise results back at P
    weight = weight.to(ct)
    weight = weight / weight.sum(-1, keepdim=True)

    # ---- forward, supervised rows only (keys and values over all S)
    cos, sin = proxy.rotary_emb(h, position_ids)  # [B,S,d]
    cos, sin = cos.to(ct), sin.to(ct)
    a, inv1 = _rms(h, proxy.layer.input_layernorm, ct)
    a_p = _gather_rows(a, sup)  # [B,k,D]
    q = wq(a_p).reshape(batch, k_pos, n_heads, d)
    k = wk(a).reshape(batch, length, n_kv, d).transpose(1, 2)  # [B,kv,S,d]
    v = wv(a).reshape(batch, length, n_kv, d).transpose(1, 2)
    cos_p, sin_p = _gather_rows(cos, sup)[:, :, None], _gather_rows(sin, sup)[:, :, None]  # [B,k,1,d]
    q_rot = q * cos_p + _rotate(q) * sin_p  # [B,k,H,d]
    k_rot = k * cos[:, None] + _rotate(k) * sin[:, None]  # [B,kv,S,d]
    # heads grouped by their KV head: [B, kv, group*k, d], row (j, t) = head kv*group+j, position t
    q_grp = q_rot.reshape(batch, k_pos, n_kv, group, d).permute(0, 2, 3, 1, 4).reshape(batch, n_kv, group * k_pos, d)
    scores = (q_grp @ k_rot.transpose(-1, -2)) * attn.scaling  # [B,kv,gk,S]
    keys = torch.arange(length, device=hidden.device)
    allowed = valid[:, None, :] & (keys[None, None, :] <= sup[:, :, None])  # [B,k,S]
    allowed = allowed[:, None, None].expand(batch, n_kv, group, k_pos, length).reshape(batch, n_kv, group * k_pos,
                                                                                      length)
    scores = torch.where(allowed, scores, torch.finfo(ct).min)
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).reshape(batch, n_kv, group, k_pos, d).permute(0, 3, 1, 2, 4).reshape(batch, k_pos, n_heads * d)
    y = _gather_rows(h, sup) + wo(out)  # [B,k,D]
    c, inv2 = _rms(y, proxy.layer.post_attention_layernorm, ct)
    gate, up = w_gate(c), w_up(c)
    sig = torch.sigmoid(gate)
    act = gate * sig
    z = y + w_down(act * up)
    zf, inv_f = _rms(z, proxy.norm, ct)
    logits = w_lm(zf)  # [B,k,V]

    # ---- backward
    probs_v = torch.softmax(logits, dim=-1)
    labels = logits.argmax(-1, keepdim=True)
    vocab = torch.arange(logits.shape[-1], device=hidden.device)
    d_logits = (probs_v - (vocab == labels).to(ct)) * weight[:, :, None]
    d_z = _rms_vjp(z, proxy.norm, inv_f, w_lm.vjp(d_logits), ct)
    d_m = w_down.vjp(d_z)
    d_gate = d_m * up * sig * (1 + gate * (1 - sig))
    d_c = w_gate.vjp(d_gate) + w_up.vjp(d_m * act)
    d_y = d_z + _rms_vjp(y, proxy.layer.post_attention_layernorm, inv2, d_c, ct)  # [B,k,D]
    d_out = wo.vjp(d_y).reshape(batch, k_pos, n_kv, group, d)
    d_out = d_out.permute(0, 2, 3, 1, 4).reshape(batch, n_kv, group * k_pos, d)
    d_probs = d_out @ v.transpose(-1, -2)  # [B,kv,gk,S]
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    d_v = probs.transpose(-1, -2) @ d_out  # [B,kv,S,d]: summed over the group's heads
    d_k_rot = (d_scores.transpose(-1, -2) @ q_grp) * attn.scaling
    d_q_grp = (d_scores @ k_rot) * attn.scaling  # [B,kv,gk,d]
    d_k = d_k_rot * cos[:, None] + _rotate_t(d_k_rot * sin[:, None])
    d_q_rot = d_q_grp.reshape(batch, n_kv, group, k_pos, d).permute(0, 3, 1, 2, 4).reshape(batch, k_pos, n_heads, d)
    d_q = d_q_rot * cos_p + _rotate_t(d_q_rot * sin_p)
    d_a = (wk.vjp(d_k.transpose(1, 2).reshape(batch, length, n_kv * d))
           + wv.vjp(d_v.transpose(1, 2).reshape(batch, length, n_kv * d))
           + scatter @ wq.vjp(d_q.reshape(batch, k_pos, n_heads * d)))
    return _rms_vjp(h, proxy.layer.input_layernorm, inv1, d_a, ct) + scatter @ d_y


def pio_saliency_closed_form(proxy: PioProxy, hidden: torch.Tensor, attention_mask: torch.Tensor,
                             position_ids: torch.Tensor, k_pos: int = K_POS) -> torch.Tensor:
    """Saliency ``||G_t||_2`` [B, S] in the compute dtype (float64 for float64, else float32)."""
    return pio_gradient_closed_form(proxy, hidden, attention_mask, position_ids, k_pos).norm(dim=-1)


# ----------------------------------------------------------------------------- NMS


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """Position of each score in a stable descending sort [.., n] int64 (ties: lower index first)."""
    n = scores.shape[-1]
    index = torch.arange(n, device=scores.device)
    before = (scores[..., None, :] > scores[..., :, None]) | (
        (scores[..., None, :] == scores[..., :, None]) & (index[None, :] < index[:, None]))
    return before.to(torch.int64).sum(-1)


def nms_static(saliency: torch.Tensor, features: torch.Tensor, keep: int, tau: float = TAU) -> torch.Tensor:
    """The NMS of spec section 6 in exactly ``keep`` steps: kept indices [B, keep] int64, ascending.

    Each step takes the best-ranked token that is neither selected nor suppressed, or, when
    none is left, the best-ranked unselected one; only a token of the first kind suppresses
    its neighbours. Ranks are distinct integers, so no step depends on how an ArgMin/TopK
    orders equal values.
    """
    n = saliency.shape[-1]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise PioError(f"keep must be an integer in [1, {n}], got {keep!r}")
    x = F.normalize(features.float(), dim=-1, eps=NORM_EPS)
    neighbours = (x @ x.transpose(-1, -2)) >= tau  # [B,n,n]
    key = descending_rank(saliency).to(torch.float32)  # 0..n-1
    # A token's cost: its rank, + n while suppressed, + 4n once selected (integers < 5n: exact in
    # float32). The cheapest token is the best free one while any is left, else the best
    # unselected one; only a free pick (cost < n) suppresses its neighbours.
    big = float(n)
    suppress = neighbours.to(torch.float32) * big  # [B,n,n]
    index = torch.arange(n, device=saliency.device)
    penalty = torch.zeros_like(key)
    for _ in range(keep):
        best, choice = (key + penalty).min(-1, keepdim=True)  # [B,1]
        pick = (index[None] == choice).to(torch.float32)  # one-hot [B,n]
        row = (pick[:, None, :] @ suppress)[:, 0]  # the pick's row of N, times n (exact: one term)
        penalty = torch.maximum(penalty, torch.maximum(row * (best < big).to(torch.float32), pick * (4 * big)))
    order = torch.where(penalty >= 4 * big, index, index + n).to(torch.float32)
    return torch.topk(order, keep, dim=-1, largest=False, sorted=True).indices


@torch.library.custom_op("fsr::pio_nms", mutates_args=())
def pio_nms_op(saliency: torch.Tensor, features: torch.Tensor, keep: int, tau: float) -> torch.Tensor:
    """``torch.ops.fsr.pio_nms``: `nms_static` inside a traced module.

    Eager it is `nms_static`. Under ``torch.onnx.export(dynamo=True, custom_translation_table=
    pio_nms_translation_table())`` it becomes one ``fsr.PioNms`` node with ``keep`` and ``tau`` as
    attributes, whose body (`pio_nms_onnx`) runs the ``keep`` steps as one ONNX ``Loop``: the
    exported graph does not grow with ``keep``.
    """
    return nms_static(saliency, features, keep, tau).clone()


@pio_nms_op.register_fake
def _pio_nms_shapes(saliency, features, keep, tau):
    return saliency.new_empty(saliency.shape[0], keep, dtype=torch.int64)


# ----------------------------------------------------------------------------- sequence surgery


def surgery_index(length, image_start: torch.Tensor, kept: torch.Tensor, num_visual: int):
    """Gather index [B, S'] into the stage input and tokens dropped before each output [B, S'].

    ``S' = S - num_visual + keep``: ``[0, s0)``, ``s0 + kept``, ``[s0 + n, S)`` per row.
    """
    keep = kept.shape[-1]
    slots = torch.arange(length - num_visual + keep, device=kept.device)[None]  # [1,S']
    start = image_start.to(torch.int64)[:, None]
    local = slots - start
    in_span = (local >= 0) & (local < keep)
    kept_at = torch.gather(kept, 1, local.clamp(0, keep - 1).expand(kept.shape[0], -1))
    after = num_visual - keep
    index = torch.where(local < 0, slots, torch.where(in_span, start + kept_at, slots + after))
    dropped = torch.where(local < 0, torch.zeros_like(index),
                          torch.where(in_span, kept_at - local, torch.full_like(index, after)))
    return index, dropped


class PioPruningStage(nn.Module):
    """One PIO-FVLM stage, between decoder segments ``[.., r)`` and ``[r, ..)``.

    Constants of the stage: ``num_visual`` (n, visual tokens entering it, the same for every
    row) and ``keep``; ``tau``, ``k_pos``. The proxy (layer ``r``, final norm, LM head, RoPE)
    is shared with the model.

    Inputs: ``hidden_states`` [B, S, D] (output of layer ``r - 1``), ``attention_mask``
    [B, S] (int64, 0 = padding), ``position_ids`` [B, S] (int64, the positions the segment
    before used), ``image_start`` [B] (int64, first visual token of each row; the span is
    ``[start, start + num_visual)``).

    Outputs, with ``S' = S - num_visual + keep``: ``hidden_states_out`` [B, S', D] (input
    dtype, rows gathered bit for bit), ``attention_mask_out`` [B, S'], ``position_ids_out``
    [B, S'] (renumbered), ``kept_indices`` [B, keep] (int64, ascending, inside the span),
    ``saliency`` [B, n] (float32, float64 for float64 inputs). The next segment takes the
    first three; the next stage the same ``image_start`` with ``num_visual = keep``.
    """

    INPUTS = ("hidden_states", "attention_mask", "position_ids", "image_start")
    OUTPUTS = ("hidden_states_out", "attention_mask_out", "position_ids_out", "kept_indices", "saliency")

    def __init__(self, proxy: PioProxy, *, num_visual: int, keep: int, tau: float = TAU, k_pos: int = K_POS):
        super().__init__()
        for name, value in (("num_visual", num_visual), ("keep", keep), ("k_pos", k_pos)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PioError(f"{name} must be an integer >= 1, got {value!r}")
        if keep >= num_visual:
            raise PioError(f"a stage that keeps {keep} of {num_visual} visual tokens prunes nothing; "
                           "keep must be smaller than num_visual")
        self.proxy = proxy
        self.num_visual, self.keep, self.tau, self.k_pos = num_visual, keep, float(tau), k_pos

    def extra_repr(self) -> str:
        return f"num_visual={self.num_visual}, keep={self.keep}, tau={self.tau}, k_pos={self.k_pos}"

    def forward(self, hidden_states, attention_mask, position_ids, image_start):
        n = self.num_visual
        saliency = pio_saliency_closed_form(self.proxy, hidden_states, attention_mask, position_ids, self.k_pos)
        span = image_start.to(torch.int64)[:, None] + torch.arange(n, device=hidden_states.device)[None]
        span_saliency = torch.gather(saliency, 1, span)
        kept = pio_nms_op(span_saliency, _gather_rows(hidden_states, span), self.keep, self.tau)
        index, dropped = surgery_index(hidden_states.shape[1], image_start, kept, n)
        return (_gather_rows(hidden_states, index), torch.gather(attention_mask, 1, index),
                torch.gather(position_ids, 1, index) - dropped, kept, span_saliency)


def check_stage_inputs(stage: PioPruningStage, hidden_states, attention_mask, position_ids, image_start) -> None:
    """Host-side checks a runtime makes before calling a stage (the graph itself cannot raise).
    Takes tensors or arrays."""
    hidden_states, attention_mask, position_ids, image_start = (
        torch.as_tensor(t) for t in (hidden_states, attention_mask, position_ids, image_start))
    if hidden_states.dim() != 3:
        raise PioError(f"hidden_states must be [batch, sequence, hidden], got shape {tuple(hidden_states.shape)}")
    batch, length = hidden_states.shape[:2]
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if tuple(t.shape) != (batch, length):
            raise PioError(f"{name} must be [{batch}, {length}], got {tuple(t.shape)}")
    if tuple(image_start.shape) != (batch,):
        raise PioError(f"image_start must be [{batch}], got {tuple(image_start.shape)}")
    start = image_start.to(torch.int64)
    if bool((start < 0).any()) or bool((start + stage.num_visual > length).any()):
        raise PioError(f"an image span [start, start + {stage.num_visual}) falls outside the {length}-token "
                       f"sequence (starts {start.tolist()})")
    span = start[:, None] + torch.arange(stage.num_visual)[None]
    if not bool(torch.gather(attention_mask, 1, span).gt(0).all()):
        raise PioError("an image span covers padding: the attention mask must be 1 on every visual token")


# ----------------------------------------------------------------------------- encoder-side stage


class PioEncoderStage(nn.Module):
    """The encoder-side stage ("w/ VE"), batched and exportable; `encoder_stage_reference` per row.

    Inputs ``local_attention``, ``global_attention`` [B, n] (float), ``tokens`` [B, n, D];
    outputs ``merged`` [B, K, D] (tokens' dtype) and ``kept_indices`` [B, K] (int64,
    ascending) with ``K = windows**2 * (nl // windows**2) + keep - nl``, ``nl = int(keep / 2)``.
    The global picks are ranked among the tokens that are not local picks (the reference zeroes
    the local picks instead: the same whenever at least ``keep - nl`` other tokens have a
    positive global attention, which a softmax guarantees).
    """

    INPUTS = ("local_attention", "global_attention", "tokens")
    OUTPUTS = ("merged", "kept_indices")

    def __init__(self, *, num_visual: int, keep: int, windows: int = VE_WINDOWS):
        super().__init__()
        side, self.per_window, self.n_global = encoder_stage_counts(num_visual, keep, windows)
        self.num_visual, self.keep, self.windows = num_visual, keep, windows
        self.kept_count = windows * windows * self.per_window + self.n_global
        cells = torch.arange(num_visual)
        size = side // windows
        window = (cells // side) // size * windows + (cells % side) // size
        self.register_buffer("same_window", window[:, None] == window[None, :], persistent=False)

    def forward(self, local_attention, global_attention, tokens):
        n = self.num_visual
        index = torch.arange(n, device=tokens.device)
        earlier = index[None, :] < index[:, None]  # [i, j]: j < i

        def beats(scores):  # [B, i, j]: j ranks before i (higher score, ties to the lower index)
            a, b = scores[:, None, :], scores[:, :, None]
            return (a > b) | ((a == b) & earlier[None])

        local = (beats(local_attention.float()) & self.same_window[None]).to(torch.int64).sum(-1) < self.per_window
        others = beats(global_attention.float()) & ~local[:, None, :]
        chosen = ~local & (others.to(torch.int64).sum(-1) < self.n_global)
        order = torch.where(local | chosen, index, index + n).to(torch.float32)
        kept = torch.topk(order, self.kept_count, dim=-1, largest=False, sorted=True).indices  # [B,K]
        values = tokens.float()
        kept_values = _gather_rows(values, kept)
        unit = F.normalize(values, dim=-1, eps=NORM_EPS)
        similarity = unit @ F.normalize(kept_values, dim=-1, eps=NORM_EPS).transpose(-1, -2)  # [B,n,K]
        slots = torch.arange(self.kept_count, device=tokens.device)
        dropped = ~(local | chosen)
        assign = ((similarity.argmax(-1, keepdim=True) == slots) & dropped[:, :, None]).to(torch.float32)
        total = kept_values + assign.transpose(1, 2) @ values
        merged = total / (1 + assign.sum(1))[:, :, None]
        return merged.to(tokens.dtype), kept


class PioEncoderTokens(nn.Module):
    """The encoder-side stage on the vision tower's named outputs: ``(tokens [B,n,D], saliency [B,n]
    (the feature layer's [CLS] attention: the global map), early_saliency [B,n] (an early layer's: the
    local map)) -> (merged, kept_indices)``; a `PioEncoderStage` per token count ``n``."""

    def __init__(self, *, keep: int, windows: int = VE_WINDOWS):
        super().__init__()
        self.keep, self.windows = keep, windows
        self.stages = nn.ModuleDict()

    def stage(self, num_visual: int) -> PioEncoderStage:
        key = str(num_visual)
        if key not in self.stages:
            self.stages[key] = PioEncoderStage(num_visual=num_visual, keep=self.keep, windows=self.windows)
        return self.stages[key]

    def forward(self, tokens, saliency, early_saliency):
        stage = self.stage(tokens.shape[1]).to(tokens.device)
        return stage(early_saliency, saliency, tokens)


# ----------------------------------------------------------------------------- export


def stage_example_inputs(stage: PioPruningStage, dtype: torch.dtype | None = None) -> tuple:
    """Example inputs for tracing a stage: batch 2 (a batch-1 example fixes B), left padding."""
    dtype = dtype or next(stage.parameters()).dtype
    hidden_size = stage.proxy.layer.self_attn.q_proj.in_features
    batch, length = 2, stage.num_visual + 3 * K_POS
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, length, hidden_size, generator=gen).to(dtype)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, :2] = 0
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    return hidden, mask, positions, torch.tensor([3, 5])


def stage_dynamic_shapes(num_visual: int) -> tuple:
    """``dynamic_shapes`` of a stage's inputs: batch, and a sequence of at least ``num_visual + 2``."""
    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=num_visual + 2)
    return ({0: batch, 1: sequence}, {0: batch, 1: sequence}, {0: batch, 1: sequence}, {0: batch})


def export_pio_stage(stage: PioPruningStage, *, dtype: torch.dtype | None = None, opset: int = 18,
                     inline: bool = False):
    """Export a stage with ``torch.onnx.export(dynamo=True)``; batch and sequence dynamic.

    Returns the ``onnx.ModelProto``. Inputs and outputs are named as in
    `PioPruningStage.INPUTS` / `OUTPUTS`; each weight matrix is one initializer holding
    ``W^T`` (named by the exporter); the NMS is one ``fsr.PioNms`` node (its body an ONNX
    local function with a ``Loop``: `pio_nms_onnx`; ``inline``: the body inlined); the
    model's ``metadata_props`` record what the graph is specialised to (`stage_metadata`).
    """
    from fsr.onnx_io import quiet_exporter

    from .pio_nms_onnx import add_pio_nms_function, inline_pio_nms, pio_nms_translation_table

    args = stage_example_inputs(stage, dtype)
    with quiet_exporter():
        program = torch.onnx.export(stage.eval(), args, dynamo=True, opset_version=opset,
                                    input_names=list(PioPruningStage.INPUTS),
                                    output_names=list(PioPruningStage.OUTPUTS),
                                    dynamic_shapes=stage_dynamic_shapes(stage.num_visual), verbose=False,
                                    custom_translation_table=pio_nms_translation_table())
    model = program.model_proto
    add_pio_nms_function(model)
    if inline:
        model = inline_pio_nms(model)
    for key, value in stage_metadata(stage).items():
        model.metadata_props.add(key=key, value=value)
    return model


def stage_metadata(stage: PioPruningStage) -> dict[str, str]:
    """The constants an exported stage is built for: ``pio.num_visual``, ``pio.keep``, ``pio.tau``,
    ``pio.k_pos`` and ``pio.proxy_layer`` (0-based; -1 when unknown)."""
    layer = stage.proxy.layer_index
    return {"pio.num_visual": str(stage.num_visual), "pio.keep": str(stage.keep), "pio.tau": repr(stage.tau),
            "pio.k_pos": str(stage.k_pos), "pio.proxy_layer": str(-1 if layer is None else layer)}
