"""PIO-FVLM as a registered pruning method (``pio-fvlm``): pruning inside the exported LLM.

The method (spec: ``shared/docs/methods/pio-fvlm.md``; as implemented: ``pio_fvlm.md``) prunes
visual tokens between decoder segments. What it tells the tools:

- ``llm_stages``: where the decoder is cut and how many visual tokens each stage keeps (the
  schedule: ``--budget`` picks the spec's LLaVA-1.5 schedule for that average, ``--pio-schedule``
  gives the stages explicitly);
- ``pruning_graph``: one `PioPruningStage` per stage (the closed-form saliency on the next
  layer's own weights, the NMS as one ``fsr.PioNms`` node with a ``Loop`` body, the sequence
  surgery), or its readable reference (autograd) for comparisons;
- the vision side: nothing (every image token enters the LLM), or with
  ``--pio-encoder-tokens N`` the optional encoder-side stage ("w/ VE"): windowed and global
  [CLS]-attention picks, then merging, after the projector;
- the PyTorch reference pipeline: `pio_generate_reference` (transformers' layers, autograd
  saliency) and, for pruning fidelity, `pio_teacher_forced_logits`.

Light at import (no torch, no onnx): the heavy parts are loaded when used.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

from fsr.pruning.methods import LlmStage, MethodError, PruningGraph, PruningMethod, register_method
from fsr.settings import Settings, SettingsError, setting

from fsr.pruning import pio_schedule as schedules
#: the average budget used when neither --budget nor --pio-schedule is given
DEFAULT_BUDGET = 64


@dataclasses.dataclass(frozen=True)
class PioSettings(Settings):
    label: ClassVar[str] = "PIO-FVLM"
    budget: int | None = setting(
        None, help=f"Average visual tokens per LLM layer: the spec's LLaVA-1.5 schedule for it (64 and 128 from the "
                   f"spec, 192 ours; layers 1, 10, 15); default {DEFAULT_BUDGET} unless --pio-schedule is given.",
        minimum=1)
    pio_schedule: str | None = setting(
        None, help="PIO-FVLM stages LAYER:TOKENS,... (1-based LLM layer after which TOKENS visual tokens remain), "
                   "e.g. 1:92,10:54,15:22; instead of --budget.")
    pio_encoder_tokens: int | None = setting(
        None, help="PIO-FVLM's optional encoder-side stage (w/ VE): visual tokens per image that enter the LLM "
                   "(windowed and global [CLS]-attention picks, then merging); needs --pio-schedule, e.g. "
                   "--pio-encoder-tokens 96 --pio-schedule 16:32 (upstream's default on 32 layers).", minimum=1)
    tau: float = setting(0.8, help="PIO-FVLM NMS cosine threshold (the spec's 0.8).", minimum=-1.0, maximum=1.0,
                         cli=False)

    def check(self) -> None:
        if self.budget is not None and self.pio_schedule is not None:
            raise SettingsError("PIO-FVLM takes --budget (the spec's schedule for that average) or --pio-schedule "
                                f"(explicit stages), not both (got --budget {self.budget} and --pio-schedule "
                                f"{self.pio_schedule!r})")
        table = schedules.LLAVA15_SCHEDULES
        if self.budget is not None and self.budget not in table and self.budget < max(table):
            raise SettingsError(f"PIO-FVLM setting --budget: no schedule for average budget {self.budget}; choose one "
                                f"of {', '.join(map(str, table))}, or give the stages with --pio-schedule "
                                "'LAYER:TOKENS,...'")
        if self.pio_encoder_tokens is not None and self.pio_schedule is None:
            raise SettingsError("--pio-encoder-tokens needs --pio-schedule: the spec's schedules by budget are for "
                                "the LLM alone (upstream's default w/ VE: --pio-encoder-tokens 96 --pio-schedule "
                                "16:32)")
        if self.pio_schedule is not None:
            try:
                schedules.parse_pio_schedule(self.pio_schedule, encoder_tokens=self.pio_encoder_tokens)
            except schedules.PioError as exc:
                raise SettingsError(f"PIO-FVLM setting --pio-schedule: {exc}") from None

    def schedule(self, num_image_tokens: int | None = None):
        """The `PioSchedule` these settings mean (None: the budget is >= ``num_image_tokens``: no
        pruning)."""
        if self.pio_schedule is not None:
            return schedules.parse_pio_schedule(self.pio_schedule, encoder_tokens=self.pio_encoder_tokens)
        budget = DEFAULT_BUDGET if self.budget is None else self.budget
        if num_image_tokens is not None and budget >= num_image_tokens:
            return None
        try:
            return schedules.llava15_schedule(budget)
        except schedules.PioError as exc:
            raise SettingsError(f"PIO-FVLM setting --budget: {exc}") from None


def _pio():
    """The readable reference module (imports torch)."""
    return importlib.import_module("fsr.pruning.pio_fvlm")


def _fixed():
    """The exportable forms (imports torch)."""
    return importlib.import_module("fsr.pruning.pio_fvlm_fixed")


@register_method
class PioFvlm(PruningMethod):
    name = "pio-fvlm"
    summary = "PIO-FVLM: gradient-guided pruning inside the LLM (closed-form saliency, feature-space NMS)"
    Settings = PioSettings
    prunes_in = "llm"
    needs = ("tokens",)
    exportable = True
    reference_function = None
    onnx_op = None  # nothing in the vision graph without the encoder-side stage; the NMS is fsr.PioNms
    tensorrt_plugin = False
    near_tie_analysis = "pio-nms"  # fsr-compare replays the NMS on the reference's saliency

    # -- settings -----------------------------------------------------------------------------

    def budget(self, settings: PioSettings) -> int | None:
        if settings.pio_schedule is not None:
            return None
        return DEFAULT_BUDGET if settings.budget is None else settings.budget

    def with_budget(self, settings: PioSettings, budget: int) -> PioSettings:
        return settings.replace(budget=budget, pio_schedule=None, pio_encoder_tokens=None)

    def vision_tokens(self, settings: PioSettings, num_tokens: int) -> int:
        if settings.pio_encoder_tokens is None:
            return num_tokens
        _, per_window, n_global = schedules.encoder_stage_counts(num_tokens, settings.pio_encoder_tokens)
        return schedules.VE_WINDOWS ** 2 * per_window + n_global

    def kept_tokens(self, settings: PioSettings, num_tokens: int, num_layers: int | None = None) -> int:
        """The mean visual tokens per LLM layer (rounded; the schedule's budget without ``num_layers``)."""
        schedule = settings.schedule(num_tokens)
        if schedule is None:
            return num_tokens
        if num_layers is None:
            return min(self.budget(settings) or num_tokens, num_tokens)
        entering = self.vision_tokens(settings, num_tokens)
        stages = {st.layer: st.keep for st in schedule.stages}
        seen, n = [], entering
        for layer in range(num_layers):
            n = stages.get(layer, n)
            seen.append(n)
        return round(sum(seen) / num_layers)

    def is_identity(self, settings: PioSettings, num_tokens: int) -> bool:
        """A budget >= the image's tokens (no schedule: nothing pruned); an explicit schedule or the
        encoder-side stage always prunes."""
        try:
            return settings.schedule(num_tokens) is None
        except SettingsError:
            return False

    def manifest_details(self, settings: PioSettings) -> dict:
        """Beside the base's: the NMS node of its pruning graphs and the stages (``LAYER:TOKENS,...``);
        with the encoder-side stage, what the vision graph's ``kept_indices`` hold."""
        details = {**super().manifest_details(settings), "pruning_graph_op": "fsr::PioNms"}
        try:
            details["schedule"] = str(settings.schedule())
        except SettingsError:  # a budget no schedule is chosen for (>= the image's tokens): nothing pruned
            pass
        if settings.pio_encoder_tokens is not None:
            details["kept_indices"] = ("encoder-side stage: patch indices (0-based, raster order) of the kept "
                                       "tokens, ascending (each dropped token merged into its nearest kept one)")
        return details

    def describe(self, settings: PioSettings, num_tokens: int) -> str:
        schedule = settings.schedule(num_tokens)
        if schedule is None:
            return f"{self.name}, budget {settings.budget} (>= the image's tokens: the identity)"
        budget = self.budget(settings)
        what = f"budget {budget}, schedule {schedule}" if budget else f"schedule {schedule}"
        ve = f", encoder-side stage to {settings.pio_encoder_tokens} tokens" if settings.pio_encoder_tokens else ""
        return f"{self.name}, {what}{ve}"

    # -- the vision side: nothing, or the encoder-side stage ---------------------------------------

    def inputs(self, settings: PioSettings, relevance: bool) -> tuple[str, ...]:
        if settings is not None and settings.pio_encoder_tokens is not None:
            return ("tokens", "saliency", "early_saliency")
        return ("tokens",)

    def outputs(self, settings: PioSettings | None = None) -> tuple[str, ...]:
        if settings is not None and settings.pio_encoder_tokens is not None:
            return ("image_tokens", "kept_indices")
        return ("image_tokens",)

    def reference(self, settings: PioSettings):
        """The vision side's readable reference: the tokens as they are, or the encoder-side stage
        (`encoder_stage_reference`, per row)."""
        if settings.pio_encoder_tokens is None:
            return lambda inputs: (inputs["tokens"], None)
        import torch

        stage = self.load("fsr.pruning.pio_fvlm:encoder_stage_reference")

        def run(inputs):
            rows = [stage(local, glob, tokens, settings.pio_encoder_tokens) for local, glob, tokens in
                    zip(inputs["early_saliency"], inputs["saliency"], inputs["tokens"])]
            return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

        return run

    def has_reference(self) -> bool:
        return True

    def torch_module(self, settings: PioSettings, *, relevance: bool):
        if settings.pio_encoder_tokens is None:
            return self.load("fsr.pruning.modules:PassThrough")()
        return _EncoderStageModule(self, settings)

    def attach(self, graph, settings: PioSettings, *, relevance: bool):
        if settings.pio_encoder_tokens is None:
            select_outputs = self.load("fsr.graph_passes.select_outputs:select_outputs")
            return select_outputs(graph, {"tokens": "image_tokens"})
        splice = self.load("fsr.pruning.pio_encoder_onnx:splice_pio_encoder_stage")
        return splice(graph, keep=settings.pio_encoder_tokens)

    # -- inside the LLM ---------------------------------------------------------------------------

    def llm_stages(self, settings: PioSettings, *, num_layers: int, num_visual: int) -> list[LlmStage]:
        if settings.pio_schedule is None and (settings.budget or DEFAULT_BUDGET) >= num_visual:
            return []
        try:
            schedule = settings.schedule()
        except SettingsError as exc:
            raise MethodError(str(exc)) from None
        stages_only = schedules.PioSchedule(schedule.stages)
        try:
            stages_only.validate(num_layers=num_layers, num_visual=num_visual)
        except schedules.PioError as exc:
            raise MethodError(f"PIO-FVLM schedule {schedule} cannot run on this model: {exc}") from None
        return [LlmStage(st.layer, n, keep) for st, (n, keep) in zip(schedule.stages,
                                                                   stages_only.token_counts(num_visual))]

    def pruning_graph(self, settings: PioSettings, stage: LlmStage, *, language_model, lm_head,
                      form: str) -> PruningGraph:
        fixed, pio = _fixed(), _pio()
        proxy = pio.PioProxy.from_language_model(language_model, lm_head, stage.layer)
        options = dict(num_visual=stage.num_visual, keep=stage.keep, tau=settings.tau)
        if form == "reference":
            module = pio.PioStageReference(proxy, **options)
        else:
            module = fixed.PioPruningStage(proxy, **options)
        nms = importlib.import_module("fsr.pruning.pio_nms_onnx")
        return PruningGraph(
            module.eval(), list(fixed.PioPruningStage.INPUTS), list(fixed.PioPruningStage.OUTPUTS),
            example_inputs=lambda: fixed.stage_example_inputs(fixed.PioPruningStage(proxy, **options)),
            dynamic_shapes=fixed.stage_dynamic_shapes(stage.num_visual),
            translation_table=nms.pio_nms_translation_table, finish=_finish_stage(fixed, module))

    def reference_generate(self, settings: PioSettings, *, language_model, lm_head, embed_tokens, inputs_embeds,
                           image_span, max_new_tokens: int, eos_token_ids=()):
        pio = _pio()
        schedule = settings.schedule(image_span[1])
        if schedule is None:
            raise MethodError(f"PIO-FVLM at budget {settings.budget} keeps every one of the {image_span[1]} image "
                              "tokens: nothing to prune")
        result = pio.pio_generate_reference(
            language_model, lm_head, inputs_embeds, tuple(image_span), pio.PioSchedule(schedule.stages),
            max_new_tokens=max_new_tokens, embed_tokens=embed_tokens, eos_token_ids=tuple(eos_token_ids),
            tau=settings.tau)
        return result.token_ids, [r.kept_original for r in result.stages]

    def reference_step_logits(self, settings: PioSettings, *, language_model, lm_head, embed_tokens, inputs_embeds,
                              image_span, continuation):
        pio = _pio()
        schedule = settings.schedule(image_span[1])
        if schedule is None:
            return None
        return pio.pio_teacher_forced_logits(language_model, lm_head, inputs_embeds, tuple(image_span),
                                             pio.PioSchedule(schedule.stages), list(continuation),
                                             embed_tokens=embed_tokens, tau=settings.tau)


def _finish_stage(fixed, module):
    """After tracing: the fsr.PioNms function into the model, and the stage's constants as metadata."""

    def finish(model):
        from fsr.pruning.pio_nms_onnx import add_pio_nms_function

        add_pio_nms_function(model)
        if isinstance(module, fixed.PioPruningStage):
            for key, value in fixed.stage_metadata(module).items():
                model.metadata_props.add(key=key, value=value)
        return model

    return finish


def _EncoderStageModule(method: PioFvlm, settings: PioSettings):
    """The encoder-side stage's fixed-shape module (``torch`` form of the vision graph)."""
    return _fixed().PioEncoderTokens(keep=settings.pio_encoder_tokens)
