"""fsr.export: trace a model of a registered family to ONNX, its pruning method inside.

- `ExportSettings`, `export_model`, `describe` (``exporter.py``);
- `trace_to_onnx` (``trace.py``); output folders are written through `fsr.files.OutputFolder`;
- ``cli.py``: ``fsr-export <family>``.

Names load on first use, so that ``fsr-export --help`` starts without torch.
"""

import importlib

_NAMES = {
    "ExportSettings": "exporter", "describe": "exporter", "export_model": "exporter", "graph_entry": "exporter",
    "ExportConfigError": "exporter",
    "ExportError": "trace", "trace_to_onnx": "trace",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
