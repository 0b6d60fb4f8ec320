"""LLaVA adapter: presets, loading, and the traceable parts the exporter needs.

The adapter wraps transformers' ``LlavaForConditionalGeneration`` and exposes the
pieces of it that become ONNX graphs:

- ``VisionPrefix``: pixels (+ instruction embedding) -> the four FSR inputs
  (``tokens``, ``features``, ``saliency``, ``relevance``), per ``fsr-op.md``.
- ``TokenEmbedding``: token ids -> LLM input embeddings.
- ``DecoderStep``: one graph for prefill and decode (embeddings, mask, positions,
  past key/values -> logits, present key/values), over a contiguous range of LLM
  layers so that a method that prunes inside the LLM can split the decoder.
- ``ClipTextEncoder``: instruction ids -> CLIP joint-space text embedding.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from fsr.errors import FsrError
from fsr.models.tokenizer import IMAGE, build_byte_tokenizer

CLIP_SUBFOLDER = "clip"  # CLIP model (text tower + projections) saved beside a preset
CLIP_MAX_TOKENS = 77


class ModelError(FsrError, ValueError):
    """A model could not be found or does not fit; the message says what to do."""


# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """Random-weight LLaVA-1.5 geometry: 336 px, patch 14, 576 image tokens."""

    name: str
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_mlp: int
    vocab_size: int
    clip_text_hidden: int
    clip_text_layers: int
    clip_text_heads: int
    projection_dim: int
    image_size: int = 336
    patch_size: int = 14
    max_positions: int = 4096
    description: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", 64, 4, 4, 128, 64, 2, 4, 2, 128, 261, 32, 2, 4, 32,
               description="tests and CI: seconds on a 2-core CPU"),
        Preset("small", 256, 6, 8, 1024, 512, 6, 8, 4, 1408, 261, 128, 2, 4, 128,
               description="CPU benchmarks: minutes on a 2-core CPU"),
        Preset("llava-1.5-7b", 1024, 24, 16, 4096, 4096, 32, 32, 32, 11008, 32064, 768, 12, 12, 768,
               description="the real LLaVA-1.5-7B dimensions (CLIP ViT-L/14-336 + Llama-7B), for GPUs"),
    ]
}


def _configs(p: Preset):
    from transformers import CLIPConfig, LlamaConfig, LlavaConfig

    vision = dict(
        hidden_size=p.vision_hidden, intermediate_size=p.vision_mlp,
        num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
        image_size=p.image_size, patch_size=p.patch_size, projection_dim=p.projection_dim,
        hidden_act="quick_gelu",
    )
    text_clip = dict(
        hidden_size=p.clip_text_hidden, intermediate_size=4 * p.clip_text_hidden,
        num_hidden_layers=p.clip_text_layers, num_attention_heads=p.clip_text_heads,
        vocab_size=p.vocab_size if p.vocab_size < 50000 else 49408, max_position_embeddings=CLIP_MAX_TOKENS,
        projection_dim=p.projection_dim, bos_token_id=0, eos_token_id=1, pad_token_id=3,
    )
    clip = CLIPConfig(text_config=text_clip, vision_config=vision, projection_dim=p.projection_dim)
    llama = LlamaConfig(
        hidden_size=p.text_hidden, intermediate_size=p.text_mlp, num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads, num_key_value_heads=p.text_kv_heads, vocab_size=p.vocab_size,
        max_position_embeddings=p.max_positions, bos_token_id=0, eos_token_id=1, pad_token_id=3,
        tie_word_embeddings=False,
    )
    tok = build_byte_tokenizer()
    llava = LlavaConfig(
        vision_config=clip.vision_config.to_dict() | {"model_type": "clip_vision_model"},
        text_config=llama.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return llava, clip


def build_processor(preset: Preset):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": preset.image_size},
        crop_size={"height": preset.image_size, "width": preset.image_size},
    )
    tokenizer = build_byte_tokenizer()
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=preset.patch_size,
        vision_feature_select_strategy="default", chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1, image_token=IMAGE,
    )


def build_preset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """Build a preset with random weights from ``seed``: (llava, clip, processor)."""
    from transformers import CLIPModel, LlavaForConditionalGeneration

    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    llava_cfg, clip_cfg = _configs(p)
    torch.manual_seed(seed)
    with torch.device(device):
        llava = LlavaForConditionalGeneration(llava_cfg).to(dtype).eval()
        clip = CLIPModel(clip_cfg).to(dtype).eval()
    # The LLaVA vision tower *is* the CLIP vision tower the relevance term comes from.
    clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    return llava, clip, build_processor(p)


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadedModel:
    llava: nn.Module
    processor: object
    clip: nn.Module | None  # CLIPModel whose vision tower is LLaVA's, for relevance
    source: str  # what the user asked for (preset name, path or hub id)
    path: str | None  # resolved local folder, None for a preset built in memory
    preset: str | None = None
    clip_tokenizer: object | None = None


def resolve_model_path(model: str) -> Path:
    """A local checkpoint folder, or a hub id resolved from the local HF cache only."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but holds no config.json: not a Hugging Face checkpoint")
        return path
    if path.exists():
        raise ModelError(f"{path} is a file; --model takes a checkpoint folder or a hub id")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model, local_files_only=True))
        except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            raise ModelError(
                f"model {model!r} is not a local folder and is not in the Hugging Face cache ({cache}); "
                "no network is used: download it where a network exists and pass its folder with --model"
            ) from exc
    raise ModelError(
        f"unknown model {model!r}: not a local folder, not a hub id (owner/name), "
        f"and not a preset ({', '.join(PRESETS)})"
    )


def load_model(model: str | None = None, *, clip: str | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a LLaVA checkpoint (path / cached hub id) or build a preset by name."""
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our CLIs show their own progress
    if model is None or model in PRESETS:
        name = model or "tiny"
        llava, clip_model, processor = build_preset(name, seed=seed, dtype=dtype)
        return LoadedModel(llava, processor, clip_model, source=f"preset:{name}", path=None, preset=name,
                           clip_tokenizer=build_byte_tokenizer(CLIP_MAX_TOKENS))
    path = resolve_model_path(model)
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    except Exception as exc:
        raise ModelError(f"{path} could not be loaded as a LLaVA checkpoint: {exc}") from exc
    processor = AutoProcessor.from_pretrained(path)
    clip_path = Path(clip) if clip else path / CLIP_SUBFOLDER
    clip_model = clip_tokenizer = None
    if clip is not None or clip_path.is_dir():
        from transformers import AutoTokenizer

        clip_path = resolve_model_path(str(clip_path))
        clip_model = CLIPModel.from_pretrained(clip_path, dtype=dtype).eval()
        clip_tokenizer = AutoTokenizer.from_pretrained(clip_path)
    return LoadedModel(llava, processor, clip_model, source=model, path=str(path), clip_tokenizer=clip_tokenizer)


def save_source(loaded: LoadedModel, folder: Path) -> None:
    """Write model + processor (+ CLIP) as a standard HF checkpoint loadable by transformers."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded.llava.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    if loaded.clip is not None:
        loaded.clip.save_pretrained(folder / CLIP_SUBFOLDER)
        loaded.clip_tokenizer.save_pretrained(folder / CLIP_SUBFOLDER)


# ----------------------------------------------------------------------------- traceable parts


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of a [B,N,E] with b [B,E] -> [B,N] (zero vectors give 0)."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a * b[:, None, :]).sum(-1)


class VisionPrefix(nn.Module):
    """Pixels and the instruction embedding -> ``tokens, features, saliency, relevance``.

    ``relevance`` is the CLIP joint-space cosine when a CLIP model is given
    (``visual_projection(post_layernorm(features))`` vs the text embedding), else the
    fallback: cosine between ``tokens`` and the mean LLM input embedding of the
    instruction tokens (``instruction_embeds`` then lives in the LLM space).
    """

    def __init__(self, llava: nn.Module, clip: nn.Module | None = None):
        super().__init__()
        cfg = llava.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise ModelError("FSR needs a single vision_feature_layer (multi-layer features are not supported)")
        if cfg.vision_feature_select_strategy != "default":
            raise ModelError("FSR needs vision_feature_select_strategy='default' (a [CLS] token to drop)")
        tower = llava.model.vision_tower
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        n_layers = len(tower.encoder.layers)
        # hidden_states[v] is the output of layer n_layers + v (hidden_states[0] = embeddings).
        self.layer_index = n_layers + cfg.vision_feature_layer
        if not 0 <= self.layer_index < n_layers:
            raise ModelError(f"vision_feature_layer {cfg.vision_feature_layer} does not select an encoder layer")
        self.layers = nn.ModuleList(tower.encoder.layers[: self.layer_index + 1])
        self.projector = llava.model.multi_modal_projector
        self.use_clip = clip is not None
        if clip is not None:
            self.post_layernorm = clip.vision_model.post_layernorm
            self.visual_projection = clip.visual_projection

    def cls_saliency(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[CLS]-row attention of ``layer`` (input ``hidden``), mean over heads, patch columns."""
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        b, n, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
        return probs.mean(dim=1)[:, 0, 1:]

    def forward(self, pixel_values: torch.Tensor, instruction_embeds: torch.Tensor):
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        saliency = None
        for i, layer in enumerate(self.layers):
            if i == self.layer_index:
                saliency = self.cls_saliency(layer, h)
            h = layer(h, None)
        features = h[:, 1:]
        tokens = self.projector(features)
        if self.use_clip:
            image_side = self.visual_projection(self.post_layernorm(features))
            relevance = _cosine(image_side.float(), instruction_embeds.float())
        else:
            relevance = _cosine(tokens.float(), instruction_embeds.float())
        return tokens, features, saliency, relevance


class TokenEmbedding(nn.Module):
    def __init__(self, llava: nn.Module):
        super().__init__()
        self.embed = llava.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class ClipTextEncoder(nn.Module):
    """Instruction ids [B,77] + mask -> CLIP joint-space text embedding [B,P]."""

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


class DecoderStep(nn.Module):
    """Layers ``[start, stop)`` of the LLM for one prefill or decode step.

    Inputs: ``inputs_embeds`` [B,S,H] (hidden states when ``start > 0``), ``attention_mask``
    [B,P+S], ``position_ids`` [B,S], then a key and a value [B,kvh,P,hd] per layer.
    Outputs: ``logits`` [B,S,V] (hidden states when ``stop`` < number of layers), then
    the present key and value per layer. Each layer's KV length is its own dynamic
    axis, so a method that drops image tokens after a layer can give later segments
    shorter caches (with their own mask).
    """

    def __init__(self, llava: nn.Module, start: int = 0, stop: int | None = None):
        super().__init__()
        lm = llava.model.language_model
        self.config = lm.config
        n = len(lm.layers)
        self.start, self.stop = start, n if stop is None else stop
        if not 0 <= self.start < self.stop <= n:
            raise ModelError(f"decoder layer range [{start}, {stop}) is outside the LLM's {n} layers")
        self.layers = nn.ModuleList(lm.layers[self.start:self.stop])
        self.rotary_emb = lm.rotary_emb
        self.is_last = self.stop == n
        if self.is_last:
            self.norm = lm.norm
            self.lm_head = llava.lm_head

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

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
        out = self.lm_head(self.norm(h)) if self.is_last else h
        presents = []
        for i in range(n):
            layer_cache = cache.layers[self.start + i]
            presents += [layer_cache.keys, layer_cache.values]
        return (out, *presents)


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
