"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the family's spec.

Geometry: one 336x336 image -> a CLIP ViT tower with [CLS] (patch 14: 24x24 = 576 patch
tokens), the penultimate layer's patch features (``vision_feature_layer=-2``, strategy
``default``: [CLS] dropped) -> a two-layer MLP projector -> 576 image tokens in place of
the prompt's one ``<image>`` token; a Llama LLM with grouped-query attention; 1-D
positions. Instruction relevance comes from a CLIP text tower saved beside the model
(``source/clip``) when there is one.

Presets (random weights from a seed, real LLaVA-1.5 geometry): ``tiny`` (tests, CI),
``tiny-deep`` (16 LLM layers: tests of pruning inside the LLM at PIO-FVLM's layers 1, 10, 15),
``small`` (CPU benchmarks), ``small-deep`` (32 LLM layers like the 7B, small widths: CPU
benchmarks of pruning inside the LLM), ``llava-1.5-7b`` (the real 7B dimensions, for GPUs). They come
with a byte-level tokenizer built in code (``tokenizer.py``) with the LLaVA chat template.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, LlamaConfig, LlavaConfig,
    LlavaForConditionalGeneration, LlavaProcessor,
)

from fsr.manifest import VisionDims
from fsr.models.parts import VisionTower
from fsr.models.registry import ModelError, register_family, resolve_model_path
from fsr.models.spec import CLIP_RELEVANCE, LoadedModel, ModelSpec
from fsr.models.tokenizer import IMAGE, build_byte_tokenizer
from fsr.pruning.pio_schedule import VE_LOCAL_LAYER

VE_TOWER_LAYERS = 24  # CLIP ViT-L/14-336, where upstream PIO-FVLM picks its encoder-side layers

CLIP_SUBFOLDER = "clip"  # CLIP model (text tower + projections) saved beside a preset / in source/
CLIP_MAX_TOKENS = 77  # CLIP's text context


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
    #: std of the LLM's random weights (transformers' default 0.02 makes a deep random LLM repeat one
    #: token whatever its input; the deep presets use a larger one so that inputs change what it says)
    text_init: float = 0.02


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", 64, 4, 4, 128, 64, 2, 4, 2, 128, 261, 32, 2, 4, 32,
               description="tests and CI: seconds on a 2-core CPU"),
        Preset("tiny-deep", 64, 4, 4, 128, 64, 16, 4, 2, 128, 261, 32, 2, 4, 32, text_init=0.2,
               description="tests of in-LLM pruning: tiny widths, 16 LLM layers (PIO-FVLM's layers 1, 10, 15 fit)"),
        Preset("small", 256, 6, 8, 1024, 512, 6, 8, 4, 1408, 261, 128, 2, 4, 128,
               description="CPU benchmarks: minutes on a 2-core CPU"),
        Preset("small-deep", 256, 6, 8, 1024, 256, 32, 4, 2, 704, 261, 128, 2, 4, 128, text_init=0.1,
               description="CPU benchmarks of in-LLM pruning: 32 LLM layers like LLaVA-1.5-7B (the PIO-FVLM "
                           "schedules' average budgets hold exactly), small widths"),
        Preset("llava-1.5-7b", 1024, 24, 16, 4096, 4096, 32, 32, 32, 11008, 32064, 768, 12, 12, 768,
               description="the real LLaVA-1.5-7B dimensions (CLIP ViT-L/14-336 + Llama-7B), for GPUs"),
    ]
}


def preset_configs(p: Preset) -> tuple[LlavaConfig, CLIPConfig]:
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
        tie_word_embeddings=False, initializer_range=p.text_init,
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


def build_processor(preset: Preset) -> LlavaProcessor:
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


@register_family("llava")
class LlavaSpec(ModelSpec):
    presets = PRESETS
    model_class = LlavaForConditionalGeneration
    clip_subfolder = CLIP_SUBFOLDER
    clip_max_tokens = CLIP_MAX_TOKENS

    # -- loading ----------------------------------------------------------------------------

    def build_preset(self, name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: str = "cpu") -> LoadedModel:
        """Random weights from ``seed``; ``device="meta"`` builds the modules without weights."""
        if name not in self.presets:
            raise ModelError(f"unknown preset {name!r}; choose one of {', '.join(self.presets)}")
        p = self.presets[name]
        model_cfg, clip_cfg = self.preset_configs(p)
        torch.manual_seed(seed)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # parameters made in ``dtype`` directly (no fp32 copy first)
        try:
            with torch.device(device):
                model = self.model_class(model_cfg).to(dtype).eval()
                clip = CLIPModel(clip_cfg).to(dtype).eval()
        finally:
            torch.set_default_dtype(old)
        # The LLaVA vision tower *is* the CLIP vision tower the relevance term comes from.
        clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
        return LoadedModel(self.name, model, self.preset_processor(p), clip, source=f"preset:{name}", path=None,
                           preset=name, clip_tokenizer=build_byte_tokenizer(self.clip_max_tokens))

    def preset_configs(self, p: Preset):
        """The model's and the CLIP model's configs of preset ``p`` (a subclass: its own geometry)."""
        return preset_configs(p)

    def preset_processor(self, p: Preset):
        """The processor of preset ``p``."""
        return build_processor(p)

    def check_config(self, config: dict, path) -> None:
        vision = config.get("vision_config") or {}
        text = config.get("text_config") or {}
        if not isinstance(vision, dict) or not isinstance(text, dict) or not text:
            raise ModelError(f"{path}/config.json has no vision_config / text_config: not a LLaVA checkpoint")
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ModelError(f"{path}: the vision tower is {vision.get('model_type')!r}; the llava family exports a "
                             "CLIP vision tower with a [CLS] token")
        layer = config.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ModelError(f"{path}: vision_feature_layer is {layer!r}; pruning needs a single feature layer "
                             "(multi-layer features are not supported)")
        if config.get("vision_feature_select_strategy", "default") != "default":
            raise ModelError(f"{path}: vision_feature_select_strategy must be 'default' (a [CLS] token to drop)")

    def load_checkpoint(self, path, *, source: str, clip: str | None, dtype: torch.dtype) -> LoadedModel:
        try:
            model = self.model_class.from_pretrained(path, dtype=dtype).eval()
        except Exception as exc:
            raise ModelError(f"{path} could not be loaded as a {self.name} checkpoint: {exc}") from exc
        processor = AutoProcessor.from_pretrained(path)
        clip_path = Path(clip) if clip else Path(path) / CLIP_SUBFOLDER
        clip_model = clip_tokenizer = None
        if clip is not None or clip_path.is_dir():
            clip_path = resolve_model_path(str(clip_path))
            self.check_clip(clip_path)
            clip_model = CLIPModel.from_pretrained(clip_path, dtype=dtype).eval()
            clip_tokenizer = AutoTokenizer.from_pretrained(clip_path)
        return LoadedModel(self.name, model, processor, clip_model, source=source, path=str(path),
                           clip_tokenizer=clip_tokenizer)

    # -- dims -------------------------------------------------------------------------------

    def _layer_index(self, config) -> int:
        """Index of the encoder layer whose output feeds the projector."""
        n = config.vision_config.num_hidden_layers
        layer = config.vision_feature_layer
        index = n + layer if layer < 0 else layer - 1  # hidden_states[0] is the embeddings
        if not 0 <= index < n:
            raise ModelError(f"vision_feature_layer {layer} does not select an encoder layer")
        return index

    def _early_layer_index(self, config) -> int:
        """The early tower layer whose [CLS] attention is ``early_saliency``: upstream PIO-FVLM's layer
        5 of CLIP ViT-L's 24, at the same relative depth for another tower."""
        n = config.vision_config.num_hidden_layers
        return min(round(VE_LOCAL_LAYER * n / VE_TOWER_LAYERS), self._layer_index(config))

    def vision_dims(self, config) -> VisionDims:
        v = config.vision_config
        return VisionDims(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                          num_layers=v.num_hidden_layers, layers_used=self._layer_index(config) + 1,
                          num_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
                          tokens_per_crop=(v.image_size // v.patch_size) ** 2, has_cls=True,
                          projector_out=config.text_config.hidden_size)

    # -- other clients' layouts -------------------------------------------------------------

    supports_transformers_js = True

    def transformers_js_processor(self, loaded: LoadedModel, kept_tokens: int) -> dict:
        """Transformers.js's LlavaProcessor expands ``<image>`` to floor(H/patch_size)*floor(W/patch_size) +
        num_additional_image_tokens tokens (it ignores ``image_seq_length`` and the select strategy): one
        "patch" the size of the image plus K - 1 gives the K image tokens of this export's vision graph."""
        size = loaded.config.vision_config.image_size
        return {"processor_class": "LlavaProcessor", "image_token": self.image_token(loaded.processor),
                "patch_size": size, "num_additional_image_tokens": kept_tokens - 1,
                "vision_feature_select_strategy": loaded.config.vision_feature_select_strategy}

    # -- modules ----------------------------------------------------------------------------

    def vision_tower(self, loaded: LoadedModel, outputs: tuple[str, ...], relevance: str | None) -> VisionTower:
        model = loaded.model
        clip = loaded.clip if relevance == CLIP_RELEVANCE else None
        return VisionTower(model.model.vision_tower, model.model.multi_modal_projector,
                           self._layer_index(loaded.config), outputs, clip,
                           early_layer_index=self._early_layer_index(loaded.config)).eval()

    def projector(self, loaded: LoadedModel) -> nn.Module:
        return loaded.model.model.multi_modal_projector

    def vision_example_inputs(self, loaded: LoadedModel, input_names: list[str], relevance: str | None,
                              dtype: torch.dtype) -> tuple:
        size = loaded.config.vision_config.image_size
        pixels = torch.randn(2, 3, size, size, dtype=dtype)  # batch 2: batch 1 would fix the batch to 1
        if "instruction_embeds" not in input_names:
            return (pixels,)
        return pixels, torch.randn(2, self.relevance_width(loaded, relevance), dtype=dtype)
