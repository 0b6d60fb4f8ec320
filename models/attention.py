"""Fused decoder attention for ONNX Runtime: ``fsr::group_query_attention``.

The decoder graph exists in two forms with one contract (inputs ``inputs_embeds``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``; outputs ``logits`` /
hidden states and ``present.{i}.key/value``):

- **portable**: the Hugging Face layers as traced (plain ONNX ops; TensorRT builds it,
  Transformers.js runs it);
- **fused** (``DecoderStep(attention="fused")``): each layer's attention core is one
  ONNX Runtime ``com.microsoft.GroupQueryAttention`` node. Grouped KV heads stay unexpanded,
  the causal part of the mask is the op's, the padding part is one additive bias
  ``[B, 1, S, T]`` built once per step, and the op can update a preallocated KV buffer in
  place (ONNX Runtime's past/present buffer sharing: ``past_key`` and ``present_key`` bound
  to the same memory, of any capacity >= T).

How the fused form is traced: the model's own Hugging Face decoder layers run unchanged
(norms, projections, rotary embedding, MLP); only the attention function is swapped, through
transformers' ``AttentionInterface`` (registered here as ``FUSED_ATTENTION``), and the KV
cache object hands each layer's new keys and values to that function instead of
concatenating them. The function calls the custom op ``torch.ops.fsr.group_query_attention``,
which `gqa_translation_table` turns into the one ONNX Runtime node.

The op's semantics (eager implementation = readable reference; ONNX Runtime implements the
same): query ``[B, S, H*D]`` (rotary applied), key / value ``[B, S, Hkv*D]`` (the new
positions), past key / value ``[B, Hkv, L, D]`` whose first ``P = T - S`` positions are valid
(``L = P``: a plain cache; ``L >= T``: a buffer updated in place), attention bias
``[B, 1, S, T]`` (0 or the dtype's minimum: padding). Query ``i`` attends to keys
``0 .. P + i`` (causal) plus the bias; present = past with the new positions at ``P .. T-1``
(length ``max(T, L)``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers.modeling_utils import AttentionInterface

#: the name the fused attention function is registered under in transformers' AttentionInterface
FUSED_ATTENTION = "fsr_gqa"
#: the ONNX Runtime contrib op the fused form is made of
ORT_DOMAIN, GQA_OP = "com.microsoft", "GroupQueryAttention"


@torch.library.custom_op("fsr::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, attention_bias: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fsr.group_query_attention`` (see the module docstring): ``(output [B,S,H*D],
    present_key, present_value)``. Eager: the readable reference, in float32."""
    batch, seq, _ = query.shape
    total, capacity = attention_bias.shape[-1], past_key.shape[2]
    past = total - seq
    head_dim = query.shape[-1] // num_heads
    k = key.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    v = value.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    if capacity >= total:  # a buffer: the new positions written at P .. T-1
        present_key, present_value = past_key.clone(), past_value.clone()
        present_key[:, :, past:total] = k
        present_value[:, :, past:total] = v
    else:
        present_key = torch.cat([past_key[:, :, :past], k], dim=2)
        present_value = torch.cat([past_value[:, :, :past], v], dim=2)
    group = num_heads // kv_num_heads
    keys = present_key[:, :, :total].float().repeat_interleave(group, dim=1)
    values = present_value[:, :, :total].float().repeat_interleave(group, dim=1)
    q = query.view(batch, seq, num_heads, head_dim).transpose(1, 2).float()
    scores = (q @ keys.transpose(-1, -2)) * scale + attention_bias.float()
    q_pos = torch.arange(seq, device=query.device)[:, None] + past
    k_pos = torch.arange(total, device=query.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ values).to(query.dtype)
    return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), present_key, present_value


@group_query_attention.register_fake
def _group_query_attention_shapes(query, key, value, past_key, past_value, attention_bias, num_heads, kv_num_heads,
                                  scale):
    # traced as a plain cache (present = T positions); a bound buffer keeps its capacity at run time
    shape = (query.shape[0], kv_num_heads, attention_bias.shape[-1], past_key.shape[-1])
    return query.new_empty(query.shape), past_key.new_empty(shape), past_value.new_empty(shape)


class FusedCache:
    """What the fused decoder step passes to the Hugging Face layers as ``past_key_values``:
    ``update`` hands the new keys and values through unchanged (the op appends them to the
    past), and the attention function records each layer's present."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


def fused_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            fsr_cache: FusedCache | None = None, **kwargs):
    """The attention function registered as ``FUSED_ATTENTION``: query [B,H,S,D] and the new
    key/value [B,Hkv,S,D] (rotary applied) -> [B,S,H,D], via ``fsr::group_query_attention``."""
    if fsr_cache is None:
        raise RuntimeError(f"attention {FUSED_ATTENTION!r} runs only inside DecoderStep(attention='fused')")
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    past_key, past_value = fsr_cache.past[module.layer_idx]
    scale = float(scaling if scaling is not None else head_dim ** -0.5)
    out, present_key, present_value = torch.ops.fsr.group_query_attention(
        query.transpose(1, 2).reshape(batch, seq, heads * head_dim),
        key.transpose(1, 2).reshape(batch, seq, kv_heads * head_dim),
        value.transpose(1, 2).reshape(batch, seq, kv_heads * head_dim),
        past_key, past_value, attention_mask, heads, kv_heads, scale)
    fsr_cache.present[module.layer_idx] = (present_key, present_value)
    return out.view(batch, seq, heads, head_dim), None


AttentionInterface.register(FUSED_ATTENTION, fused_attention_forward)


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Run the layers built from ``config`` with attention function ``name``, then restore it."""
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def padding_bias(attention_mask: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] padding mask -> the additive bias [B, 1, S, T] (0 = attend, the dtype's minimum = padding)."""
    allowed = attention_mask[:, None, None, :].bool().expand(-1, 1, seq, -1)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# --------------------------------------------------------------------------- ONNX (lazy: onnxscript)


@functools.lru_cache(maxsize=1)
def _gqa_schema():
    """The part of ONNX Runtime's GroupQueryAttention signature the fused form uses (for onnxscript)."""
    import onnx  # noqa: PLC0415

    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional

    def param(name, kind, opt=False):
        return schema.FormalParameter(name, kind, param_option=optional) if opt else schema.FormalParameter(name, kind)

    inputs = [param("query", "T"), param("key", "T", True), param("value", "T", True), param("past_key", "T", True),
              param("past_value", "T", True), param("seqlens_k", "M"), param("total_sequence_length", "M"),
              param("cos_cache", "T", True), param("sin_cache", "T", True),
              param("position_ids", "tensor(int64)", True), param("attention_bias", "T", True)]
    outputs = [param("output", "T"), param("present_key", "T", True), param("present_value", "T", True)]
    return schema(GQA_OP, ORT_DOMAIN, 1, inputs=inputs, outputs=outputs,
                  type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                                    ("M", ["tensor(int32)"], "")],
                  attributes=[schema.Attribute("num_heads", schema.AttrType.INT, ""),
                              schema.Attribute("kv_num_heads", schema.AttrType.INT, ""),
                              schema.Attribute("scale", schema.AttrType.FLOAT, "")])


def _translate_gqa(query, key, value, past_key, past_value, attention_bias, num_heads: int, kv_num_heads: int,
                   scale: float):
    """``fsr::group_query_attention`` -> ``com.microsoft.GroupQueryAttention``: every position up to T
    counts as a token (``seqlens_k = T - 1`` per row, ``total_sequence_length = T``, T from the bias);
    padding is masked by the bias."""
    from onnx import TensorProto  # noqa: PLC0415
    from onnxscript import opset18 as op  # noqa: PLC0415
    from onnxscript.values import Op, Opset  # noqa: PLC0415

    total = op.Shape(attention_bias, start=3, end=4)  # [1] int64
    batch = op.Shape(query, start=0, end=1)
    seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=TensorProto.INT32)
    total_length = op.Cast(op.Squeeze(total), to=TensorProto.INT32)
    gqa = Op(Opset(ORT_DOMAIN, 1), GQA_OP, op_schema=_gqa_schema())
    return gqa(query, key, value, past_key, past_value, seqlens_k, total_length, None, None, None, attention_bias,
               num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale)


def gqa_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` of a fused decoder step."""
    return {torch.ops.fsr.group_query_attention.default: _translate_gqa}
