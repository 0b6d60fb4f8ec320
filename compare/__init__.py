"""fsr.compare: does an export compute what its source model computes, and what does pruning cost?

- `compare_export(export_dir, CompareOptions(...)) -> dict`: every comparison, one JSON-able report
  (``fsr-compare`` prints it as tables; see ``compare/README.md``).
- `ReferenceRunner`: the PyTorch reference of one exported graph as a Polygraphy runner.
- `pruning_fidelity`: agreement / KL of pruned vs unpruned next-token distributions.
- `explain_row` / `explain_kept`: is a differing kept set a near-tie or a real mismatch?

Names load lazily (torch, polygraphy), so ``fsr-compare --help`` starts fast.
"""

import importlib

_NAMES = {
    "BACKENDS": "run", "CompareOptions": "run", "compare_export": "run",
    "CompareError": "errors",
    "DEFAULT_BUDGETS": "fidelity", "pruning_fidelity": "fidelity",
    "TieVerdict": "near_tie", "explain_kept": "near_tie", "explain_row": "near_tie",
    "DEFAULTS": "tolerances", "Tolerance": "tolerances", "ToleranceTable": "tolerances",
    "parse_overrides": "tolerances",
    "ReferenceFromExport": "reference_runner", "ReferenceRunner": "reference_runner",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"fsr.compare.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
