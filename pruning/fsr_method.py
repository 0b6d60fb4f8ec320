"""FocusScanRefine as a registered pruning method (``fsr``).

Wraps the operator's public API: the readable reference
(``fsr_reference.focus_scan_refine_reference``), the fixed-shape module
(``fsr_fixed.FocusScanRefineFixed``) and the graph pass that splices the
``fsr::FocusScanRefine`` function node into a vision graph
(``graph_passes.splice_fsr.splice_focus_scan_refine``). Specification:
``shared/docs/fsr-op.md``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fsr.pruning.methods import PruningMethod, register_method
from fsr.settings import Settings, setting

RELEVANCE_MODES = ("auto", "clip", "llm", "none")
SCOPES = ("crop", "image")


@dataclasses.dataclass(frozen=True)
class FsrSettings(Settings):
    label: ClassVar[str] = "FocusScanRefine"
    budget: int = setting(64, help="Image tokens the LLM keeps per image (K = min(budget, N)); >= 1.", minimum=1,
                          hint="it is the number of image tokens the LLM keeps; use --method none to export "
                               "without pruning")
    alpha: float = setting(3.0, help="Exponent of the relevance term (>= 0).", minimum=0.0)
    beta: float = setting(1.0, help="Exponent of the saliency term (>= 0).", minimum=0.0)
    rho: float = setting(0.9, help="Focus: share of the score mass kept by the focus set, in (0, 1].",
                         minimum=0.0, exclusive_minimum=True, maximum=1.0)
    kappa: float = setting(1.0, help="Refine: discarded tokens merged per anchor (>= 0).", minimum=0.0)
    relevance: str = setting("auto", help="Instruction relevance: auto (CLIP when the model has a CLIP text tower, "
                                          "else llm) | clip | llm (mean LLM input embedding of the instruction) | none (the "
                                          "term omitted: phi = s_hat^beta; the vision graph takes pixels only).",
                             choices=RELEVANCE_MODES)
    fsr_scope: str = setting("crop", help="Multi-crop models (LLaVA-NeXT): crop (the budget is split over an "
                                          "image's crops, one op row per crop) | image (one op row over all its "
                                          "crops). One-crop models: the same.", choices=SCOPES)


@register_method
class FocusScanRefine(PruningMethod):
    name = "fsr"
    summary = "FocusScanRefine: focus on salient, relevant tokens, scan for coverage, refine by merging"
    Settings = FsrSettings
    needs = ("tokens", "features", "saliency")
    relevance_input = "relevance"
    exportable = True
    reference_function = "fsr.pruning.fsr_reference:focus_scan_refine_reference"
    torch_class = "fsr.pruning.fsr_fixed:FocusScanRefineFixed"
    onnx_op = ("fsr", "FocusScanRefine")
    tensorrt_plugin = True
    near_tie_analysis = "focus-scan-refine"

    def relevance_mode(self, settings: FsrSettings) -> str | None:
        """``none``: the spec's "relevance omitted" (r_hat = 1, phi = s_hat^beta); no instruction input."""
        return None if settings.relevance == "none" else settings.relevance

    def scope(self, settings: FsrSettings) -> str:
        return settings.fsr_scope

    def op_settings(self, settings: FsrSettings) -> dict:
        """The op's attributes (``fsr-op.md``)."""
        return {k: getattr(settings, k) for k in ("budget", "alpha", "beta", "rho", "kappa")}

    def reference_settings(self, settings: FsrSettings) -> dict:
        return self.op_settings(settings)

    def attach(self, graph, settings: FsrSettings, *, relevance: bool):
        splice = self.load("fsr.graph_passes.splice_fsr:splice_focus_scan_refine")
        return splice(graph, **self.op_settings(settings), use_relevance=relevance)
