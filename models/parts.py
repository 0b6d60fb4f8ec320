"""Traceable PyTorch building blocks shared by the model families.

Each becomes (part of) an exported graph; the runtime's PyTorch back end and the
comparisons' reference run the very same modules:

- `VisionTower`: pixels (+ instruction embedding) -> named outputs a pruning method reads
  (``tokens``, ``features``, ``saliency``, ``relevance``, ``early_saliency``,
  ``hidden_states``, ``cls_attention``, ``keys``; see ``VISION_OUTPUTS``), for a CLIP-style
  tower with a [CLS] token and a projector;
- `VisionWithMethod`: the tower, a method's op, and the projector when the op runs before it;
- `TokenEmbedding`, `ClipTextEncoder`;
- `DecoderStep`: a contiguous range of decoder layers for one prefill or decode step
  (embeddings, mask, positions, past key/values -> logits or hidden states, present key/values).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from fsr.pruning.visionzip import clip_layer_visionzip_inputs

#: Named vision-tower outputs a family can provide to a pruning method (per crop row):
#: ``tokens`` [B,N,H] projector outputs; ``features`` [B,N,F] the patch features that feed
#: the projector; ``saliency`` [B,N] the [CLS]-row attention of the feature layer, mean over
#: heads, patch columns; ``relevance`` [B,N] cosine with the instruction embedding
#: (``instruction_embeds`` [B,E], an extra graph input); ``early_saliency`` [B,N] the same [CLS]-row
#: attention of an early layer (the family's choice; PIO-FVLM's encoder-side stage, its local map);
#: and the feature layer seen with its [CLS] token (VisionZip), ``T = 1 + N`` rows, row 0 = [CLS]:
#: ``hidden_states`` [B,T,F] the layer's output (``features`` = its rows 1..N), ``cls_attention``
#: [B,T] float32 the [CLS] query's softmax attention in that layer summed over heads (every
#: column), ``keys`` [B,T,head_dim] float32 that layer's keys (with bias), mean over heads.
VISION_OUTPUTS = ("tokens", "features", "saliency", "relevance", "early_saliency", "hidden_states", "cls_attention",
                  "keys")
#: the outputs read from the feature layer with its [CLS] row (`clip_layer_visionzip_inputs`)
LAYER_OUTPUTS = ("hidden_states", "cls_attention", "keys")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of a [B,N,E] with b [B,E] -> [B,N] (zero vectors give 0)."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a * b[:, None, :]).sum(-1)


class VisionTower(nn.Module):
    """A CLIP-style vision tower with [CLS] up to its feature layer, then the projector.

    ``forward(pixel_values[, instruction_embeds])`` returns the outputs named in
    ``outputs`` (a subset of ``VISION_OUTPUTS``, in that order); ``instruction_embeds`` is
    an input only when ``relevance`` is asked for. ``relevance`` is the CLIP joint-space
    cosine when ``clip`` (a ``CLIPModel``) is given (``visual_projection(post_layernorm(
    features))`` vs the text embedding), else the fallback: cosine between ``tokens`` and
    the mean LLM input embedding of the instruction.
    """

    def __init__(self, tower: nn.Module, projector: nn.Module, layer_index: int, outputs: tuple[str, ...],
                 clip: nn.Module | None = None, early_layer_index: int | None = None):
        super().__init__()
        unknown = [o for o in outputs if o not in VISION_OUTPUTS]
        if unknown:
            raise ValueError(f"unknown vision output(s) {unknown}; known: {', '.join(VISION_OUTPUTS)}")
        self.outputs = tuple(o for o in VISION_OUTPUTS if o in outputs)
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layer_index = layer_index
        self.early_layer_index = early_layer_index
        if "early_saliency" in self.outputs and not (early_layer_index is not None
                                                     and 0 <= early_layer_index <= layer_index):
            raise ValueError(f"early_saliency needs an early layer index in [0, {layer_index}], got {early_layer_index}")
        self.layers = nn.ModuleList(tower.encoder.layers[: layer_index + 1])
        self.projector = projector
        self.use_clip = clip is not None
        if clip is not None:
            self.post_layernorm = clip.vision_model.post_layernorm
            self.visual_projection = clip.visual_projection

    @property
    def input_names(self) -> list[str]:
        return ["pixel_values"] + (["instruction_embeds"] if "relevance" in self.outputs else [])

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    def cls_saliency(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[CLS]-row attention of ``layer`` (input ``hidden``), mean over heads, patch columns."""
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        b, n, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
        return probs.mean(dim=1)[:, 0, 1:]

    def forward(self, pixel_values: torch.Tensor, instruction_embeds: torch.Tensor | None = None):
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        out = {}
        for i, layer in enumerate(self.layers):
            if i == self.layer_index and "saliency" in self.outputs:
                out["saliency"] = self.cls_saliency(layer, h)
            if i == self.early_layer_index and "early_saliency" in self.outputs:
                out["early_saliency"] = self.cls_saliency(layer, h)
            if i == self.layer_index and any(o in self.outputs for o in LAYER_OUTPUTS):
                out.update(zip(LAYER_OUTPUTS, clip_layer_visionzip_inputs(layer, h)))
                h = out["hidden_states"]  # the layer's own output: the same as layer(h)
            else:
                h = layer(h, None)
        features = h[:, 1:]
        out["features"] = features
        if "tokens" in self.outputs or ("relevance" in self.outputs and not self.use_clip):
            out["tokens"] = self.projector(features)
        if "relevance" in self.outputs:
            if self.use_clip:
                image_side = self.visual_projection(self.post_layernorm(features))
                out["relevance"] = cosine(image_side.float(), instruction_embeds.float())
            else:
                out["relevance"] = cosine(out["tokens"].float(), instruction_embeds.float())
        result = tuple(out[name] for name in self.outputs)
        return result[0] if len(result) == 1 else result


class VisionWithMethod(nn.Module):
    """The whole vision graph as PyTorch: tower outputs -> the method's op (-> projector).

    ``op`` takes the tower's outputs positionally and returns ``(pruned, kept_indices)``
    (or the tokens alone); with ``projector`` (a method placed before the projector) the
    pruned features go through it. ``num_inputs``: how many of the tower's outputs the op takes
    (the first ones; None: all), the rest being a family's own (NeXT's ``image_newline``).
    """

    def __init__(self, tower: VisionTower, op: nn.Module, projector: nn.Module | None = None,
                 num_inputs: int | None = None):
        super().__init__()
        self.tower, self.op, self.projector = tower, op, projector
        self.num_inputs = num_inputs

    def forward(self, *inputs: torch.Tensor):
        outs = self.tower(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        result = self.op(*outs[:self.num_inputs])  # a family's own outputs after them (NeXT's newline): not the op's
        if self.projector is not None:
            if isinstance(result, tuple):
                return (self.projector(result[0]), *result[1:])
            return self.projector(result)
        return result


class OpInputs(nn.Module):
    """Its inputs as its outputs: traced, it is the graph a method's op is spliced into when the op
    runs alone (rows the host gathered; `fsr.models.spec.ModelSpec.prune_graph`)."""

    def forward(self, *inputs: torch.Tensor):
        return tuple(x + 0 if x.is_floating_point() else x for x in inputs)


class TokenEmbedding(nn.Module):
    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embed = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class ClipTextEncoder(nn.Module):
    """Instruction ids [B,T] + mask -> CLIP joint-space text embedding [B,P]."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(out.pooler_output)


def past_names(layers: range) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]


def present_names(layers: range) -> list[str]:
    return [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]


#: the decoder step's optional input: indices of the positions whose logits are returned (default: the last)
LOGITS_INDEX = "logits_index"
#: attention forms of the decoder step (see `fsr.models.attention`)
PORTABLE, FUSED = "portable", "fused"


class DecoderStep(nn.Module):
    """Layers ``[start, stop)`` of a Hugging Face decoder LM for one prefill or decode step.

    Inputs: ``inputs_embeds`` [B,S,H] (hidden states when ``start > 0``), ``attention_mask``
    [B,P+S], ``position_ids`` [B,S], then a key and a value [B,kvh,P,hd] per layer.
    Outputs: ``logits`` [B,K,V] (hidden states [B,S,H] when ``stop`` < number of layers), then
    the present key and value per layer. Each layer's KV length is its own dynamic
    axis, so a method that drops image tokens after a layer can give later segments
    shorter caches (with their own mask).

    Logits are computed for the last position only (K = 1: what greedy decoding reads; the
    LM head over every prompt position would cost as much as a layer) unless ``logits_index``
    [K] names the positions (negative counts from the end; ``arange(S)``: all of them). In
    the exported graph ``logits_index`` is an input with a default value ([-1]): ONNX Runtime
    lists it as an overridable initializer, so callers that do not know it (Transformers.js)
    never feed it, and TensorRT folds it as a constant.

    ``attention``: ``"portable"`` (the model's own attention, plain ONNX ops once traced) or
    ``"fused"`` (one ONNX Runtime GroupQueryAttention per layer, KV heads unexpanded, KV
    buffers updatable in place; `fsr.models.attention`). Same inputs, outputs and weights.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, start: int = 0, stop: int | None = None,
                 attention: str = PORTABLE):
        super().__init__()
        lm = language_model
        self.config = lm.config
        n = len(lm.layers)
        self.start, self.stop = start, n if stop is None else stop
        if not 0 <= self.start < self.stop <= n:
            raise ValueError(f"decoder layer range [{start}, {stop}) is outside the LLM's {n} layers")
        if attention not in (PORTABLE, FUSED):
            raise ValueError(f"unknown decoder attention form {attention!r}; choose {PORTABLE} or {FUSED}")
        self.attention = attention
        self.layers = nn.ModuleList(lm.layers[self.start:self.stop])
        self.rotary_emb = lm.rotary_emb
        self.is_last = self.stop == n
        if self.is_last:
            self.norm = lm.norm
            self.lm_head = lm_head

    @property
    def input_names(self) -> list[str]:
        first = "inputs_embeds" if self.start == 0 else "hidden_states"
        return [first, "attention_mask", "position_ids", *past_names(range(self.start, self.stop))]

    @property
    def optional_input_names(self) -> list[str]:
        """Inputs with a default (fed only to change it): ``logits_index`` on the last segment."""
        return [LOGITS_INDEX] if self.is_last else []

    @property
    def output_names(self) -> list[str]:
        return ["logits" if self.is_last else "hidden_states_out", *present_names(range(self.start, self.stop))]

    def forward(self, inputs_embeds, attention_mask, position_ids, *past, logits_index=None):
        layers = self._fused if self.attention == FUSED else self._portable
        h, presents = layers(inputs_embeds, attention_mask, position_ids, past)
        if not self.is_last:
            return (h, *presents)
        h = h[:, -1:] if logits_index is None else h[:, logits_index]
        return (self.lm_head(self.norm(h)), *presents)

    def _portable(self, inputs_embeds, attention_mask, position_ids, past):
        n = len(self.layers)
        cache = DynamicCache(config=self.config)
        for i in range(n):  # cache slots are the LLM's global layer indices
            cache.update(past[2 * i], past[2 * i + 1], self.start + i)
        h = inputs_embeds
        mask = causal_additive_mask(attention_mask, h.shape[1], past[0].shape[2], h.dtype)
        cache_position = torch.arange(h.shape[1], device=h.device) + past[0].shape[2]
        cos_sin = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                      use_cache=True, cache_position=cache_position, position_embeddings=cos_sin)
        presents = []
        for i in range(n):
            layer_cache = cache.layers[self.start + i]
            presents += [layer_cache.keys, layer_cache.values]
        return h, presents

    def _fused(self, inputs_embeds, attention_mask, position_ids, past):
        from fsr.models.attention import FUSED_ATTENTION, FusedCache, attention_implementation, padding_bias

        n = len(self.layers)
        cache = FusedCache({self.start + i: (past[2 * i], past[2 * i + 1]) for i in range(n)})
        h = inputs_embeds
        bias = padding_bias(attention_mask, h.shape[1], h.dtype)  # causality is the op's own
        cos_sin = self.rotary_emb(h, position_ids)
        with attention_implementation(self.config, FUSED_ATTENTION):
            for layer in self.layers:
                h = layer(h, attention_mask=bias, position_ids=position_ids, past_key_values=cache, use_cache=True,
                          position_embeddings=cos_sin, fsr_cache=cache)
        presents = []
        for i in range(n):
            presents += list(cache.present[self.start + i])
        return h, presents


def causal_additive_mask(attention_mask: torch.Tensor, q_len: int, past_len, dtype) -> torch.Tensor:
    """[B,P+S] padding mask -> additive [B,1,S,P+S] mask (0 = attend, dtype min = masked).

    A finite minimum keeps fully masked rows (left padding) finite instead of NaN, so
    padded positions never poison the cache.
    """
    kv_len = attention_mask.shape[1]
    q_pos = torch.arange(q_len, device=attention_mask.device)[:, None] + past_len
    k_pos = torch.arange(kv_len, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
