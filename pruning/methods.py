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
BUILTIN_MODULES = ("fsr.pruning.fsr_method", "fsr.pruning.visionzip_method", "fsr.pruning.baseline_methods",
                   "fsr.pruning.pio_method")

#: The contract of a pruning graph between two decoder segments (a method that prunes in the LLM):
#: ``hidden_states`` [B,S,D] (the previous segment's output), ``attention_mask`` [B,S] int64 (0 on left
#: padding), ``position_ids`` [B,S] int64 (the positions the previous segment used), ``image_start`` [B]
#: int64 (first visual token of each row; the span is ``[start, start + num_visual)``) ->
#: ``hidden_states_out`` [B,S',D], ``attention_mask_out`` [B,S'], ``position_ids_out`` [B,S'] (what the next
#: segment runs on), ``kept_indices`` [B,keep] int64 (ascending, inside the span); further outputs are the
#: method's own. ``S' = S - num_visual + keep``; the span keeps its start and has ``keep`` tokens after.
LLM_PRUNING_INPUTS = ("hidden_states", "attention_mask", "position_ids", "image_start")
LLM_PRUNING_OUTPUTS = ("hidden_states_out", "attention_mask_out", "position_ids_out", "kept_indices")


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


@dataclasses.dataclass(frozen=True)
class LlmStage:
    """One pruning point inside the LLM: the decoder is cut before LLM layer ``layer`` (0-based), and
    the graph ``graph`` keeps ``keep`` of the ``num_visual`` visual tokens per image in between."""

    layer: int
    num_visual: int
    keep: int

    @property
    def graph(self) -> str:
        return f"pruning_{self.layer}"

    @property
    def dropped(self) -> int:
        return self.num_visual - self.keep


@dataclasses.dataclass
class PruningGraph:
    """What a method contributes to an export for one `LlmStage` (the model spec turns it into a graph):
    the module (inputs `LLM_PRUNING_INPUTS`, outputs starting with `LLM_PRUNING_OUTPUTS`), example inputs
    and dynamic shapes for tracing, an optional ``torch.onnx`` custom translation table and a pass over
    the exported ``ModelProto`` (``finish``, e.g. adding an ONNX function)."""

    module: Any
    input_names: list[str]
    output_names: list[str]
    example_inputs: Callable[[], tuple]
    dynamic_shapes: tuple
    translation_table: Callable[[], dict] | None = None
    finish: Callable[[Any], Any] | None = None


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

    def kept_tokens(self, settings: Settings, num_tokens: int, num_layers: int | None = None) -> int:
        """Image tokens the LLM sees for an image of ``num_tokens`` tokens (a method that prunes inside
        the LLM: the mean over its ``num_layers`` layers)."""
        budget = self.budget(settings)
        return num_tokens if budget is None or not self.prunes else min(budget, num_tokens)

    def vision_tokens(self, settings: Settings, num_tokens: int) -> int:
        """Image tokens per image the vision graph passes to the LLM."""
        return self.kept_tokens(settings, num_tokens) if self.prunes_in == "vision" else num_tokens

    def llm_stages(self, settings: Settings, *, num_layers: int, num_visual: int) -> list[LlmStage]:
        """The pruning points inside an LLM of ``num_layers`` layers whose input has ``num_visual`` visual
        tokens per image (`vision_tokens`); `MethodError` when the method cannot run on such an LLM."""
        return []

    def check_model(self, settings: Settings, *, num_layers: int, num_image_tokens: int) -> None:
        """Refuse (`MethodError`, saying why) a model this method cannot run on with ``settings``."""
        self.llm_stages(settings, num_layers=num_layers,
                        num_visual=self.vision_tokens(settings, num_image_tokens))

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

    def outputs(self, settings: Settings | None = None) -> tuple[str, ...]:
        """The vision graph's outputs with this method (and ``settings``)."""
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

    # -- inside the LLM (prunes_in == "llm") --------------------------------------------------

    def pruning_graph(self, settings: Settings, stage: LlmStage, *, language_model, lm_head,
                      form: str) -> PruningGraph:
        """The module of the pruning graph of ``stage`` (``form``: ``export``, ``torch`` or
        ``reference``), built on the LLM's own modules (never copied)."""
        raise MethodError(f"method {self.name!r} does not prune inside the LLM")

    def between_segments(self, pipeline, index: int, hidden, positions, state):
        """At prefill, before decoder segment ``index`` (its ``prune_before``): run the pruning graph on
        the previous segment's output, give segment ``index`` its mask (its own KV length) and position
        offset, record the kept indices in ``state``; returns ``(hidden, positions)`` for the segment.

        ``pipeline`` is a `fsr.runtime.pipeline.Pipeline` (``run_graph``, ``backend``, ``manifest``),
        ``state`` its ``DecodeState``. The default runs any graph of the `LLM_PRUNING_INPUTS` /
        `LLM_PRUNING_OUTPUTS` contract."""
        if self.prunes_in != "llm":
            raise MethodError(f"method {self.name!r} does not prune inside the LLM")
        import numpy as np  # light: the runtime has it loaded

        segment = pipeline.manifest.decoder_segments[index]
        before, seg_state = state.segments[index - 1], state.segments[index]
        previous = pipeline.manifest.decoder_segments[index - 1]
        n, keep = previous.image_tokens, segment.image_tokens
        entering = pipeline.manifest.decoder_segments[0].image_tokens
        starts = image_starts(state.image_spans, entering, n, before.attention_mask)
        out = pipeline.run_graph(segment.prune_before, {
            "hidden_states": hidden, "attention_mask": before.attention_mask, "position_ids": positions,
            "image_start": starts})
        to_host = pipeline.backend.to_host
        seg_state.attention_mask = np.ascontiguousarray(to_host(out["attention_mask_out"]).astype(np.int64))
        seg_state.position_offset = before.position_offset + (n - keep)
        kept = to_host(out["kept_indices"]).astype(np.int64)
        origin = state.llm_kept[-1] if state.llm_kept else np.broadcast_to(np.arange(n), kept.shape[:1] + (n,))
        state.llm_kept.append(np.take_along_axis(origin, kept, axis=1))
        return out["hidden_states_out"], out["position_ids_out"]

    # -- the PyTorch reference pipeline of a method that prunes inside the LLM ----------------------

    def reference_generate(self, settings: Settings, *, language_model, lm_head, embed_tokens, inputs_embeds,
                           image_span: tuple[int, int], max_new_tokens: int, eos_token_ids=()):
        """Greedy generation of one unpadded prompt (``inputs_embeds`` [S, D], image at ``image_span``)
        with the method's readable reference inside the LLM -> ``(token_ids, kept)``: ``kept`` lists,
        per stage, the kept visual tokens as indices of the span entering the LLM."""
        raise MethodError(f"method {self.name!r} does not prune inside the LLM")

    def reference_step_logits(self, settings: Settings, *, language_model, lm_head, embed_tokens, inputs_embeds,
                              image_span: tuple[int, int], continuation: list[int]):
        """Teacher-forced next-token logits [T, V] of one unpadded prompt on ``continuation``, the
        method's readable reference pruning inside the LLM (pruning fidelity)."""
        raise MethodError(f"method {self.name!r} does not prune inside the LLM")

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def load(path: str) -> Any:
        """``"package.module:name"`` -> the object (imported now: the heavy parts of a method)."""
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)


def image_starts(image_spans, span_tokens: int, num_visual: int, attention_mask) -> "np.ndarray":
    """Each row's image start [B] int64 for a pruning graph. ``image_spans`` are the prefill's (one image
    of ``span_tokens`` tokens per row); ``num_visual`` tokens of it remain now, which must lie on the
    row's tokens in ``attention_mask``. `MethodError` otherwise."""
    import numpy as np

    starts = []
    for b, spans in enumerate(image_spans):
        if len(spans) != 1 or spans[0][1] != span_tokens:
            raise MethodError(f"row {b} has image spans (start, length) {list(spans)}; pruning inside the LLM needs "
                              f"exactly one image of {span_tokens} tokens per row")
        start = int(spans[0][0])
        mask = np.asarray(attention_mask[b])
        if start < 0 or start + num_visual > mask.shape[0] or not mask[start:start + num_visual].all():
            raise MethodError(f"row {b}: the image span [{start}, {start + num_visual}) is not inside the row's "
                              "tokens")
        starts.append(start)
    return np.asarray(starts, dtype=np.int64)


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


__all__ = ["AFTER_PROJECTOR", "BEFORE_PROJECTOR", "GATHERED", "LLM_PRUNING_INPUTS", "LLM_PRUNING_OUTPUTS", "PER_CROP",
           "BudgetSettings", "LlmStage", "MethodError", "NoPruning", "NoSettings", "PruningGraph", "PruningMethod",
           "SettingsError", "get_method", "image_starts", "method_names", "methods", "register_method"]
