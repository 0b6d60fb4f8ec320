"""fsr.models: one spec per model family, found through a registry.

- `registry`: the families (``FAMILIES``), `get_spec(name)`, checkpoint detection
  (`family_of`, `check_checkpoint`), `resolve_model_path`, `ModelError` (light: no torch).
- `spec`: `ModelSpec`, the base every family subclasses; `LoadedModel`, `GraphSpec`,
  the host-side records (`VisionBatch`, `Request`, `ImageFeatures`, `PrefillInputs`).
- `parts`: traceable PyTorch building blocks shared by the families.
- one module per family: `llava` (LLaVA-1.5).

`load_model(model, family="llava", ...)` is the shortcut ``get_spec(family).load(model, ...)``.
"""

from fsr.models.registry import (
    FAMILIES, ModelError, check_checkpoint, family_names, family_of, get_family, get_spec, resolve_model_path,
)


def load_model(model: str | None = None, *, family: str = "llava", **options):
    """A preset by name (``None``: the family's default preset) or a checkpoint, as a ``LoadedModel``."""
    return get_spec(family).load(model, **options)


__all__ = ["FAMILIES", "ModelError", "check_checkpoint", "family_names", "family_of", "get_family", "get_spec",
           "load_model", "resolve_model_path"]
