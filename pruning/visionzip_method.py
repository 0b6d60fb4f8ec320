"""VisionZip as a registered pruning method (``visionzip``).

Wraps the ``fsr::VisionZip`` operator (``visionzip.py``, ``visionzip_onnx.py``; contract in
``visionzip.md``, method in ``shared/docs/methods/visionzip.md``):

- the vision tower provides the feature layer's output *with* its [CLS] token
  (``hidden_states``), the [CLS] query's attention summed over heads (``cls_attention``) and
  the head-mean keys (``keys``) of that layer (``fsr.models.parts.VISION_OUTPUTS``);
- the op runs **before the projector** (upstream merges vision features; the projector is
  nonlinear), so the exporter traces the projector after it;
- ``--budget`` is the number of visual tokens the LLM sees per image, [CLS] included,
  split into ``dominant`` (counting [CLS]) + ``contextual`` by `visionzip_split`
  (64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30);
- ``kept_indices`` are rows of the feature layer *including* [CLS] (patch = index - 1):
  slot 0 the [CLS] token, slots ``1..dominant-1`` the dominant patches ascending, then one
  anchor row per contextual (merged) token, in anchor order. Not FSR's ascending patch
  indices: `kept_patches` reads them.

On a multi-crop family (LLaVA-NeXT) the op runs **per crop** (``multi_crop = PER_CROP``), in
the vision graph like the one-crop case: every crop (base + tiles) goes through the op with
the same split, so ``--budget`` counts the tokens per *crop* (an image of n crops reaches the
LLM with n * budget tokens: 5 crops at 64 -> 320); the family lays the crops out with
`arrange_crops` (the spec's section 5, `visionzip_crop_layout`) and reports ``kept_indices``
per crop, each crop's rows read as above.

VisionZip always hands the [CLS] token to the LLM, so no budget reproduces the unpruned
model (which drops [CLS]): `is_identity` is False at every budget.

This module is light (no torch or onnx at import); the op's parts load on use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fsr.pruning.methods import BEFORE_PROJECTOR, PER_CROP, PruningMethod, register_method
from fsr.settings import Settings, setting

SPLIT = "fsr.pruning.visionzip:visionzip_split"
CROP_LAYOUT = "fsr.pruning.visionzip:visionzip_crop_layout"


@dataclasses.dataclass(frozen=True)
class VisionZipSettings(Settings):
    label: ClassVar[str] = "VisionZip"
    budget: int = setting(64, help="Visual tokens the LLM sees per image, [CLS] included: dominant + contextual "
                                   "(64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30); >= 2. LLaVA-NeXT: per "
                                   "crop (every crop of an image gets the same split: 5 crops at 64 -> 320 "
                                   "tokens).", minimum=2,
                          hint="VisionZip keeps the [CLS] token and at least one contextual token; use --method "
                               "none to export without pruning")


@register_method
class VisionZip(PruningMethod):
    name = "visionzip"
    summary = ("VisionZip: [CLS] + dominant tokens by [CLS] attention, contextual tokens merged by key "
               "similarity, before the projector")
    Settings = VisionZipSettings
    needs = ("hidden_states", "cls_attention", "keys")
    placement = BEFORE_PROJECTOR
    multi_crop = PER_CROP
    exportable = True
    reference_function = "fsr.pruning.visionzip:visionzip_reference"
    torch_class = "fsr.pruning.visionzip:VisionZipFixed"
    onnx_op = ("fsr", "VisionZip")
    near_tie_analysis = "visionzip"
    crop_layout_meaning = ("the base crop's tokens as the op emits them; then the tiles' dominant patches on the "
                           "stitched grid, row-major; then each tile's [CLS] token; then each tile's contextual "
                           "tokens (no unpadding, no newline tokens)")
    kept_indices_meaning = ("rows of the feature layer including [CLS] (patch = index - 1): [CLS], the dominant "
                            "patches ascending, then one anchor row per contextual (merged) token")

    def split(self, settings: VisionZipSettings) -> tuple[int, int]:
        """``(dominant incl. [CLS], contextual)`` for the settings' budget."""
        return self.load(SPLIT)(settings.budget)

    def reference_settings(self, settings: VisionZipSettings) -> dict[str, int]:
        dominant, contextual = self.split(settings)
        return {"dominant": dominant, "contextual": contextual}

    def kept_tokens(self, settings: VisionZipSettings, num_tokens: int, num_layers: int | None = None) -> int:
        """``num_tokens`` patches + [CLS] enter the op; it hands ``min(budget, 1 + num_tokens)`` rows on."""
        return min(settings.budget, num_tokens + 1)

    def is_identity(self, settings: VisionZipSettings, num_tokens: int) -> bool:
        return False  # the [CLS] token always reaches the LLM

    def describe(self, settings: VisionZipSettings, num_tokens: int) -> str:
        dominant, contextual = self.split(settings)
        if dominant + contextual >= num_tokens + 1:
            return f"{self.name}, budget {settings.budget} (every patch and [CLS] kept: no merging)"
        return f"{self.name}, budget {settings.budget} ({dominant} dominant incl. [CLS] + {contextual} contextual)"

    def manifest_details(self, settings: VisionZipSettings) -> dict[str, Any]:
        dominant, contextual = self.split(settings)
        return {**super().manifest_details(settings), "dominant": dominant, "contextual": contextual,
                "split": "contextual = max(1, round(budget * 5 / 32)), dominant = budget - contextual",
                "keeps_cls": True}

    def kept_patches(self, settings: VisionZipSettings, kept) -> dict[str, list[int]]:
        dominant, _ = self.split(settings)
        rows = [int(i) for i in kept]
        if rows == list(range(len(rows))):  # the identity: every row of the layer
            return {"cls": [0], "patches": [i - 1 for i in rows[1:]], "anchors": []}
        return {"cls": [0], "patches": [i - 1 for i in rows[1:dominant]], "anchors": [i - 1 for i in rows[dominant:]]}

    def arrange_crops(self, settings: VisionZipSettings, base, tiles, positions):
        """The spec's section 5 (`visionzip_crop_layout`): the base crop as the op emits it, the tiles'
        dominant patches in stitched-grid order, the tiles' [CLS] tokens, then their contextual tokens."""
        dominant, _ = self.split(settings)
        return self.load(CROP_LAYOUT)(base, tiles, positions, dominant=dominant)

    def attach(self, graph, settings: VisionZipSettings, *, relevance: bool):
        splice = self.load("fsr.pruning.visionzip_onnx:splice_visionzip")
        return splice(graph, **self.reference_settings(settings))
