"""fsr.pruning: the FocusScanRefine visual-token pruning operator.

- `focus_scan_refine_reference`: readable reference (ground truth), `FSRDetails`.
- `FocusScanRefineFixed`: fixed-shape, batch-vectorised module that exports to ONNX.
- Baselines with FSR's call shape (``baselines.py``): `saliency_topk_reference`,
  `uniform_reference`, `random_reference`, the exportable `SaliencyTopKFixed`, and the
  registry `PRUNING_METHODS` (name -> function, ``fsr`` included) / `get_pruning_method`.
- The op's identity (``focus_scan_refine.yaml``, read by `fsr_identity`): ``FSR_DOMAIN``,
  ``FSR_OP``, ``FSR_OP_VERSION``, ``FSR_INPUTS``, ``FSR_OUTPUTS``, ``FSR_ATTRIBUTES``,
  ``FSR_ATTRIBUTE_DEFAULTS``; `FsrOpError`; `kept_count` (K from N and the attributes).
- `build_fsr_function` / `make_fsr_model` / `fsr_node_attributes` / `check_fsr_model`: the
  ONNX local function ``fsr.FocusScanRefine`` (loaded lazily: these import onnx).
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
from .fsr_identity import (
    FSR_ATTRIBUTE_DEFAULTS,
    FSR_ATTRIBUTES,
    FSR_DOMAIN,
    FSR_INPUTS,
    FSR_OP,
    FSR_OP_VERSION,
    FSR_OUTPUTS,
    FsrOpError,
    kept_count,
)
from .fsr_reference import FSRDetails, focus_scan_refine_reference

_ONNX_NAMES = (
    "build_fsr_function",
    "check_fsr_model",
    "check_fsr_node",
    "fsr_function_settings",
    "fsr_node_attributes",
    "make_fsr_model",
    "restore_function_metadata",
)

__all__ = [
    "FSR_ATTRIBUTES",
    "FSR_ATTRIBUTE_DEFAULTS",
    "FSR_DOMAIN",
    "FSR_INPUTS",
    "FSR_OP",
    "FSR_OP_VERSION",
    "FSR_OUTPUTS",
    "FSRDetails",
    "FsrOpError",
    "FocusScanRefineFixed",
    "PRUNING_METHODS",
    "SaliencyTopKFixed",
    "cosine_matrix",
    "focus_scan_refine_reference",
    "fsr_scores",
    "get_pruning_method",
    "kept_count",
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
