"""Pruning methods: one object per method, found by name.

::

    method = get_method("fsr")
    settings = method.settings(budget=64)                 # typed and validated (fsr.settings)
    method.inputs(settings, relevance=True)               # the vision-tower outputs it reads, in call order
    method.kept_tokens(settings, 576)                     # 64
    pruned, kept = method.reference(settings)(inputs)     # the readable reference (ground truth)
    module = method.torch_module(settings, relevance=True)  # the exportable PyTorch form
    graph = method.attach(graph, settings, relevance=True)  # its op spliced into the traced vision graph

Everything that differs between methods is an attribute or a method of a `PruningMethod`
subclass; the exporter, the runtime back ends, ``fsr-compare`` and ``fsr-bench`` ask the
method and never test its name. A method declares:

- ``Settings``: its settings class (`fsr.settings.Settings`: validation, CLI options, the
  manifest's JSON form);
- ``needs``: the named vision-tower outputs it reads (a model spec provides them: see
  ``fsr.models.spec.VISION_OUTPUTS``) and ``relevance_input``, read only when the export
  computes instruction relevance; ``placement``: whether its op runs on the projector's
  outputs (``after_projector``, FSR) or on the tower's features before the projector
  (``before_projector``);
- ``reference_function`` / ``torch_class``: where its readable reference and its
  fixed-shape PyTorch form live (``"module:name"``, imported on use);
- ``attach``: how its op gets into the vision graph (a graph pass);
- ``onnx_op`` (the node a benchmark cuts the graph at), ``tensorrt_plugin`` (the graph has
  a plugin form for ``fsr-build --plugin``), ``near_tie_analysis`` (how ``fsr-compare``
  explains a differing kept set);
- ``prunes_in``: ``"vision"`` (the vision graph), ``"llm"`` (between decoder segments:
  ``between_segments``) or ``"nothing"``;
- ``multi_crop``: where its op runs in a family with several crops per image (LLaVA-NeXT):
  ``gathered`` (on the tokens the family gathers on the host after its own layout steps,
  unpadding included: ``prune_b<K>`` graphs; FSR) or ``per_crop`` (in the vision graph on
  every crop row as the tower gives it, a per-crop budget; the family then lays each
  image's crops out with ``arrange_crops``; VisionZip).

Method modules stay light (no torch or onnx at import: the CLIs read settings and options
at start-up); the heavy parts are named by ``"module:name"`` strings and imported by
`PruningMethod.load` when they are used. Built-in methods are the modules listed in
``BUILTIN_MODULES``; a new method is one module that defines a subclass decorated with
`register_method`, added to that list.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar, Mapping

from fsr.errors import FsrError
from fsr.settings import Settings, SettingsError, setting

AFTER_PROJECTOR, BEFORE_PROJECTOR = "after_projector", "before_projector"
#: where a multi-crop family runs a method's op (`PruningMethod.multi_crop`)
GATHERED, PER_CROP = "gathered", "per_crop"
#: Modules that define the built-in methods (imported on the first registry lookup).
BUILTIN_MODULES = ("fsr.pruning.fsr_method", "fsr.pruning.visionzip_method", "fsr.pruning.baseline_methods")


class MethodError(FsrError, ValueError):
    """An unknown method, or a method asked for something it does not do."""


@dataclasses.dataclass(frozen=True)
class NoSettings(Settings):
    """A method without settings."""

    label: ClassVar[str] = "method"


@dataclasses.dataclass(frozen=True)
class BudgetSettings(Settings):
    """Settings of a method that keeps ``budget`` image tokens."""

    label: ClassVar[str] = "pruning"
    budget: int = setting(64, help="Image tokens the LLM keeps per image; >= 1.", minimum=1,
                          hint="it is the number of image tokens the LLM keeps; use --method none to export "
                               "without pruning")


class PruningMethod:
    """Base of every method (see the module docstring). Instances are stateless."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Settings: ClassVar[type[Settings]] = NoSettings
    prunes_in: ClassVar[str] = "vision"  # "vision" | "llm" | "nothing"
    needs: ClassVar[tuple[str, ...]] = ("tokens",)
    relevance_input: ClassVar[str | None] = None  # an extra input read when relevance is computed
    placement: ClassVar[str] = AFTER_PROJECTOR
    exportable: ClassVar[bool] = False  # has an in-graph form: fsr-export --method NAME
    reference_function: ClassVar[str | None] = None  # "module:function", keyword inputs -> (pruned, kept)
    torch_class: ClassVar[str | None] = None  # "module:Class", the fixed-shape PyTorch form
    onnx_op: ClassVar[tuple[str, str] | None] = None  # (domain, op_type) of its node in the vision graph
    tensorrt_plugin: ClassVar[bool] = False
    near_tie_analysis: ClassVar[str | None] = None
    #: multi-crop families: ``GATHERED`` (the op on host-gathered rows, after the family's layout steps) or
    #: ``PER_CROP`` (the op in the vision graph on every crop row, budget per crop; `arrange_crops` lays them out)
    multi_crop: ClassVar[str] = GATHERED
    #: a ``PER_CROP`` method: how `arrange_crops` orders an image's crops (the manifest records it)
    crop_layout_meaning: ClassVar[str] = ""
    #: what a row of the vision graph's ``kept_indices`` holds (the manifest records it)
    kept_indices_meaning: ClassVar[str] = "patch indices (0-based, raster order), ascending"

    # -- settings ---------------------------------------------------------------------------

    @property
    def prunes(self) -> bool:
        return self.prunes_in != "nothing"

    def settings(self, **options: Any) -> Settings:
        """Settings from option values (``None``: not given, the default applies)."""
        return self.Settings.from_options(**options)

    def settings_from_json(self, data: Any) -> Settings:
        return self.Settings.from_json(data)

    def budget(self, settings: Settings) -> int | None:
        return getattr(settings, "budget", None)

    def with_budget(self, settings: Settings, budget: int) -> Settings:
        """``settings`` at another budget (fidelity and benchmark sweeps); unchanged without one."""
        return settings.replace(budget=budget) if hasattr(settings, "budget") else settings

    def kept_tokens(self, settings: Settings, num_tokens: int) -> int:
        """Image tokens the LLM sees for an image of ``num_tokens`` tokens."""
        budget = self.budget(settings)
        return num_tokens if budget is None or not self.prunes else min(budget, num_tokens)

    def relevance_mode(self, settings: Settings) -> str | None:
        """None when the method reads no instruction relevance, else ``auto``/``clip``/``llm``."""
        return None

    def scope(self, settings: Settings) -> str:
        """Where the budget applies in a multi-crop family: ``"crop"`` (split over an image's crops,
        one op row each) or ``"image"`` (one row over all its crops). One-crop families: the same."""
        return "crop"

    def describe(self, settings: Settings, num_tokens: int) -> str:
        """Human summary for CLI lines: ``fsr, budget 64``."""
        budget = self.budget(settings)
        if not self.prunes or budget is None:
            return self.name
        return f"{self.name}, budget {budget}" + (" (>= the image's tokens: the identity)"
                                                  if self.is_identity(settings, num_tokens) else "")

    def is_identity(self, settings: Settings, num_tokens: int) -> bool:
        """True when a pruning method's settings give the LLM exactly the unpruned model's
        ``num_tokens`` image tokens (by default: a budget >= N; a method whose output differs
        from the unpruned tokens at every budget, as VisionZip's, overrides this). Fidelity
        checks that such a row agrees exactly; ``none`` is not a pruning method: False."""
        return self.prunes and self.kept_tokens(settings, num_tokens) >= num_tokens

    def identity_note(self, settings: Settings, num_tokens: int) -> str | None:
        """What ``fsr-export`` tells the user when the settings prune nothing, else None."""
        if not self.is_identity(settings, num_tokens):
            return None
        budget = self.budget(settings)
        what = f"--budget {budget} >= the {num_tokens}" if budget is not None else f"these settings keep all " \
            f"{num_tokens}"
        return (f"{what} image tokens of this model: {self.name} keeps every token (the identity), so the export "
                f"computes what the unpruned model does; choose a budget below {num_tokens} to prune")

    def manifest_details(self, settings: Settings) -> dict[str, Any]:
        """What the export's manifest records about the method beside its settings (``method.details``)."""
        if not self.prunes:
            return {}
        details: dict[str, Any] = {"prunes_in": self.prunes_in, "placement": self.placement}
        if self.onnx_op is not None:
            details["op"] = "::".join(self.onnx_op)
        if self.prunes_in == "vision":
            details["kept_indices"] = self.kept_indices_meaning
        return details

    def kept_patches(self, settings: Settings, kept) -> dict[str, list[int]]:
        """One row of ``kept_indices`` read as patch indices (0-based, raster order): ``patches`` the
        LLM sees as they are (or refined), ``anchors`` standing for merged groups, ``cls`` the [CLS]
        token when it is kept."""
        return {"cls": [], "patches": [int(i) for i in kept], "anchors": []}

    def arrange_crops(self, settings: Settings, base: tuple, tiles: list[tuple], positions: list):
        """One image's tokens from its crops' op outputs, for a ``PER_CROP`` method in a multi-crop
        family: ``base`` = ``(tokens [K, H], kept_indices [K])`` of the base crop (the whole image),
        ``tiles`` the same for each high-resolution tile in crop order, ``positions[t]`` [N] int the
        row-major index, on the stitched grid of tiles, of each of tile ``t``'s N patches (the
        family's geometry). Returns the image's tokens [L, H] as the LLM sees them (numpy)."""
        raise MethodError(f"method {self.name!r} has no per-crop layout for multi-crop families")

    # -- the vision graph ------------------------------------------------------------------

    def inputs(self, settings: Settings, relevance: bool) -> tuple[str, ...]:
        """The named vision-tower outputs the method reads, in the order its forms take them."""
        extra = (self.relevance_input,) if relevance and self.relevance_input else ()
        return tuple(self.needs) + extra

    def outputs(self) -> tuple[str, ...]:
        """The vision graph's outputs with this method."""
        return ("image_tokens", "kept_indices") if self.prunes_in == "vision" else ("image_tokens",)

    def reference(self, settings: Settings) -> Callable[[Mapping[str, Any]], tuple]:
        """The readable reference: ``fn(inputs) -> (pruned, kept_indices)`` (inputs by name)."""
        if self.reference_function is None:
            raise MethodError(f"method {self.name!r} has no reference implementation")
        function = self.load(self.reference_function)
        kwargs = self.reference_settings(settings)

        def run(inputs: Mapping[str, Any]):
            return function(**{n: inputs.get(n) for n in self.reference_arguments()}, **kwargs)

        return run

    def has_reference(self) -> bool:
        """Whether `reference` works (a ``reference_function``, or an own ``reference``)."""
        return self.reference_function is not None or type(self).reference is not PruningMethod.reference

    def reference_arguments(self) -> tuple[str, ...]:
        """Keyword names the reference function takes its inputs by."""
        return tuple(self.needs) + ((self.relevance_input,) if self.relevance_input else ())

    def reference_settings(self, settings: Settings) -> dict[str, Any]:
        """Keyword settings the reference function and the PyTorch form take."""
        return settings.to_json()

    def torch_module(self, settings: Settings, *, relevance: bool):
        """The exportable PyTorch form: ``forward(*inputs(settings, relevance)) -> (pruned, kept)``."""
        if self.torch_class is None:
            raise MethodError(f"method {self.name!r} has no PyTorch form")
        return self.load(self.torch_class)(**self.reference_settings(settings))

    def attach(self, graph, settings: Settings, *, relevance: bool):
        """The vision graph pass: a traced graph whose outputs are ``inputs(...)`` (onnx-graphsurgeon
        ``Graph``) -> the graph with the method's op, outputs ``outputs()``."""
        raise MethodError(f"method {self.name!r} has no in-graph form; it cannot be exported "
                          f"(exportable methods: {', '.join(method_names(exportable=True))})")

    def between_segments(self, *args, **kwargs):
        """Run the method's pruning graph between two decoder segments (methods that prune in the LLM)."""
        raise MethodError(f"method {self.name!r} does not prune inside the LLM")

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def load(path: str) -> Any:
        """``"package.module:name"`` -> the object (imported now: the heavy parts of a method)."""
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)


_METHODS: dict[str, PruningMethod] = {}
_BUILTINS: list[str] = list(BUILTIN_MODULES)  # modules still to import


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` (a `PruningMethod` subclass with a ``name``) findable by name."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _METHODS and type(_METHODS[cls.name]) is not cls:
        raise TypeError(f"two pruning methods are named {cls.name!r}")
    _METHODS[cls.name] = cls()
    return cls


def _load_builtins() -> None:
    while _BUILTINS:
        importlib.import_module(_BUILTINS.pop(0))


def methods() -> list[PruningMethod]:
    """Every registered method, in registration order (``none`` first)."""
    _load_builtins()
    return list(_METHODS.values())


def method_names(*, exportable: bool | None = None, prunes: bool | None = None) -> list[str]:
    return [m.name for m in methods() if (exportable is None or m.exportable == exportable)
            and (prunes is None or m.prunes == prunes)]


def get_method(name: str) -> PruningMethod:
    """The method called ``name``; `MethodError` naming the known ones otherwise."""
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise MethodError(f"unknown pruning method {name!r}; known: {', '.join(_METHODS)}") from None


@register_method
class NoPruning(PruningMethod):
    """Every image token reaches the LLM (the unpruned baseline)."""

    name = "none"
    summary = "no pruning: every image token reaches the LLM"
    prunes_in = "nothing"
    needs = ("tokens",)
    exportable = True

    def reference(self, settings: Settings):
        return lambda inputs: (inputs["tokens"], None)

    def torch_module(self, settings: Settings, *, relevance: bool):
        return self.load("fsr.pruning.modules:PassThrough")()

    def attach(self, graph, settings: Settings, *, relevance: bool):
        select_outputs = self.load("fsr.graph_passes.select_outputs:select_outputs")
        return select_outputs(graph, {"tokens": "image_tokens"})


__all__ = ["AFTER_PROJECTOR", "BEFORE_PROJECTOR", "GATHERED", "PER_CROP", "BudgetSettings", "MethodError",
           "NoPruning", "NoSettings", "PruningMethod", "SettingsError", "get_method", "method_names", "methods", "register_method"]
