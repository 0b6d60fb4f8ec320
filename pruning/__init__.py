"""fsr.pruning: the FocusScanRefine visual-token pruning operator.

- `focus_scan_refine_reference`: readable reference (ground truth), `FSRDetails`.
- `FocusScanRefineFixed`: fixed-shape, batch-vectorised module that exports to ONNX.
- Baselines with FSR's call shape (``baselines.py``): `saliency_topk_reference`,
  `uniform_reference`, `random_reference`, the exportable `SaliencyTopKFixed`, and the
  registry `PRUNING_METHODS` (name -> function, ``fsr`` included) / `get_pruning_method`.
- `build_fsr_function` / `make_fsr_model` / `fsr_node_attributes`: the ONNX local
  function ``fsr.FocusScanRefine`` (loaded lazily: these import onnx).
- `fsr.pruning.testing`: shared random test cases.

Specification: ``shared/docs/fsr-op.md``; rounding conventions: ``pruning/README.md``.
"""

from ._numerics import cosine_matrix, fsr_scores, norm01, pow_f32
from .baselines import (
    PRUNING_METHODS,
    SaliencyTopKFixed,
    get_pruning_method,
    random_reference,
    saliency_topk_reference,
    uniform_indices,
    uniform_reference,
)
from .fsr_fixed import FocusScanRefineFixed
from .fsr_reference import FSRDetails, focus_scan_refine_reference

_ONNX_NAMES = (
    "FSR_ATTRIBUTES",
    "FSR_DOMAIN",
    "FSR_INPUTS",
    "FSR_OP",
    "FSR_OP_VERSION",
    "FSR_OUTPUTS",
    "build_fsr_function",
    "export_fsr_fixed",
    "fsr_function_settings",
    "fsr_node_attributes",
    "make_fsr_model",
)

__all__ = [
    "FSRDetails",
    "FocusScanRefineFixed",
    "PRUNING_METHODS",
    "SaliencyTopKFixed",
    "cosine_matrix",
    "focus_scan_refine_reference",
    "fsr_scores",
    "get_pruning_method",
    "norm01",
    "pow_f32",
    "random_reference",
    "saliency_topk_reference",
    "uniform_indices",
    "uniform_reference",
    *_ONNX_NAMES,
]


def __getattr__(name):
    if name in _ONNX_NAMES:
        from . import onnx_function

        return getattr(onnx_function, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
