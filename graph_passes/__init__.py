"""Graph-surgery passes (onnx-graphsurgeon): each is a small named ``Graph -> Graph`` function.

- ``splice_focus_scan_refine``: insert ``fsr::FocusScanRefine`` (with its ONNX function body)
  between the vision tower's outputs and the LLM's image tokens.
- ``select_outputs``: keep (and rename) some graph outputs, dropping the rest and the
  inputs nothing uses any more (``--method none``).
- ``isolate_focus_scan_refine``: the FSR node and its function alone (tests, benchmarks).
- ``fsr_function_to_plugin``: the function node becomes a TensorRT plugin node (``fsr-build --plugin``).
- ``finalize``: cleanup, topological sort, shape inference and the full ``onnx.checker``.
"""

from fsr.graph_passes.finalize import finalize
from fsr.graph_passes.fsr_to_plugin import fsr_function_to_plugin
from fsr.graph_passes.isolate_fsr import find_fsr_nodes, isolate_focus_scan_refine
from fsr.graph_passes.select_outputs import select_outputs
from fsr.graph_passes.splice_fsr import splice_focus_scan_refine

__all__ = ["finalize", "find_fsr_nodes", "fsr_function_to_plugin", "isolate_focus_scan_refine", "select_outputs", "splice_focus_scan_refine"]
