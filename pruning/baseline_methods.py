"""The training-free baselines of ``baselines.py`` as registered methods (``saliency-topk``,
``uniform``, ``random``): readable references for ``fsr-compare``'s fidelity report, with
FSR's call shape ``fn(tokens, features, saliency, relevance, *, budget, **settings)``.
``saliency-topk`` also has a fixed-shape PyTorch form. None of them has an in-graph form
(they are not ``fsr-export`` methods)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fsr.pruning.methods import BudgetSettings, PruningMethod, register_method
from fsr.settings import setting


class BaselineMethod(PruningMethod):
    Settings = BudgetSettings
    needs = ("tokens", "features", "saliency")
    relevance_input = "relevance"

    def relevance_mode(self, settings) -> None:
        return None  # accepted for FSR's call shape, never read


@register_method
class SaliencyTopK(BaselineMethod):
    name = "saliency-topk"
    summary = "the K tokens with the highest [CLS]-attention saliency"
    reference_function = "fsr.pruning.baselines:saliency_topk_reference"
    torch_class = "fsr.pruning.baselines:SaliencyTopKFixed"


@register_method
class Uniform(BaselineMethod):
    name = "uniform"
    summary = "K tokens evenly spaced over the patch order"
    reference_function = "fsr.pruning.baselines:uniform_reference"


@dataclasses.dataclass(frozen=True)
class RandomSettings(BudgetSettings):
    label: ClassVar[str] = "random pruning"
    seed: int = setting(0, help="Seed of the random choice (row b uses seed + b).")


@register_method
class Random(BaselineMethod):
    name = "random"
    summary = "K random tokens per row (a control that ignores the image)"
    Settings = RandomSettings
    reference_function = "fsr.pruning.baselines:random_reference"
