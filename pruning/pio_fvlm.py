"""PIO-FVLM (TRIO): gradient-guided visual-token pruning inside the LLM, readable reference.

Specification: ``shared/docs/methods/pio-fvlm.md`` (written from ocy1/TRIO @ ec85d99); the
method as implemented here, with our decisions, is described in ``pruning/pio_fvlm.md``.
This module is the **truth**: it follows the spec literally, one sequence at a time, with
autograd through transformers' own Llama modules. ``pio_fvlm_fixed.py`` holds the
exportable forms (the forward-only closed form of the gradient, the static NMS, the
pruning stage that sits between two decoder segments); they are tested against this file.

What is here:

- schedules: `PioSchedule` / `PioStage`, `parse_pio_schedule("1:92,10:54,15:22")`, the
  spec's LLaVA-1.5 tables (`LLAVA15_SCHEDULES`, average budgets 64 and 128, and 192: ours),
  `llava15_schedule(budget)`, the encoder-side ("w/ VE") configuration
  `LLAVA15_VE_SCHEDULE_64`;
- `PioProxy`: the modules of the layer-local proxy loss (decoder layer ``p``, final RMSNorm,
  LM head, rotary embedding), shared with the model, never copied;
- `supervised_positions`, `proxy_loss`, `pio_saliency_reference` (autograd), `nms_reference`
  (the two passes of spec section 6), `pio_stage_reference` (saliency, NMS, sequence
  surgery, renumbered positions) and `pio_generate_reference` (a greedy generation through
  an HF Llama decoder that prunes at the schedule's layers, with per-layer KV lengths and
  per-layer decode position offsets): the pipeline every export is compared with;
- `encoder_stage_reference`: the optional encoder-side stage ("w/ VE", spec section 7):
  windowed local and global picks from two [CLS] attention maps, then merging.

Layer numbers: a schedule holds the spec's **1-based** numbers ``r``: the stage prunes the
output of decoder layer ``r - 1`` (0-based), so the pruned sequence first enters the layer
with 0-based index ``r``, which is also the proxy layer ``p = r`` (LLaVA). The decoder is
therefore cut at the 0-based indices ``r`` themselves (``DecoderStep(r_i, r_{i+1})``).

RMSNorm precision: transformers' ``LlamaRMSNorm`` casts its input to float32 whatever its
dtype, so through it a float64 model is float32 in both norms (gradients then differ from
float64 math by ~1e-7). The reference therefore evaluates the norms with `rms_norm`, which
is the same sequence of operations as ``LlamaRMSNorm.forward`` in ``max(float32, dtype)``:
bit-identical to transformers for float16 / bfloat16 / float32 (a test checks the proxy
forward against ``LlamaDecoderLayer.__call__`` bit for bit) and the spec's exact math in
float64. Everything else (attention with its projections, RoPE tables, MLP, LM head) is
the transformers modules themselves.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .pio_schedule import (  # noqa: F401 (re-exported: the schedules and constants live in a light module)
    K_POS, LLAVA15_SCHEDULES, LLAVA15_VE_SCHEDULE_64, NORM_EPS, TAU, VE_GLOBAL_LAYER, VE_LOCAL_LAYER, VE_WINDOWS,
    PioError, PioSchedule, PioStage, encoder_stage_counts, llava15_schedule, parse_pio_schedule,
)


# ----------------------------------------------------------------------------- the proxy


class PioProxy(nn.Module):
    """Modules of the layer-local proxy loss: decoder layer ``p``, final RMSNorm, LM head, RoPE.

    Holds references to the model's own modules (parameters shared, nothing copied). The
    layer must be a Llama-style decoder layer: ``self_attn`` with ``q/k/v/o_proj`` (biases
    allowed), ``mlp`` with ``gate/up/down_proj`` and a SiLU activation, RMSNorms
    ``input_layernorm`` / ``post_attention_layernorm``.
    """

    def __init__(self, layer: nn.Module, norm: nn.Module, lm_head: nn.Module, rotary_emb: nn.Module,
                 layer_index: int | None = None):
        super().__init__()
        check_proxy_layer(layer)
        self.layer, self.norm, self.lm_head, self.rotary_emb = layer, norm, lm_head, rotary_emb
        self.layer_index = layer_index  #: 0-based index of ``layer`` in its LLM, when known

    @classmethod
    def from_language_model(cls, language_model: nn.Module, lm_head: nn.Module, layer: int) -> "PioProxy":
        """The proxy of a stage whose 1-based number is ``layer`` (LLaVA: proxy ``p = layer``, 0-based)."""
        n = len(language_model.layers)
        if not 0 <= layer < n:
            raise PioError(f"proxy layer {layer} is out of range for an LLM with {n} layers")
        return cls(language_model.layers[layer], language_model.norm, lm_head, language_model.rotary_emb, layer)


def check_proxy_layer(layer: nn.Module) -> None:
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    modules = dict(layer.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise PioError(f"{type(layer).__name__} is not a Llama-style decoder layer (missing {', '.join(missing)}); "
                       "PIO-FVLM's closed form supports Llama / Qwen2-style layers")
    act = getattr(getattr(layer.mlp, "config", None), "hidden_act", None)
    if act != "silu":
        raise PioError(f"the proxy layer's MLP activation is {act!r}; the closed form is written for SwiGLU ('silu')")


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward``'s operations in ``max(float32, x.dtype)`` (see the module docstring)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def causal_mask(length: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive causal mask [1, 1, S, S]: 0 on and below the diagonal, dtype min above."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def layer_forward(layer: nn.Module, hidden: torch.Tensor, position_embeddings, attention_mask) -> torch.Tensor:
    """``LlamaDecoderLayer.forward`` (no cache), its norms through `rms_norm`."""
    attn, _ = layer.self_attn(hidden_states=rms_norm(layer.input_layernorm, hidden),
                              position_embeddings=position_embeddings, attention_mask=attention_mask)
    hidden = hidden + attn
    return hidden + layer.mlp(rms_norm(layer.post_attention_layernorm, hidden))


# ----------------------------------------------------------------------------- saliency (autograd)


def supervised_positions(length: int, k_pos: int = K_POS) -> list[int]:
    """The spec's supervised logit positions ``P`` of an unpadded sequence of ``length`` tokens.

    Upstream: drop the last logit, mark shifted indices ``L - 1 - t`` (``t < k_pos``,
    ``L = length - 1``) clamped to ``[0, length - 2]``, duplicates collapse. Without padding
    that is ``{S-5, S-4, S-3, S-2}``: the last prompt position is not supervised.
    """
    if length < 2:
        raise PioError(f"a sequence of {length} token(s) has no supervised position (needs at least 2)")
    last = length - 1  # L: mask-valid entries among positions 1..S-1 (>= 1 here)
    return sorted({min(max(last - 1 - t, 0), length - 2) for t in range(k_pos)})


def proxy_loss(proxy: PioProxy, hidden: torch.Tensor, position_ids: torch.Tensor,
               k_pos: int = K_POS) -> torch.Tensor:
    """The layer-local proxy loss of one unpadded sequence ``hidden`` [S, D] (spec section 4).

    ``Z = Layer_p(H)`` (causal, the current positions), ``logits = W_lm RMSNorm_f(Z)``,
    pseudo-labels ``argmax`` (detached, first index on ties) at the supervised positions,
    cross-entropy averaged over them, in ``max(float32, dtype)``.
    """
    length = hidden.shape[0]
    h = hidden[None]
    cos_sin = proxy.rotary_emb(h, position_ids[None])
    z = layer_forward(proxy.layer, h, cos_sin, causal_mask(length, h.dtype, h.device))
    logits = proxy.lm_head(rms_norm(proxy.norm, z))[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # Upstream's labels, literally: shift, mark the supervised rows, ignore the rest.
    shift_logits = logits[:-1]
    labels = torch.full((length - 1,), -100, dtype=torch.long, device=hidden.device)
    rows = torch.tensor(supervised_positions(length, k_pos), device=hidden.device)
    labels[rows] = shift_logits[rows].detach().argmax(-1)
    return F.cross_entropy(shift_logits, labels, ignore_index=-100, reduction="mean")


def pio_gradient_reference(proxy: PioProxy, hidden: torch.Tensor, position_ids: torch.Tensor,
                           k_pos: int = K_POS) -> torch.Tensor:
    """``G = d loss / d H`` [S, D] for one unpadded sequence, by autograd (the weights are not
    differentiated; ``H`` is detached from whatever produced it)."""
    if hidden.dim() != 2:
        raise PioError(f"the reference takes one sequence [S, D], got shape {tuple(hidden.shape)}")
    with torch.enable_grad():
        h = hidden.detach().clone().requires_grad_(True)
        loss = proxy_loss(proxy, h, position_ids, k_pos)
        (grad,) = torch.autograd.grad(loss, h)
    return grad


def pio_saliency_reference(proxy: PioProxy, hidden: torch.Tensor, position_ids: torch.Tensor,
                           k_pos: int = K_POS) -> torch.Tensor:
    """Token saliency ``s_t = ||G_t||_2`` [S] of one unpadded sequence (spec section 5)."""
    return pio_gradient_reference(proxy, hidden, position_ids, k_pos).norm(dim=-1)


# ----------------------------------------------------------------------------- NMS


def neighbour_matrix(features: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """``N[i, j] = (x̂_i . x̂_j >= tau)`` [.., n, n] bool, x̂ normalised in float32 (diagonal included)."""
    x = F.normalize(features.float(), dim=-1, eps=NORM_EPS)
    return (x @ x.transpose(-1, -2)) >= tau


def nms_reference(saliency: torch.Tensor, features: torch.Tensor, keep: int, tau: float = TAU) -> list[int]:
    """Gradient-ordered NMS of one span (spec section 6): local indices kept, ascending.

    ``saliency`` [n], ``features`` [n, D] (the hidden states of the span before pruning).
    Visit tokens by descending saliency (ties: lower index first); strict pass: take a token
    unless suppressed, then suppress its neighbours; fill pass: if fewer than ``keep`` were
    taken, add untaken tokens in the same order.
    """
    n = saliency.shape[0]
    if features.shape[0] != n:
        raise PioError(f"{n} saliencies for {features.shape[0]} feature rows")
    if not 1 <= keep:
        raise PioError(f"keep must be >= 1, got {keep}")
    neighbours = neighbour_matrix(features, tau).tolist()
    values = saliency.tolist()
    order = sorted(range(n), key=lambda i: (-values[i], i))
    selected: list[int] = []
    suppressed = [False] * n
    for i in order:  # strict pass
        if len(selected) == keep:
            break
        if suppressed[i]:
            continue
        selected.append(i)
        suppressed = [s or nb for s, nb in zip(suppressed, neighbours[i])]
    taken = set(selected)
    for i in order:  # fill pass
        if len(selected) >= keep:
            break
        if i not in taken:
            selected.append(i)
            taken.add(i)
    return sorted(selected)


# ----------------------------------------------------------------------------- one stage


@dataclasses.dataclass
class PioStageResult:
    """What one pruning stage does to one unpadded sequence."""

    hidden: torch.Tensor  #: [S', D] the pruned hidden states
    position_ids: torch.Tensor  #: [S'] renumbered 0..S'-1 (LLaVA)
    keep_index: torch.Tensor  #: [S'] indices into the stage's input sequence, ascending
    kept_local: torch.Tensor  #: [keep] kept indices inside the visual span, ascending
    saliency: torch.Tensor  #: [n] saliency of the span's tokens (empty if nothing is pruned)


def pio_stage_reference(proxy: PioProxy, hidden: torch.Tensor, position_ids: torch.Tensor,
                        image_span: tuple[int, int], keep: int, *, tau: float = TAU,
                        k_pos: int = K_POS) -> PioStageResult:
    """Prune one unpadded sequence ``hidden`` [S, D] at one stage (spec sections 4-6, 8).

    ``image_span = (s0, n)``: the visual tokens are ``hidden[s0:s0+n]``. Nothing is pruned
    when ``keep >= n`` or ``n == 0`` (the span is returned whole).
    """
    length = hidden.shape[0]
    s0, n = image_span
    if not (0 <= s0 and n >= 0 and s0 + n <= length):
        raise PioError(f"image span (start {s0}, length {n}) does not fit a sequence of {length} tokens")
    if keep < 1 or keep >= n:
        index = torch.arange(length, device=hidden.device)
        return PioStageResult(hidden, position_ids, index, torch.arange(n, device=hidden.device),
                              hidden.new_zeros(0))
    saliency = pio_saliency_reference(proxy, hidden, position_ids, k_pos)[s0:s0 + n]
    kept = nms_reference(saliency, hidden[s0:s0 + n], keep, tau)
    index = list(range(s0)) + [s0 + i for i in kept] + list(range(s0 + n, length))
    index = torch.tensor(index, device=hidden.device)
    return PioStageResult(hidden[index], torch.arange(len(index), device=hidden.device), index,
                          torch.tensor(kept, device=hidden.device), saliency)


# ----------------------------------------------------------------------------- encoder-side stage ("w/ VE")

def encoder_stage_reference(local_attention: torch.Tensor, global_attention: torch.Tensor, tokens: torch.Tensor,
                            keep: int, windows: int = VE_WINDOWS) -> tuple[torch.Tensor, list[int]]:
    """The encoder-side stage of one image (spec section 7, LLaVA): ``(merged [K, D], kept)``.

    ``local_attention`` / ``global_attention`` [n]: [CLS] -> patch attention (head mean) of the
    two tower layers; ``tokens`` [n, D]: the projected image tokens. Local: the top
    ``nl // windows**2`` of each window (row-major windows of the square grid); global: the top
    ``keep - nl`` of the global map with the local picks set to 0; kept = the union, ascending.
    Every dropped token joins its most cosine-similar kept token (float32, first on ties), and a
    kept token becomes ``(itself + sum of its joiners) / (1 + count)`` (float32, cast back).
    Ties in any ranking go to the lower index.
    """
    n = tokens.shape[0]
    side, per_window, n_global = encoder_stage_counts(n, keep, windows)
    size = side // windows
    local_values, global_values = local_attention.tolist(), global_attention.tolist()
    local: set[int] = set()
    for wy in range(windows):
        for wx in range(windows):
            cells = [y * side + x for y in range(wy * size, (wy + 1) * size) for x in range(wx * size, (wx + 1) * size)]
            local.update(sorted(cells, key=lambda i: (-local_values[i], i))[:per_window])
    zeroed = [0.0 if i in local else v for i, v in enumerate(global_values)]
    chosen = sorted(range(n), key=lambda i: (-zeroed[i], i))[:n_global]
    kept = sorted(local | set(chosen))
    dropped = [i for i in range(n) if i not in set(kept)]
    unit = F.normalize(tokens.float(), dim=-1, eps=NORM_EPS)
    groups: dict[int, list[int]] = {k: [] for k in range(len(kept))}
    if dropped:
        similarity = unit[dropped] @ unit[kept].T
        for row, j in enumerate(dropped):
            groups[int(similarity[row].argmax())].append(j)  # argmax: first index on ties
    merged = []
    for k, i in enumerate(kept):
        total = tokens[i].float()
        for j in groups[k]:
            total = total + tokens[j].float()
        merged.append(total / (1 + len(groups[k])))
    return torch.stack(merged).to(tokens.dtype), kept


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass
class PioStageRecord:
    layer: int  #: 1-based stage layer number
    kept_local: list[int]  #: kept indices inside the span entering the stage
    kept_original: list[int]  #: the same tokens as indices of the span entering the LLM
    saliency: torch.Tensor  #: [n] the span's saliency


@dataclasses.dataclass
class PioGeneration:
    token_ids: list[int]
    stages: list[PioStageRecord]
    kv_lengths: list[int]  #: per decoder layer, after prefill
    position_offsets: list[int]  #: per decoder layer: subtracted from a decode token's position


@torch.no_grad()
def pio_generate_reference(language_model: nn.Module, lm_head: nn.Module, inputs_embeds: torch.Tensor,
                           image_span: tuple[int, int], schedule: PioSchedule, *, max_new_tokens: int,
                           embed_tokens: nn.Module | None = None,
                           eos_token_ids: tuple[int, ...] = (), tau: float = TAU) -> PioGeneration:
    """Greedy generation of one unpadded prompt through an HF Llama decoder, pruned by ``schedule``.

    ``inputs_embeds`` [S, D] is the prefill (image embeddings in place at ``image_span``).
    Prefill runs transformers' decoder layers one by one; before layer ``r`` of each stage
    `pio_stage_reference` prunes (autograd saliency, proxy = layer ``r``). Layers ``>= r``
    cache only the pruned sequence. Decode: the new token's position in layer ``l`` is its
    unpruned position minus the tokens dropped before ``l`` (spec section 8, LLaVA).
    """
    from transformers import DynamicCache

    layers, norm, rotary = language_model.layers, language_model.norm, language_model.rotary_emb
    embed = embed_tokens if embed_tokens is not None else language_model.embed_tokens
    s0, n = image_span
    if schedule.encoder_tokens is not None:
        raise PioError("pio_generate_reference takes the LLM input after the encoder-side stage: pass a "
                       "schedule without encoder_tokens and the span it left")
    schedule.validate(num_layers=len(layers), num_visual=n)
    stages = {st.layer: st for st in schedule.stages}
    cache = DynamicCache(config=language_model.config)
    h = inputs_embeds[None]
    positions = torch.arange(h.shape[1], device=h.device)
    origin = torch.arange(n, device=h.device)
    records, offsets, offset = [], [], 0
    for index, layer in enumerate(layers):
        if index in stages:
            keep = stages[index].keep
            result = pio_stage_reference(PioProxy(layer, norm, lm_head, rotary, index), h[0], positions, (s0, n),
                                         keep, tau=tau)
            origin = origin[result.kept_local]
            records.append(PioStageRecord(index, result.kept_local.tolist(), origin.tolist(), result.saliency))
            h, positions = result.hidden[None], result.position_ids
            offset += n - keep
            n = keep
        offsets.append(offset)
        h = layer(h, attention_mask=causal_mask(h.shape[1], h.dtype, h.device), position_ids=positions[None],
                  past_key_values=cache, use_cache=True,
                  position_embeddings=rotary(h, positions[None]))
    kv_lengths = [cache.layers[i].keys.shape[2] for i in range(len(layers))]
    logits = lm_head(norm(h))[0, -1]
    tokens: list[int] = []
    position = inputs_embeds.shape[0]  # unpruned position of the next token
    for step in range(max_new_tokens):
        token = int(logits.float().argmax())
        tokens.append(token)
        if token in eos_token_ids or step == max_new_tokens - 1:
            break
        h = embed(torch.tensor([[token]], device=inputs_embeds.device)).to(inputs_embeds.dtype)
        for index, layer in enumerate(layers):
            pos = torch.tensor([[position - offsets[index]]], device=h.device)
            h = layer(h, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                      position_embeddings=rotary(h, pos))
        logits = lm_head(norm(h))[0, -1]
        position += 1
    return PioGeneration(tokens, records, kv_lengths, offsets)


def _chunk_mask(past: int, length: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive mask [1, 1, T, P+T] of ``length`` new positions after ``past`` cached ones (causal)."""
    q = torch.arange(length, device=device)[:, None] + past
    k = torch.arange(past + length, device=device)[None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(k <= q, zero, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def pio_teacher_forced_logits(language_model: nn.Module, lm_head: nn.Module, inputs_embeds: torch.Tensor,
                              image_span: tuple[int, int], schedule: PioSchedule, continuation: list[int], *,
                              embed_tokens: nn.Module | None = None, tau: float = TAU) -> torch.Tensor:
    """Next-token logits [T, V] of one unpadded prompt pruned by ``schedule``, teacher-forced on
    ``continuation`` (T tokens): row ``t`` is the distribution of token ``t`` given the prompt and
    ``continuation[:t]``.

    The prefill is `pio_generate_reference`'s (transformers' layers, autograd saliency at each
    stage); the continuation then runs as one chunk through the per-layer caches, each layer at
    its own position offset (spec section 8). Pruning fidelity (``fsr-compare``) compares these
    with the unpruned model's logits step by step.
    """
    from transformers import DynamicCache

    layers, norm, rotary = language_model.layers, language_model.norm, language_model.rotary_emb
    embed = embed_tokens if embed_tokens is not None else language_model.embed_tokens
    s0, n = image_span
    schedule.validate(num_layers=len(layers), num_visual=n)
    stages = {st.layer: st.keep for st in schedule.stages}
    cache = DynamicCache(config=language_model.config)
    h = inputs_embeds[None]
    positions = torch.arange(h.shape[1], device=h.device)
    offsets, offset = [], 0
    for index, layer in enumerate(layers):
        if index in stages:
            result = pio_stage_reference(PioProxy(layer, norm, lm_head, rotary, index), h[0], positions, (s0, n),
                                         stages[index], tau=tau)
            h, positions = result.hidden[None], result.position_ids
            offset += n - stages[index]
            n = stages[index]
        offsets.append(offset)
        h = layer(h, attention_mask=causal_mask(h.shape[1], h.dtype, h.device), position_ids=positions[None],
                  past_key_values=cache, use_cache=True, position_embeddings=rotary(h, positions[None]))
    logits = [lm_head(norm(h))[0, -1:]]
    fed = list(continuation[:-1])
    if fed:
        h = embed(torch.tensor([fed], device=inputs_embeds.device)).to(inputs_embeds.dtype)
        start = inputs_embeds.shape[0]  # unpruned position of the first fed token
        for index, layer in enumerate(layers):
            past = cache.layers[index].keys.shape[2]
            pos = torch.arange(start, start + len(fed), device=h.device)[None] - offsets[index]
            h = layer(h, attention_mask=_chunk_mask(past, len(fed), h.dtype, h.device), position_ids=pos,
                      past_key_values=cache, use_cache=True, position_embeddings=rotary(h, pos))
        logits.append(lm_head(norm(h))[0])
    return torch.cat(logits)[: len(continuation)]


class PioStageReference(nn.Module):
    """The pruning graph's batched contract (`pio_fvlm_fixed.PioPruningStage`'s inputs and outputs)
    computed by the readable reference, each row alone and unpadded (`pio_stage_reference`:
    autograd saliency, the two-pass NMS). Rows must be left-padded (the mask 0 then 1)."""

    def __init__(self, proxy: PioProxy, *, num_visual: int, keep: int, tau: float = TAU, k_pos: int = K_POS):
        super().__init__()
        self.proxy, self.num_visual, self.keep, self.tau, self.k_pos = proxy, num_visual, keep, tau, k_pos

    def forward(self, hidden_states, attention_mask, position_ids, image_start):
        with torch.inference_mode(False):  # autograd inside, whatever mode the caller runs in
            hidden_states, attention_mask, position_ids, image_start = (
                t.clone() for t in (hidden_states, attention_mask, position_ids, image_start))
            return self._forward(hidden_states, attention_mask, position_ids, image_start)

    def _forward(self, hidden_states, attention_mask, position_ids, image_start):
        n, keep = self.num_visual, self.keep
        outs = [[], [], [], [], []]
        for b in range(hidden_states.shape[0]):
            pad = int((attention_mask[b] == 0).sum())
            if bool((attention_mask[b, pad:] == 0).any()):
                raise PioError(f"row {b} is not left-padded (its attention mask has zeros after ones)")
            start = int(image_start[b]) - pad
            result = pio_stage_reference(self.proxy, hidden_states[b, pad:], position_ids[b, pad:], (start, n), keep,
                                         tau=self.tau, k_pos=self.k_pos)
            outs[0].append(torch.cat([hidden_states[b, :pad], result.hidden]))
            outs[1].append(torch.cat([attention_mask[b, :pad], attention_mask.new_ones(result.hidden.shape[0])]))
            outs[2].append(torch.cat([position_ids[b, :pad], result.position_ids.to(position_ids.dtype)]))
            outs[3].append(result.kept_local)
            outs[4].append(result.saliency.to(torch.promote_types(hidden_states.dtype, torch.float32)))
        return tuple(torch.stack(o) for o in outs)
