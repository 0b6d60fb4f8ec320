"""fsr.pruning: visual-token pruning methods, the FocusScanRefine operator first.

- `methods`: the method registry (`get_method(name)`, `methods()`): one object per method
  (``none``, ``fsr``, the baselines) that the exporter, runtime, compare and bench ask.
- `focus_scan_refine_reference`: readable reference (ground truth), `FSRDetails`.
- `FocusScanRefineFixed`: fixed-shape, batch-vectorised module that exports to ONNX.
- Baselines with FSR's call shape (``baselines.py``): `saliency_topk_reference`,
  `uniform_reference`, `random_reference`, the exportable `SaliencyTopKFixed`, and
  `PRUNING_METHODS` (name -> reference function) / `get_pruning_method`.
- The op's identity (``focus_scan_refine.yaml``, read by `fsr_identity`): ``FSR_DOMAIN``,
  ``FSR_OP``, ``FSR_OP_VERSION``, ``FSR_INPUTS``, ``FSR_OUTPUTS``, ``FSR_ATTRIBUTES``,
  ``FSR_ATTRIBUTE_DEFAULTS``; `FsrOpError`; `kept_count` (K from N and the attributes).
- `build_fsr_function` / `make_fsr_model` / `fsr_node_attributes` / `check_fsr_model`: the
  ONNX local function ``fsr.FocusScanRefine``.
- `fsr.pruning.testing`: shared random test cases.

Every name loads on first use, so that importing the registry (``fsr.pruning.methods``)
stays light: the command-line tools read method settings at start-up without torch.

Specification: ``shared/docs/fsr-op.md``; rounding conventions: ``pruning/README.md``.
"""

import importlib

_NAMES = {
    "cosine_matrix": "_numerics", "fsr_scores": "_numerics", "norm01": "_numerics", "pow_f32": "_numerics",
    "PRUNING_METHODS": "baselines", "SaliencyTopKFixed": "baselines", "get_pruning_method": "baselines",
    "random_reference": "baselines", "saliency_topk_reference": "baselines", "uniform_indices": "baselines",
    "uniform_reference": "baselines",
    "FocusScanRefineFixed": "fsr_fixed",
    "FSRDetails": "fsr_reference", "focus_scan_refine_reference": "fsr_reference",
    "FSR_ATTRIBUTES": "fsr_identity", "FSR_ATTRIBUTE_DEFAULTS": "fsr_identity", "FSR_DOMAIN": "fsr_identity",
    "FSR_INPUTS": "fsr_identity", "FSR_OP": "fsr_identity", "FSR_OP_VERSION": "fsr_identity",
    "FSR_OUTPUTS": "fsr_identity", "FsrOpError": "fsr_identity", "kept_count": "fsr_identity",
    "build_fsr_function": "onnx_function", "check_fsr_model": "onnx_function", "check_fsr_node": "onnx_function",
    "fsr_function_settings": "onnx_function", "fsr_node_attributes": "onnx_function",
    "make_fsr_model": "onnx_function", "restore_function_metadata": "onnx_function",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
