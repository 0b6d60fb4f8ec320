"""Analytic work of each stage: FLOPs and bytes moved, counted from the model's dimensions.

Counts are of the dense matrix products the exported graphs execute (a multiply-add is
2 FLOPs); norms, softmax, rotary embeddings and other element-wise work are left out
(a few percent at most). Conventions, so that measured and ideal figures line up:

- prefill runs every prompt position through every layer; attention is causal: query ``i``
  of ``S`` new positions scores and weights ``P + i + 1`` keys (``S·P + S(S+1)/2`` pairs,
  the work causal attention needs; ONNX Runtime's fused attention skips the masked part,
  the portable graph computes the dense ``S x (P + S)`` matrix), with grouped-query
  attention: ``num_heads`` query heads, ``num_kv_heads`` key/value heads;
- the decoder returns the last position's logits (``logits [B, 1, V]``), so ``lm_head`` is
  counted for one position per row;
- bytes of prefill = decoder weights read once (layers, final norm, ``lm_head``) +
  the KV cache written; activations are assumed to stay in cache;
- a decode step reads every weight and the whole KV cache once (that is what bounds it).
"""

from __future__ import annotations

from fsr.manifest import LLMDims, VisionDims  # noqa: F401 (the dims analytic counts read)

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def layer_weights(d: LLMDims) -> int:
    """Weight elements of one decoder layer (q, k, v, o, gate/up/down, two norms)."""
    h, q, kv = d.hidden_size, d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    return h * q + 2 * h * kv + q * h + 3 * h * d.intermediate_size + 2 * h


def decoder_weights(d: LLMDims) -> int:
    """Weight elements the decoder graph reads: layers, final norm, lm_head (not the embedding table)."""
    return d.num_layers * layer_weights(d) + d.hidden_size + d.hidden_size * d.vocab_size


def vision_weights(v: VisionDims) -> int:
    """Weight elements of the vision tower up to its feature layer, and the projector."""
    h, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    return (3 * p * p * h + v.layers_used * (4 * h * h + 2 * h * i)
            + h * v.projector_out + v.projector_out * v.projector_out)


def prefill_flops(d: LLMDims, batch: int, seq: int, past: int = 0, logits: int = 1, *, layers: int | None = None,
                  lm_head: bool = True) -> dict[str, int]:
    """FLOPs of one prefill (or decode, ``seq=1``) step over ``seq`` new positions after ``past``
    (``layers`` of the LLM's layers, default all), with the LM head over the last ``logits``
    positions (none without ``lm_head``)."""
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    tokens = batch * seq
    pairs = seq * past + seq * (seq + 1) // 2  # causal: query i sees past + i + 1 keys
    per_layer = {
        "attention_projections": 2 * tokens * (d.hidden_size * q + 2 * d.hidden_size * kv + q * d.hidden_size),
        # scores Q K^T and the weighted sum P V, every query head over its causal keys
        "attention_scores": 2 * 2 * batch * d.num_heads * pairs * d.head_dim,
        "mlp": 2 * tokens * 3 * d.hidden_size * d.intermediate_size,
    }
    out = {k: v * (d.num_layers if layers is None else layers) for k, v in per_layer.items()}
    out["lm_head"] = 2 * batch * min(logits, seq) * d.hidden_size * d.vocab_size if lm_head else 0
    out["total"] = sum(out.values())
    return out


def kv_cache_bytes(d: LLMDims, batch: int, seq: int, dtype: str, layers: int | None = None) -> int:
    """Bytes of the KV cache holding ``seq`` positions: keys and values, every layer (or ``layers``)."""
    return 2 * (d.num_layers if layers is None else layers) * batch * d.num_kv_heads * seq * d.head_dim * \
        DTYPE_BYTES[dtype]


# -- a decoder cut into segments with image tokens dropped between them (pruning inside the LLM) ----


def segment_lengths(seq: int, image_tokens: int, segments: list[dict]) -> list[int]:
    """Prefill length of each decoder segment: ``seq`` (with ``image_tokens`` image tokens) minus the image
    tokens pruned before it (``segments``: the manifest's, with ``layers`` and ``image_tokens``)."""
    return [seq - image_tokens + (s.get("image_tokens") or image_tokens) for s in segments]


def segmented_prefill_flops(d: LLMDims, batch: int, seq: int, image_tokens: int, segments: list[dict]) -> dict:
    """`prefill_flops` summed over the segments, each over its own length (the LM head once)."""
    out: dict[str, int] = {}
    lengths = segment_lengths(seq, image_tokens, segments)
    for i, (s, length) in enumerate(zip(segments, lengths)):
        part = prefill_flops(d, batch, length, layers=s["layers"][1] - s["layers"][0], lm_head=i == len(segments) - 1)
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def llm_pruning_flops(d: LLMDims, batch: int, seq: int, num_visual: int, keep: int, supervised: int = 4) -> int:
    """A pruning graph between decoder segments, as PIO-FVLM's closed form computes it: the proxy layer's
    keys and values over the ``seq`` positions and their VJP (4 products of ``seq x D x kv``), the
    ``supervised`` rows through queries, attention, output projection, MLP and LM head and back (twice
    the forward), then the NMS: the ``n x n`` cosine Gram matrix and ``keep`` steps of a ``1 x n x n``
    product."""
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    keys_values = 4 * 2 * seq * d.hidden_size * kv
    rows = supervised * (d.hidden_size * q + q * d.hidden_size + 3 * d.hidden_size * d.intermediate_size
                         + d.hidden_size * d.vocab_size)
    attention = 2 * 2 * supervised * d.num_heads * seq * d.head_dim
    nms = 2 * num_visual * num_visual * d.hidden_size + 2 * keep * num_visual * num_visual
    return batch * (keys_values + 2 * 2 * rows + 2 * attention + nms)


def llm_pruning_bytes(d: LLMDims, batch: int, seq: int, dtype: str) -> int:
    """The proxy layer's and the LM head's weights read, the hidden states read and written."""
    e = DTYPE_BYTES[dtype]
    return (layer_weights(d) + d.hidden_size * d.vocab_size) * e + 2 * batch * seq * d.hidden_size * e


def segmented_kv_cache_bytes(d: LLMDims, batch: int, seq: int, image_tokens: int, segments: list[dict],
                             dtype: str) -> list[int]:
    """KV-cache bytes of each segment after a prefill of ``seq`` positions."""
    return [kv_cache_bytes(d, batch, length, dtype, layers=s["layers"][1] - s["layers"][0])
            for s, length in zip(segments, segment_lengths(seq, image_tokens, segments))]


def segmented_decode_step(d: LLMDims, batch: int, context: int, image_tokens: int, segments: list[dict],
                          dtype: str) -> tuple[int, int]:
    """(FLOPs, bytes) of one decode step with ``context`` unpruned positions, each segment attending to
    its own (shorter) cache."""
    flops = 0
    kv = 0
    for i, (s, length) in enumerate(zip(segments, segment_lengths(context, image_tokens, segments))):
        layers = s["layers"][1] - s["layers"][0]
        flops += prefill_flops(d, batch, 1, past=length - 1, layers=layers, lm_head=i == len(segments) - 1)["total"]
        kv += kv_cache_bytes(d, batch, length, dtype, layers=layers)
    return flops, decoder_weights(d) * DTYPE_BYTES[dtype] + kv


def prefill_bytes(d: LLMDims, batch: int, seq: int, dtype: str) -> dict[str, int]:
    weights = decoder_weights(d) * DTYPE_BYTES[dtype]
    kv = kv_cache_bytes(d, batch, seq, dtype)
    return {"weights": weights, "kv_written": kv, "total": weights + kv}


def decode_step_flops(d: LLMDims, batch: int, context: int) -> int:
    """FLOPs of one decode step attending to ``context`` positions (the new one included)."""
    return prefill_flops(d, batch, 1, past=context - 1)["total"]


def decode_step_bytes(d: LLMDims, batch: int, context: int, dtype: str) -> int:
    """Weights read + the whole KV cache read (``context - 1`` past positions) + one position written."""
    return decoder_weights(d) * DTYPE_BYTES[dtype] + kv_cache_bytes(d, batch, context, dtype)


def vision_flops(v: VisionDims, batch: int) -> int:
    """Patch embedding, the encoder layers used (with [CLS]), and the two-layer projector."""
    n, h, i, p = v.tokens_per_crop, v.hidden_size, v.intermediate_size, v.patch_size
    t = n + 1
    per_layer = 2 * t * 4 * h * h + 2 * 2 * t * t * h + 2 * t * 2 * h * i
    embed = 2 * n * 3 * p * p * h
    projector = 2 * n * (h * v.projector_out + v.projector_out * v.projector_out)
    return batch * (embed + v.layers_used * per_layer + projector)


def vision_bytes(v: VisionDims, dtype: str) -> int:
    return vision_weights(v) * DTYPE_BYTES[dtype]


def fsr_op_flops(batch: int, num_tokens: int, token_dim: int, feature_dim: int, budget: int) -> int:
    """The op's matrix products: the cosine Gram matrix ``N x N x F`` and the ``K x N x D`` merge."""
    if budget >= num_tokens:
        return 0
    return batch * (2 * num_tokens * num_tokens * feature_dim + 2 * budget * num_tokens * token_dim)


def fsr_op_bytes(batch: int, num_tokens: int, token_dim: int, feature_dim: int, budget: int, dtype: str) -> int:
    """Inputs read and the pruned tokens written (the Gram matrix is assumed to stay on chip)."""
    if budget >= num_tokens:
        return 0
    e = DTYPE_BYTES[dtype]
    return batch * (num_tokens * (token_dim * e + feature_dim * e + 8) + budget * (token_dim * e + 8))
