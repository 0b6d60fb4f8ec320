"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "anyres"): the family's spec.

Geometry: an image is resized into the best of the ``image_grid_pinpoints`` resolutions
(LLaVA-v1.6: 336x672, 672x336, 672x672, 1008x336, 336x1008), cut into 336 px tiles, and a
base crop (the whole image at 336x336) comes first: 3, 4 or 5 crops, each through the
CLIP ViT tower with [CLS] (patch 14: 24x24 = 576 patch tokens, penultimate layer, [CLS]
dropped) and the two-layer MLP projector. The tiles' features are stitched into one grid,
*unpadded* (the rows or columns that only cover the letterbox padding are removed, from the
image's original size) and every grid row ends with the learned ``image_newline`` token:
base crop (576) + unpadded grid + one newline per grid row. Up to 2,928 image tokens.

The vision graph runs one row per crop (rows of one image and of several images in one
call; the number of crops varies with the image's aspect ratio) and returns the tower's
outputs per crop plus the newline embedding; the host stitches, unpads and inserts newlines
(`LlavaNextSpec.image_features`), exactly as Hugging Face's ``pack_image_features`` does.

Pruning (``fsr-op.md``, "Other model families"): the features are unpadded first; then the
method's op runs on the host-gathered rows through the export's ``prune_b<budget>`` graphs
(one op node each, dynamic N):

- ``crop`` scope (default): one op row per crop (base and each tile; N = the crop's
  tokens left after unpadding), budget = the image's total split over its crops (the first
  ``total mod crops`` crops get one more, so the kept tokens add up to the total);
- ``image`` scope: one op row per image over all its crops (base raster order, then the
  stitched grid's raster order), budget = the total.

The kept tokens keep Hugging Face's layout: base crop first in raster order, then the kept
grid tokens in the stitched grid's raster order, each grid row followed by its newline
(a row that lost all its tokens keeps its newline alone): kept tokens + one newline per row.
``kept_indices[b]`` per image: a list of per-crop arrays of patch indices (0..575 in the
crop's own 24x24 raster) for the crop scope, one array of indices into the image's
concatenated (base, grid) token list for the image scope.

A method that prunes each crop as the tower gives it (``multi_crop = PER_CROP``: VisionZip,
the method spec's section 5) runs in the vision graph instead, on every crop row (tower, op,
projector, as for LLaVA-1.5; no prune graphs, no newline output), with a budget **per crop**:
an image of n crops reaches the LLM with n times the per-crop tokens. The host lays each image
out through the method's ``arrange_crops`` (`CropPruning`), giving it the base crop, the
tiles and where each tile's patches sit on the stitched grid (`LlavaNextSpec.tile_positions`);
``kept_indices[b]`` is then one array per crop, the op's rows of that crop.

Presets (random weights from a seed, real LLaVA-NeXT geometry): ``tiny`` (tests, CI),
``small`` (CPU benchmarks), ``llava-v1.6-7b`` (the real dimensions: CLIP ViT-L/14-336 +
Vicuna-7B, for GPUs).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn
from transformers import (
    LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.image_processing_utils import select_best_resolution

from fsr.models.llava import CLIP_MAX_TOKENS, CLIP_SUBFOLDER, LlavaSpec, Preset, preset_configs
from fsr.models.parts import VisionTower
from fsr.models.registry import ModelError, register_family
from fsr.models.spec import CLIP_RELEVANCE, CropPruning, ImageFeatures, LoadedModel, VisionBatch
from fsr.models.tokenizer import IMAGE, build_byte_tokenizer

#: LLaVA-v1.6's anyres resolutions (height, width): up to 672x672, and 1:3 / 3:1
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CROP, IMAGE_SCOPE = "crop", "image"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", 64, 4, 4, 128, 64, 2, 4, 2, 128, 261, 32, 2, 4, 32,
               description="tests and CI: seconds on a 2-core CPU"),
        Preset("small", 128, 4, 4, 512, 256, 4, 8, 4, 704, 261, 64, 2, 4, 64,
               description="CPU benchmarks: a minute on a 2-core CPU"),
        Preset("llava-v1.6-7b", 1024, 24, 16, 4096, 4096, 32, 32, 32, 11008, 32064, 768, 12, 12, 768,
               description="the real LLaVA-v1.6-Vicuna-7B dimensions (CLIP ViT-L/14-336 + Vicuna-7B), for GPUs"),
    ]
}


def next_config(p: Preset) -> tuple[LlavaNextConfig, object]:
    llava, clip = preset_configs(p)
    config = LlavaNextConfig(
        vision_config=llava.vision_config.to_dict(), text_config=llava.text_config.to_dict(),
        image_token_id=llava.image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_grid_pinpoints=GRID_PINPOINTS, tie_word_embeddings=False,
    )
    return config, clip


def build_processor(p: Preset) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size, "width": p.image_size},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    tokenizer = build_byte_tokenizer()
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=p.patch_size,
        vision_feature_select_strategy="default", chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1, image_token=IMAGE,
    )


class NextVisionTower(VisionTower):
    """`VisionTower` per crop, plus ``image_newline`` [R, H] (the learned newline, one row per
    crop row, so that it is an output of the graph rather than a constant)."""

    def __init__(self, *args, newline: nn.Parameter, **kwargs):
        super().__init__(*args, **kwargs)
        self.newline = newline

    @property
    def output_names(self) -> list[str]:
        return [*self.outputs, "image_newline"]

    def forward(self, pixel_values: torch.Tensor, instruction_embeds: torch.Tensor | None = None):
        out = super().forward(pixel_values, instruction_embeds)
        out = out if isinstance(out, tuple) else (out,)
        newline = self.newline.detach().to(pixel_values.dtype)[None, :].expand(pixel_values.shape[0], -1)
        return (*out, newline)


# ----------------------------------------------------------------------------- geometry (host side)


def unpadded_box(original: tuple[int, int], current: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows [top, bottom) and columns [left, right) of a stitched feature map of size ``current``
    (height, width) that cover the image of size ``original`` (Hugging Face's ``unpad_image``)."""
    oh, ow = original
    ch, cw = current
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def split_budget(total: int, parts: int) -> list[int]:
    """``total`` over ``parts`` crops: floor each, the first ``total mod parts`` get one more."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


@register_family("llava-next")
class LlavaNextSpec(LlavaSpec):
    presets = PRESETS
    clip_subfolder = CLIP_SUBFOLDER
    clip_max_tokens = CLIP_MAX_TOKENS
    host_pruning = True
    scopes = (CROP, IMAGE_SCOPE)
    model_class = LlavaNextForConditionalGeneration

    # -- loading ----------------------------------------------------------------------------

    def preset_configs(self, p: Preset):
        return next_config(p)

    def preset_processor(self, p: Preset):
        return build_processor(p)

    def check_config(self, config: dict, path) -> None:
        super().check_config(config, path)
        pinpoints = config.get("image_grid_pinpoints")
        if not isinstance(pinpoints, list) or not pinpoints:
            raise ModelError(f"{path}/config.json has no image_grid_pinpoints: not a LLaVA-NeXT (anyres) checkpoint")

    # -- dims -------------------------------------------------------------------------------

    def grid_shapes(self, config) -> list[tuple[int, int]]:
        """The tile grids (rows, columns) the pinpoints allow."""
        size = config.vision_config.image_size
        return sorted({(h // size, w // size) for h, w in config.image_grid_pinpoints})

    def num_image_tokens(self, config) -> int:
        """The most image tokens one image can give: base crop + the largest grid + its newlines."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side + max(gh * side * (gw * side + 1) for gh, gw in self.grid_shapes(config))

    # -- modules ----------------------------------------------------------------------------

    def vision_tower(self, loaded: LoadedModel, outputs: tuple[str, ...], relevance: str | None) -> VisionTower:
        model = loaded.model
        clip = loaded.clip if relevance == CLIP_RELEVANCE else None
        return NextVisionTower(model.model.vision_tower, model.model.multi_modal_projector,
                               self._layer_index(loaded.config), outputs, clip,
                               newline=model.model.image_newline).eval()

    # -- pruning on host-gathered rows ------------------------------------------------------

    def pruning_budgets(self, config, budget: int, scope: str) -> list[int]:
        """Every per-row budget the ``prune_b<budget>`` graphs need for a total of ``budget``."""
        if scope == IMAGE_SCOPE:
            return [budget]
        return sorted({b for gh, gw in self.grid_shapes(config) for b in split_budget(budget, 1 + gh * gw)})

    # -- a per-crop method (VisionZip): the op in the vision graph, every crop ---------------------

    def crop_counts(self, config) -> list[int]:
        """The numbers of crops an image can have (base + tiles)."""
        return sorted({1 + gh * gw for gh, gw in self.grid_shapes(config)})

    def kept_image_tokens(self, config, method, settings, num_layers: int | None = None) -> int:
        if not self.prunes_per_crop(method):
            return super().kept_image_tokens(config, method, settings, num_layers)
        per_crop = method.kept_tokens(settings, self.vision_dims(config).tokens_per_crop)
        return max(self.crop_counts(config)) * per_crop

    def describe_method(self, config, method, settings) -> str:
        if not self.prunes_per_crop(method):
            return super().describe_method(config, method, settings)
        per_crop = method.kept_tokens(settings, self.vision_dims(config).tokens_per_crop)
        counts = self.crop_counts(config)
        return (f"{method.describe(settings, self.vision_dims(config).tokens_per_crop)} per crop: "
                f"{counts[0] * per_crop}-{counts[-1] * per_crop} tokens per image ({counts[0]}-{counts[-1]} crops)")

    def method_details(self, config, method, settings) -> dict:
        """A per-crop method: the budget is each crop's; an image of n crops reaches the LLM with n times
        the per-crop tokens, laid out as the method says (``crop_layout``); ``kept_indices`` per crop."""
        if not self.prunes_per_crop(method):
            return {}
        per_crop = method.kept_tokens(settings, self.vision_dims(config).tokens_per_crop)
        return {"budget_applies_to": "crop", "runs": "in the vision graph, on every crop (base + tiles)",
                "kept_tokens_per_image": {str(n): n * per_crop for n in self.crop_counts(config)},
                "crop_layout": method.crop_layout_meaning,
                "kept_indices": "per image, one array per crop (the base crop first, then the tiles in row-major "
                                f"order), each: {method.kept_indices_meaning}"}

    # -- host side --------------------------------------------------------------------------

    def benchmark_image_size(self, processor) -> int | None:
        """The largest square resolution of the grid (672: base + 2x2 tiles, 2,880 tokens before
        unpadding and newlines, the paper's LLaVA-NeXT setting)."""
        squares = [h for h, w in processor.image_processor.image_grid_pinpoints if h == w]
        return max(squares) if squares else None

    def preprocess_images(self, processor, images: list) -> VisionBatch:
        """Every image's crops as rows (base crop first), ``meta`` = its size and tile grid."""
        out = processor.image_processor(images=images, return_tensors="np")
        pixels, sizes = out["pixel_values"], out["image_sizes"]
        config_size = processor.image_processor.crop_size["height"]
        pinpoints = processor.image_processor.image_grid_pinpoints
        rows, counts, meta = [], [], []
        for b in range(len(images)):
            h, w = (int(v) for v in sizes[b])
            best_h, best_w = select_best_resolution((h, w), pinpoints)
            grid = (best_h // config_size, best_w // config_size)
            n = 1 + grid[0] * grid[1]
            rows.append(pixels[b, :n])
            counts.append(n)
            meta.append({"image_size": (h, w), "grid": grid})
        return VisionBatch(np.concatenate(rows, axis=0), counts, meta=meta)

    def _layout(self, meta: dict, side: int):
        """For one image: per crop, the patch indices (crop raster) left after unpadding, and
        the stitched grid's token order as (crop, patch, grid row) triples (raster order)."""
        gh, gw = meta["grid"]
        top, bottom, left, right = unpadded_box(meta["image_size"], (gh * side, gw * side))
        ys, xs = np.meshgrid(np.arange(top, bottom), np.arange(left, right), indexing="ij")
        ys, xs = ys.ravel(), xs.ravel()
        crop = 1 + (ys // side) * gw + xs // side
        patch = (ys % side) * side + xs % side
        row = ys - top
        return crop, patch, row, bottom - top

    def image_features(self, outputs: dict[str, np.ndarray], batch: VisionBatch, prune=None) -> ImageFeatures:
        """Per image: base crop, the unpadded stitched grid with a newline per row (Hugging Face's
        layout); with ``prune`` (a `fsr.models.spec.HostPruning`), the method's op on the
        unpadded tokens per crop or per image first; with a `CropPruning`, crops the vision graph
        already pruned, laid out by the method (the module docstring)."""
        if isinstance(prune, CropPruning):
            return self._crop_pruned_features(outputs, batch, prune)
        tokens, newline = outputs["tokens"], outputs["image_newline"]
        side = int(round(math.sqrt(tokens.shape[1])))
        starts = np.cumsum([0, *batch.rows_per_image])
        plans = []
        for b, meta in enumerate(batch.meta):
            crop, patch, row, height = self._layout(meta, side)
            plans.append((starts[b], crop, patch, row, height, batch.rows_per_image[b]))
        if prune is None:
            images = []
            for first, crop, patch, row, height, _ in plans:
                grid = tokens[first + crop, patch]
                images.append(self._stitch(tokens[first], grid, row, height, newline[first]))
            return ImageFeatures([[im] for im in images], None)
        return self._pruned_features(outputs, plans, prune, newline)

    def _stitch(self, base: np.ndarray, grid: np.ndarray, row: np.ndarray, height: int,
                newline: np.ndarray) -> np.ndarray:
        """Base tokens, then each grid row's tokens (``row`` says which row each grid token is on,
        ascending) followed by the newline."""
        ends = np.searchsorted(row, np.arange(height), side="right")
        parts, cursor = [base], 0
        for end in ends:
            parts += [grid[cursor:end], newline[None]]
            cursor = end
        return np.concatenate(parts, axis=0)

    def _pruned_features(self, outputs, plans, prune, newline) -> ImageFeatures:
        names = [n for n in prune.inputs if n in outputs]
        images, kept_all = [], []
        for first, crop, patch, row, height, n_crops in plans:
            side_tokens = outputs["tokens"].shape[1]
            base_idx = np.arange(side_tokens)
            if prune.scope == IMAGE_SCOPE:
                # one row: base (raster), then the stitched grid (raster)
                feeds = {n: np.concatenate([outputs[n][first], outputs[n][first + crop, patch]], axis=0)[None]
                         for n in names}
                pruned, kept = prune.run(prune.budget, feeds)
                pruned, kept = pruned[0], kept[0].astype(np.int64)
                base_keep = kept < side_tokens
                grid_keep = kept[~base_keep] - side_tokens
                base_tokens = pruned[base_keep]
                grid_tokens, grid_rows = pruned[~base_keep], row[grid_keep]
                kept_all.append(kept)
            else:
                budgets = split_budget(prune.budget, n_crops)
                crop_tokens, kept_crops = [], []
                grid_tokens, grid_rows, grid_order = [], [], []
                for c in range(n_crops):
                    at = base_idx if c == 0 else np.nonzero(crop == c)[0]  # grid positions of this crop
                    if c == 0:
                        rows = {n: outputs[n][first][None] for n in names}
                    else:
                        rows = {n: outputs[n][first + c, patch[at]][None] for n in names}
                    if len(at) == 0:
                        kept_crops.append(np.zeros(0, np.int64))
                        continue
                    pruned, kept = prune.run(budgets[c], rows)
                    pruned, kept = pruned[0], kept[0].astype(np.int64)
                    if c == 0:
                        crop_tokens = pruned
                        kept_crops.append(kept)
                        continue
                    kept_crops.append(np.sort(patch[at][kept]))
                    grid_tokens.append(pruned)
                    grid_order.append(at[kept])
                base_tokens = crop_tokens
                order = np.concatenate(grid_order) if grid_order else np.zeros(0, np.int64)
                sort = np.argsort(order, kind="stable")  # stitched raster order
                grid_tokens = (np.concatenate(grid_tokens, axis=0)[sort] if grid_tokens
                               else np.zeros((0, base_tokens.shape[-1]), base_tokens.dtype))
                grid_rows = row[order[sort]]
                kept_all.append(kept_crops)
            images.append(self._stitch(base_tokens, grid_tokens, grid_rows, height, newline[first]))
        return ImageFeatures([[im] for im in images], kept_all)

    def _crop_pruned_features(self, outputs, batch: VisionBatch, prune: CropPruning) -> ImageFeatures:
        """Crops the method's op pruned in the vision graph (``image_tokens`` / ``kept_indices`` per crop
        row): each image laid out by the method (`CropPruning.arrange`) from its base crop, its tiles
        and where each tile's patches sit on the stitched grid; ``kept_indices[b]`` = one array per crop."""
        tokens, kept = outputs["image_tokens"], outputs["kept_indices"].astype(np.int64)
        side = int(round(math.sqrt(prune.tokens_per_crop)))
        starts = np.cumsum([0, *batch.rows_per_image])
        images, kept_all = [], []
        for b, meta in enumerate(batch.meta):
            first, n = int(starts[b]), batch.rows_per_image[b]
            positions = [self.tile_positions(meta["grid"], t, side) for t in range(n - 1)]
            tiles = [(tokens[first + c], kept[first + c]) for c in range(1, n)]
            images.append(prune.arrange((tokens[first], kept[first]), tiles, positions))
            kept_all.append([kept[first + c] for c in range(n)])
        return ImageFeatures([[im] for im in images], kept_all)

    @staticmethod
    def tile_positions(grid: tuple[int, int], tile: int, side: int) -> np.ndarray:
        """Row-major indices on the stitched ``(side * rows) x (side * cols)`` grid of tile ``tile``'s
        patches (tiles in row-major order, each ``side x side`` patches in raster order)."""
        _, cols = grid
        ys, xs = np.divmod(np.arange(side * side), side)
        return (tile // cols * side + ys) * (cols * side) + tile % cols * side + xs
