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
import re

import torch
import torch.nn.functional as F
from torch import nn

from fsr.errors import FsrError

#: Number of supervised prompt positions of the proxy loss (``K_pos``, spec section 4).
K_POS = 4
#: Cosine threshold of the feature-space NMS (spec section 6).
TAU = 0.8
#: Floor of the feature norm in the NMS normalisation (``F.normalize``'s eps upstream).
NORM_EPS = 1e-12


class PioError(FsrError, ValueError):
    """A PIO-FVLM schedule, model or input that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class PioStage:
    """One pruning point: after decoder layer ``layer - 1`` keep ``keep`` visual tokens.

    ``layer`` is the spec's 1-based number ``r``; it is also the 0-based index of the proxy
    layer and of the first layer that sees the pruned sequence.
    """

    layer: int
    keep: int


@dataclasses.dataclass(frozen=True)
class PioSchedule:
    """Pruning stages in layer order, and the optional encoder-side stage ("w/ VE").

    ``encoder_tokens``: visual tokens left by the encoder-side stage (spec section 7), or
    None when the LLM receives every visual token.
    """

    stages: tuple[PioStage, ...]
    encoder_tokens: int | None = None

    def __post_init__(self):
        if not self.stages:
            raise PioError("a PIO-FVLM schedule needs at least one stage, e.g. '1:92,10:54,15:22'")
        for i, st in enumerate(self.stages):
            for what, value in (("layer", st.layer), ("token count", st.keep)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise PioError(
                        f"stage {i + 1}: the {what} must be an integer >= 1, got {value!r} "
                        "(layers are 1-based: '1:92' prunes after the first decoder layer)")
        for i, (a, b) in enumerate(zip(self.stages, self.stages[1:]), start=2):
            if b.layer <= a.layer:
                raise PioError(f"stage {i}: layer {b.layer} does not come after layer {a.layer}; "
                               "list the stages in increasing layer order, each layer once")
            if b.keep >= a.keep:
                raise PioError(f"stage {i}: keeps {b.keep} visual tokens but only {a.keep} enter it; "
                               "each stage must keep fewer tokens than the one before")
        e = self.encoder_tokens
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise PioError(f"the encoder-side token count must be an integer >= 1, got {e!r}")
        if e is not None and self.stages[0].keep >= e:
            raise PioError(f"stage 1 keeps {self.stages[0].keep} visual tokens but the encoder stage "
                           f"leaves only {e}; keep fewer in the LLM than the encoder passes in")

    @property
    def layers(self) -> tuple[int, ...]:
        """The 1-based layer numbers ``r`` (= 0-based decoder split indices)."""
        return tuple(st.layer for st in self.stages)

    def visual_tokens(self, num_visual: int) -> int:
        """Visual tokens that enter the LLM: ``encoder_tokens`` if set, else ``num_visual``."""
        return num_visual if self.encoder_tokens is None else self.encoder_tokens

    def validate(self, *, num_layers: int, num_visual: int) -> None:
        """Check the schedule against an LLM of ``num_layers`` layers and ``num_visual`` image tokens."""
        if self.encoder_tokens is not None and self.encoder_tokens >= num_visual:
            raise PioError(f"the encoder-side stage keeps {self.encoder_tokens} of {num_visual} image "
                           "tokens: it must keep fewer (omit it to give the LLM every token)")
        entering = self.visual_tokens(num_visual)
        if self.stages[0].keep >= entering:
            raise PioError(f"stage 1 keeps {self.stages[0].keep} visual tokens but only {entering} "
                           "enter the LLM; keep fewer")
        last = self.stages[-1].layer
        if last > num_layers - 1:
            raise PioError(
                f"layer {last} is out of range for an LLM with {num_layers} layers: a stage at layer r "
                f"needs decoder layer r (0-based) as its proxy, so r must be at most {num_layers - 1}")

    def token_counts(self, num_visual: int) -> list[tuple[int, int]]:
        """``(n, keep)`` per stage: visual tokens entering it and kept by it."""
        counts, n = [], self.visual_tokens(num_visual)
        for st in self.stages:
            counts.append((n, st.keep))
            n = st.keep
        return counts

    def tokens_per_layer(self, *, num_layers: int, num_visual: int) -> list[int]:
        """Visual tokens each decoder layer (0-based) sees."""
        self.validate(num_layers=num_layers, num_visual=num_visual)
        seen, n, stages = [], self.visual_tokens(num_visual), {st.layer: st.keep for st in self.stages}
        for layer in range(num_layers):
            n = stages.get(layer, n)
            seen.append(n)
        return seen

    def average(self, *, num_layers: int, num_visual: int) -> float:
        """Mean visual tokens per decoder layer, as the spec computes its budgets.

        LLaVA-1.5 (32 layers, 576 tokens): (576 + 9*92 + 5*54 + 17*22) / 32 = 64 for
        ``1:92,10:54,15:22``; w/ VE: (16*96 + 16*32) / 32 = 64.
        """
        seen = self.tokens_per_layer(num_layers=num_layers, num_visual=num_visual)
        return sum(seen) / num_layers

    def __str__(self) -> str:
        return ",".join(f"{st.layer}:{st.keep}" for st in self.stages)


_ITEM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pio_schedule(text: str, *, encoder_tokens: int | None = None) -> PioSchedule:
    """``"1:92,10:54,15:22"`` (1-based layer ``:`` visual tokens kept) -> `PioSchedule`.

    Raises `PioError` naming the bad item and the expected form.
    """
    if not isinstance(text, str) or not text.strip():
        raise PioError("empty PIO-FVLM schedule; give 'LAYER:TOKENS' items separated by commas, "
                       "e.g. --pio-schedule '1:92,10:54,15:22'")
    stages = []
    for i, item in enumerate(text.split(","), start=1):
        match = _ITEM.match(item)
        if match is None:
            raise PioError(f"schedule item {i} {item.strip()!r} is not 'LAYER:TOKENS' with two non-negative "
                           "integers (e.g. '10:54': after decoder layer 10, 1-based, keep 54 visual tokens)")
        layer, keep = int(match.group(1)), int(match.group(2))
        if layer == 0:
            raise PioError(f"schedule item {i} {item.strip()!r}: layers are 1-based, so 0 would prune before "
                           "the LLM; that is the encoder-side stage (--pio-encoder-tokens)")
        if keep == 0:
            raise PioError(f"schedule item {i} {item.strip()!r}: a stage must keep at least 1 visual token")
        stages.append(PioStage(layer, keep))
    return PioSchedule(tuple(stages), encoder_tokens=encoder_tokens)


#: LLaVA-1.5 schedules by average visual-token budget (32 layers, 576 tokens). 64 and 128 are
#: the spec's (the upstream code comment and eval scripts); 192 is **ours**: stage by stage
#: ``2 * s128 - s64`` (344 = 2*218 - 92, 202 = 2*128 - 54, 86 = 2*54 - 22), the linear
#: continuation of the two published schedules; the average is linear in the counts, so it is
#: exactly 2*128 - 64 = 192: (576 + 9*344 + 5*202 + 17*86) / 32 = 192.
LLAVA15_SCHEDULES: dict[int, PioSchedule] = {
    64: parse_pio_schedule("1:92,10:54,15:22"),
    128: parse_pio_schedule("1:218,10:128,15:54"),
    192: parse_pio_schedule("1:344,10:202,15:86"),
}

#: The upstream README's default LLaVA-1.5 configuration, w/ VE: 96 tokens from the encoder
#: stage, 32 kept after decoder layer 16 (1-based); average 64.
LLAVA15_VE_SCHEDULE_64 = parse_pio_schedule("16:32", encoder_tokens=96)


def llava15_schedule(budget: int) -> PioSchedule:
    """The LLaVA-1.5 schedule of average budget ``budget`` (64, 128 or 192)."""
    if budget not in LLAVA15_SCHEDULES:
        raise PioError(f"no PIO-FVLM schedule for average budget {budget!r}; choose one of "
                       f"{', '.join(map(str, LLAVA15_SCHEDULES))}, or give the stages with "
                       "--pio-schedule 'LAYER:TOKENS,...'")
    return LLAVA15_SCHEDULES[budget]


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

#: Upstream's attention layers for the encoder-side stage, 0-based among CLIP ViT-L/14-336's 24
#: layers: windowed local picks from layer 5, global picks from layer 22 (LLaVA-1.5's feature
#: layer, so the global map is FSR's saliency). Another tower depth needs its own choice.
VE_LOCAL_LAYER, VE_GLOBAL_LAYER = 5, 22
#: Windows per side of the patch grid for the local picks (4 x 4 = 16 windows of 6 x 6 on 24 x 24).
VE_WINDOWS = 4


def encoder_stage_counts(num_visual: int, keep: int, windows: int = VE_WINDOWS) -> tuple[int, int, int]:
    """``(grid side, local picks per window, global picks)`` of the encoder-side stage.

    ``nl = int(keep * 0.5)`` local tokens are asked for, ``nl // windows**2`` per window, and
    ``keep - nl`` global ones: ``windows**2 * (nl // windows**2) + keep - nl`` tokens are kept
    (``keep`` itself when ``windows**2`` divides ``nl``, e.g. 96 -> 16 * 3 + 48).
    """
    side = int(round(num_visual ** 0.5))
    if side * side != num_visual or side % windows:
        raise PioError(f"the encoder-side stage needs a square patch grid divisible into {windows} x {windows} "
                       f"windows; {num_visual} tokens are not one")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < num_visual:
        raise PioError(f"the encoder-side stage keeps an integer in [1, {num_visual - 1}] tokens, got {keep!r}")
    local = int(keep * 0.5)
    return side, local // (windows * windows), keep - local


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
