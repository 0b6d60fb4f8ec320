"""Small PyTorch modules the method registry hands out (imported on use: they need torch).

- `PassThrough`: method ``none``: the tokens, unchanged.
- `ReferenceModule`: a method's readable reference as a module with positional inputs, so
  the runtime's PyTorch back end and the comparisons run it where they run the fixed form.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch


class PassThrough(torch.nn.Module):
    """``forward(tokens) -> tokens``."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class ReferenceModule(torch.nn.Module):
    """``forward(*inputs)`` -> ``reference({name: input})`` (outputs without ``None``)."""

    def __init__(self, reference: Callable[[Mapping[str, torch.Tensor]], tuple], names: tuple[str, ...]):
        super().__init__()
        self.reference, self.names = reference, tuple(names)

    def forward(self, *inputs: torch.Tensor):
        out = self.reference(dict(zip(self.names, inputs)))
        return tuple(o for o in out if o is not None)
