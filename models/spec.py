"""The model spec: everything family-specific, in one object per family.

A family module (``fsr.models.llava``, ...) subclasses `ModelSpec`, registers it with
`fsr.models.registry.register_family` and implements what differs: presets and loading,
config checks, dims, the vision tower and projector. The base class does the rest
generically, so the exporter, the runtime back ends, ``fsr-compare`` and ``fsr-bench``
never read a model's attributes themselves:

=====================  =============================================================
loading                `load` (preset or checkpoint, refused before any weights are
                       built when the checkpoint is of another kind), `save_source`
dims                   `llm_dims`, `vision_dims`, `image_token_id`, `num_image_tokens`
graphs                 `graphs(loaded, manifest, form)` -> `GraphSpec` per graph: the
                       module traced for it, input/output names, dynamic axes, example
                       inputs; ``form`` = ``export`` (tower outputs; the method's op is
                       spliced after tracing), ``torch`` (the method's fixed-shape PyTorch
                       form inside) or ``reference`` (its readable reference inside)
where pruning attaches the vision tower's named outputs (``parts.VISION_OUTPUTS``) a
                       method reads, and the projector before or after the method's op
host side (numpy)      `format_prompt`, `tokenize`, `preprocess_images` (pixels for the
                       vision graph: one row per image, or per crop), `vision_feeds`,
                       `image_features` (vision outputs -> each image's embeddings),
                       `assemble_prefill` (text + image embeddings, left padding, masks,
                       positions, each row's image spans), `positions`
=====================  =============================================================

The manifest (`fsr.manifest.Manifest`) is the plan: the exporter describes the export
first (method, relevance, decoder segments), the spec turns that into graphs, and the
runtime's PyTorch back end turns the same manifest into the same modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn
from transformers.utils import logging as hf_logging

from fsr.errors import InputError
from fsr.manifest import SOURCE_DIR, LLMDims, Manifest, RelevanceInfo, VisionDims
from fsr.models.parts import (
    FUSED, LOGITS_INDEX, PORTABLE, ClipTextEncoder, DecoderStep, OpInputs, TokenEmbedding, VisionTower,
    VisionWithMethod,
)
from fsr.models.registry import ModelError, check_checkpoint, read_config, resolve_model_path
from fsr.pruning.methods import BEFORE_PROJECTOR, PER_CROP, LlmStage, get_method
from fsr.pruning.modules import ReferenceModule

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
EXPORT, TORCH, REFERENCE = "export", "torch", "reference"
#: the decoder's other exported form: fused attention for ONNX Runtime (`fsr.models.attention`)
ORT_FORM = "ort"
CLIP_RELEVANCE, LLM_RELEVANCE = "clip", "llm-embedding-mean"


@dataclasses.dataclass
class LoadedModel:
    """A model in memory, ready to export or run."""

    family: str
    model: nn.Module  # the Hugging Face model (e.g. LlavaForConditionalGeneration)
    processor: Any
    clip: nn.Module | None  # a CLIPModel whose vision tower is the model's, for instruction relevance
    source: str  # what the user asked for (preset:NAME, a folder, a hub id)
    path: str | None  # the resolved checkpoint folder; None for a preset built in memory
    preset: str | None = None
    clip_tokenizer: Any | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def random_weights(self) -> bool:
        return self.preset is not None


@dataclasses.dataclass
class GraphSpec:
    """One graph of an export: the module traced for it and how (see `ModelSpec.graphs`)."""

    name: str
    role: str  # "vision" | "embed" | "text_encoder" | "decoder" | "pruning"
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example_inputs: Callable[[], tuple] | None = None
    dynamic_shapes: tuple | None = None
    #: export form of the vision graph: the graph pass that puts the method's op in
    #: (onnx-graphsurgeon Graph -> Graph), and the projector traced after it when the
    #: method runs before the projector
    attach: Callable[[Any], Any] | None = None
    projector: nn.Module | None = None
    #: inputs with a default value, traced as keyword arguments (``example_kwargs``) and written
    #: as graph inputs that have an initializer (ONNX Runtime: overridable; TensorRT: a constant)
    optional_inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    example_kwargs: Callable[[], dict] | None = None
    #: ``torch.onnx.export`` custom translations the module's custom ops need
    translations: Callable[[], dict] | None = None
    #: other forms of this graph (same inputs, outputs and weights), written beside it and sharing
    #: its weight file: ``{"ort": <fused attention for ONNX Runtime>}`` for the decoder
    forms: dict[str, "GraphSpec"] = dataclasses.field(default_factory=dict)
    #: a pass over the exported ModelProto (a pruning graph's custom op and its ONNX function)
    finish: Callable[[Any], Any] | None = None


# ----------------------------------------------------------------------------- host-side records


@dataclasses.dataclass
class VisionBatch:
    """What the vision graph runs on: ``pixel_values`` has one row per image (or per crop:
    ``rows_per_image``), ``extra`` holds any other graph input, ``meta`` per-image facts
    (sizes, crop grid) the family's `ModelSpec.image_features` needs."""

    pixel_values: np.ndarray
    rows_per_image: list[int]
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    meta: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Request:
    """A preprocessed batch: one image and one prompt per row."""

    vision: VisionBatch
    rows: list[list[int]]  # token ids per row (chat-formatted, one image token each)
    instructions: list[str]  # the instruction text per row (relevance)


@dataclasses.dataclass
class ImageFeatures:
    """The LLM-side image embeddings: ``embeddings[b]`` holds row ``b``'s images, each
    [L, H] (L may differ between images); ``kept_indices[b]`` what the method kept (None
    without pruning; per crop for a multi-crop family)."""

    embeddings: list[list[np.ndarray]]
    kept_indices: list | None = None


@dataclasses.dataclass
class HostPruning:
    """A method's op run on rows the host gathered (a family with ``host_pruning``): ``run(budget,
    feeds)`` runs the export's ``prune_b<budget>`` graph on ``feeds`` (the method's ``inputs``, each
    [R, N, ...]) -> (pruned [R, K, D], kept_indices [R, K]); ``budget`` is the total per image and
    ``scope`` "crop" (one row per crop, the total split over them) or "image" (one row per image)."""

    run: Callable[[int, dict], tuple]
    inputs: tuple[str, ...]
    budget: int
    scope: str


@dataclasses.dataclass
class CropPruning:
    """A method's op ran in the vision graph on every crop row (a multi-crop family, a ``PER_CROP``
    method): the vision graph's ``image_tokens`` / ``kept_indices`` are per crop, and ``arrange(base,
    tiles, positions)`` (the method's `fsr.pruning.methods.PruningMethod.arrange_crops` with the
    export's settings) lays one image's crops out: ``base`` and each of ``tiles`` = ``(tokens [K, H],
    kept [K])``, ``positions[t]`` = tile ``t``'s patches' row-major indices on the stitched grid."""

    arrange: Callable[[tuple, list, list], np.ndarray]
    tokens_per_crop: int  # patches per crop (the vision dims'): a tile's side is its square root


def prune_graph_name(budget: int) -> str:
    """The export's graph that runs the method's op with this per-row budget (host pruning)."""
    return f"prune_b{budget}"


@dataclasses.dataclass
class PrefillInputs:
    """The prefill's inputs, left padded: ``inputs_embeds`` [B,S,H], ``attention_mask``
    [B,S], ``position_ids`` [B,S] (a family with multi-axis positions gives more leading
    axes), and ``image_spans[b]`` = (start, length) of each image's tokens in row ``b``."""

    inputs_embeds: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    image_spans: list[list[tuple[int, int]]]


# ----------------------------------------------------------------------------- the spec


class ModelSpec:
    """Base of every family's spec (see the module docstring)."""

    name: ClassVar[str] = ""  # set by register_family
    entry: ClassVar[Any] = None  # the registry's FamilyEntry
    presets: ClassVar[dict[str, Any]] = {}
    clip_subfolder: ClassVar[str] = "clip"  # where a CLIP model (relevance) sits in a checkpoint / source/
    clip_max_tokens: ClassVar[int | None] = None  # the CLIP text context (chunk length of instructions)
    #: True: the vision graph returns the tower's outputs per crop and the method's op runs in
    #: ``prune_b<budget>`` graphs on rows the host gathers (`image_features` with a `HostPruning`)
    #: (a ``PER_CROP`` method, `op_in_vision_graph`, runs in the vision graph per crop instead)
    host_pruning: ClassVar[bool] = False
    scopes: ClassVar[tuple[str, ...]] = ("crop", "image")  # pruning scopes (the same for one-crop families)

    # -- loading ----------------------------------------------------------------------------

    def load(self, model: str | None = None, *, clip: str | None = None, seed: int = 0,
             dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
        """A preset by name (``None``: the default preset) or a checkpoint folder / cached hub id."""
        hf_logging.disable_progress_bar()  # our CLIs show their own progress
        if model is None or model in self.presets:
            return self.build_preset(model or self.entry.default_preset, seed=seed, dtype=dtype, device=device)
        path = resolve_model_path(model)
        self.check_config(check_checkpoint(path, self.name), path)
        return self.load_checkpoint(path, source=model, clip=clip, dtype=dtype)

    def build_preset(self, name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: str = "cpu") -> LoadedModel:
        raise NotImplementedError

    def load_checkpoint(self, path, *, source: str, clip: str | None, dtype: torch.dtype) -> LoadedModel:
        raise NotImplementedError

    def check_config(self, config: dict, path) -> None:
        """Refuse (ModelError) a config.json whose sub-configs this family cannot export."""

    def check_clip(self, path) -> None:
        config = read_config(path)
        if config.get("model_type") != "clip":
            raise ModelError(f"{path} holds a {config.get('model_type')!r} checkpoint, not a CLIP model "
                             "(text tower + projections): pass the CLIP checkpoint the vision tower came from")

    def save_source(self, loaded: LoadedModel, folder, clip_folder: str | None) -> None:
        """Write model + processor (+ the CLIP model into ``clip_folder``) as standard HF folders."""
        folder.mkdir(parents=True, exist_ok=True)
        loaded.model.save_pretrained(folder)
        loaded.processor.save_pretrained(folder)
        if loaded.clip is not None and clip_folder is not None:
            loaded.clip.save_pretrained(folder / clip_folder)
            loaded.clip_tokenizer.save_pretrained(folder / clip_folder)

    # -- dims -------------------------------------------------------------------------------

    def text_config(self, config):
        return config.text_config

    def llm_dims(self, config) -> LLMDims:
        c = self.text_config(config)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return LLMDims(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                       num_kv_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=head_dim,
                       intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                       max_positions=getattr(c, "max_position_embeddings", None))

    def vision_dims(self, config) -> VisionDims:
        raise NotImplementedError

    def image_token_id(self, config) -> int:
        return int(config.image_token_id)

    def num_image_tokens(self, config) -> int:
        """Image tokens the LLM sees per image without pruning (the most, for variable layouts)."""
        return self.vision_dims(config).tokens_per_crop

    def relevance_info(self, loaded: LoadedModel, mode: str | None) -> RelevanceInfo:
        """How the instruction embedding is computed for a method's relevance ``mode`` (``auto``:
        CLIP when the model has a CLIP text tower, else the LLM-embedding fallback; ``clip``;
        ``llm``; None: no relevance)."""
        if mode is None:
            return RelevanceInfo()
        if mode == "clip" and loaded.clip is None:
            raise ModelError(
                "--relevance clip needs a CLIP model with a text tower: pass --clip PATH (the CLIP checkpoint the "
                "vision tower came from) or use --relevance llm")
        if mode == "llm" or loaded.clip is None:
            return RelevanceInfo(LLM_RELEVANCE)
        return RelevanceInfo(CLIP_RELEVANCE, self.clip_max_tokens, f"{SOURCE_DIR}/{self.clip_subfolder}")

    def relevance_width(self, loaded: LoadedModel, source: str | None) -> int:
        """Width of ``instruction_embeds`` for a relevance source."""
        if source == CLIP_RELEVANCE:
            return loaded.clip.config.projection_dim
        return self.llm_dims(loaded.config).hidden_size

    # -- other clients' layouts -------------------------------------------------------------

    #: whether Transformers.js (4.3.2) runs this family from `transformers_js_processor`'s files
    supports_transformers_js: ClassVar[bool] = False

    def transformers_js_processor(self, loaded: LoadedModel, kept_tokens: int) -> dict:
        """``processor_config.json`` for Transformers.js: its processor class and the keys that make it
        expand the image token to ``kept_tokens`` tokens (`fsr.export.transformers_js`)."""
        raise ModelError(f"the {self.name} family has no Transformers.js layout")

    # -- modules ----------------------------------------------------------------------------

    def vision_tower(self, loaded: LoadedModel, outputs: tuple[str, ...], relevance: str | None) -> VisionTower:
        """The tower up to the named ``outputs`` (see ``parts.VISION_OUTPUTS``)."""
        raise NotImplementedError

    def projector(self, loaded: LoadedModel) -> nn.Module:
        raise NotImplementedError

    def vision_example_inputs(self, loaded: LoadedModel, input_names: list[str], relevance: str | None,
                              dtype: torch.dtype) -> tuple:
        raise NotImplementedError

    def language_model(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        """(the decoder stack with ``layers``, ``rotary_emb``, ``norm``; the LM head)."""
        return loaded.model.model.language_model, loaded.model.lm_head

    def embedding(self, loaded: LoadedModel) -> nn.Module:
        return TokenEmbedding(loaded.model.get_input_embeddings())

    def decoder_step(self, loaded: LoadedModel, start: int, stop: int, attention: str = PORTABLE) -> DecoderStep:
        lm, head = self.language_model(loaded)
        try:
            return DecoderStep(lm, head, start, stop, attention=attention)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc

    # -- graphs -----------------------------------------------------------------------------

    def graphs(self, loaded: LoadedModel, manifest: Manifest, form: str = EXPORT) -> list[GraphSpec]:
        """Every graph ``manifest`` plans, in export order: vision, embed, text_encoder, decoder segments
        (each after the pruning graph that runs before it, if any)."""
        out = [self.vision_graph(loaded, manifest, form), self.embed_graph(loaded)]
        out += [self.prune_graph(loaded, manifest, name, form) for name in self.prune_graph_names(loaded.config, manifest)]
        if manifest.relevance.source == CLIP_RELEVANCE:
            out.append(self.text_encoder_graph(loaded, manifest))
        dtype = TORCH_DTYPES[manifest.dtype]
        # each segment's fused ONNX Runtime form shares the portable segment's weight file; a pruning
        # graph refers to the weights it shares with a segment there (`fsr.export.share`)
        for index, s in enumerate(manifest.decoder_segments):
            if s.prune_before:
                out.append(self.pruning_graph(loaded, manifest, index, form))
            out.append(self.decoder_graph(loaded, s.graph, *s.layers, dtype))
        return out

    def graph(self, loaded: LoadedModel, manifest: Manifest, name: str, form: str = EXPORT) -> GraphSpec:
        """One graph by name (the runtime's PyTorch back end builds them one at a time)."""
        if name == "vision":
            return self.vision_graph(loaded, manifest, form)
        if name == "embed":
            return self.embed_graph(loaded)
        if name in self.prune_graph_names(loaded.config, manifest):
            return self.prune_graph(loaded, manifest, name, form)
        if name == "text_encoder" and manifest.relevance.source == CLIP_RELEVANCE:
            return self.text_encoder_graph(loaded, manifest)
        for index, s in enumerate(manifest.decoder_segments):
            if s.graph == name:
                return self.decoder_graph(loaded, name, *s.layers, TORCH_DTYPES[manifest.dtype])
            if s.prune_before == name:
                return self.pruning_graph(loaded, manifest, index, form)
        raise ModelError(f"the {self.name} spec has no graph {name!r} in this export "
                         f"(it has {', '.join(manifest.graphs)})")

    def vision_graph(self, loaded: LoadedModel, manifest: Manifest, form: str = EXPORT) -> GraphSpec:
        method = get_method(manifest.method.name)
        settings = method.settings_from_json(manifest.method.settings)
        relevance = manifest.relevance.source
        inputs = method.inputs(settings, relevance is not None)
        before = method.placement == BEFORE_PROJECTOR
        tower = self.vision_tower(loaded, inputs, relevance)
        projector = self.projector(loaded) if before else None
        names = tower.input_names
        dtype = TORCH_DTYPES[manifest.dtype]
        batch = torch.export.Dim("batch")
        spec = GraphSpec("vision", "vision", tower, names, tower.output_names,
                         example_inputs=lambda: self.vision_example_inputs(loaded, names, relevance, dtype),
                         dynamic_shapes=tuple({0: batch} for _ in names))
        if not self.op_in_vision_graph(method):  # the tower per crop; the op (if any) runs in the prune graphs
            if method.prunes and before:
                raise ModelError(f"the {self.name} family prunes crops on the host after the projector; method "
                                 f"{method.name!r} runs before the projector and cannot be exported for it")
            return spec
        if form == EXPORT:
            spec.attach = lambda graph: method.attach(graph, settings, relevance=relevance is not None)
            spec.projector = projector
            return spec
        if form == TORCH:
            op = method.torch_module(settings, relevance=relevance is not None)
        elif form == REFERENCE:
            op = ReferenceModule(method.reference(settings), inputs)
        else:
            raise ValueError(f"unknown graph form {form!r}")
        spec.module = VisionWithMethod(tower, op, projector, num_inputs=len(inputs))
        spec.output_names = list(method.outputs(settings))
        return spec

    # -- pruning on host-gathered rows (families with ``host_pruning``) -------------------------

    def op_in_vision_graph(self, method) -> bool:
        """Whether ``method``'s op sits in the vision graph: always for a one-crop family; for a family
        with ``host_pruning``, only a pruning ``PER_CROP`` method (every crop row as the tower gives it;
        `image_features` then lays the crops out with the method's ``arrange_crops``). Otherwise the
        vision graph returns the tower's outputs per crop and the host lays them out (and runs a
        pruning method's op in ``prune_b<K>`` graphs: `prunes_on_host`)."""
        return not self.host_pruning or (method.prunes and method.multi_crop == PER_CROP)

    def prunes_on_host(self, method) -> bool:
        """Whether ``method``'s op runs on host-gathered rows (``prune_b<K>`` graphs)."""
        return method.prunes and not self.op_in_vision_graph(method)

    def prunes_per_crop(self, method) -> bool:
        """Whether a multi-crop family runs ``method``'s op on every crop row in the vision graph."""
        return self.host_pruning and method.prunes and self.op_in_vision_graph(method)

    def crop_pruning(self, manifest: Manifest) -> CropPruning | None:
        """How `image_features` lays out crops the export's method already pruned in the vision graph
        (`prunes_per_crop`), else None."""
        method = get_method(manifest.method.name)
        if not self.prunes_per_crop(method):
            return None
        settings = method.settings_from_json(manifest.method.settings)
        return CropPruning(lambda base, tiles, positions: method.arrange_crops(settings, base, tiles, positions),
                           manifest.vision.tokens_per_crop)

    def kept_image_tokens(self, config, method, settings, num_layers: int | None = None) -> int:
        """Image tokens the LLM sees per image with the method (the most, for variable layouts; a method
        that prunes inside the LLM: the mean over its ``num_layers`` layers)."""
        return method.kept_tokens(settings, self.num_image_tokens(config), num_layers)

    def describe_method(self, config, method, settings) -> str:
        """The method and its settings in one line, for this family (``fsr-export``'s last line)."""
        return method.describe(settings, self.num_image_tokens(config))

    def method_details(self, config, method, settings) -> dict:
        """What the manifest's ``method.details`` records about the method in this family, beside the
        method's own `manifest_details` (a multi-crop family: where the budget applies)."""
        return {}

    def pruning_budgets(self, config, budget: int, scope: str) -> list[int]:
        """Every per-row budget a total of ``budget`` per image needs in ``scope``."""
        return [budget]

    def prune_graph_names(self, config, manifest: Manifest) -> list[str]:
        """The export's ``prune_b<budget>`` graphs (none unless the family prunes in the vision graph's
        place on the host)."""
        method = get_method(manifest.method.name)
        if not self.prunes_on_host(method):
            return []
        settings = method.settings_from_json(manifest.method.settings)
        return [prune_graph_name(b) for b in self.pruning_budgets(config, method.budget(settings),
                                                                  method.scope(settings))]

    def prune_graph(self, loaded: LoadedModel, manifest: Manifest, name: str, form: str = EXPORT) -> GraphSpec:
        """The method's op alone with the budget in the graph's name, on rows of any token count
        (inputs: the method's tower outputs [R, N, ...])."""
        method = get_method(manifest.method.name)
        relevance = manifest.relevance.source
        settings = method.with_budget(method.settings_from_json(manifest.method.settings),
                                      int(name.removeprefix(prune_graph_name(0)[:-1])))
        inputs = list(method.inputs(settings, relevance is not None))
        tower = self.vision_tower(loaded, tuple(inputs), relevance)
        example_names = tower.input_names
        dtype = TORCH_DTYPES[manifest.dtype]

        def example():
            with torch.no_grad():
                out = tower(*self.vision_example_inputs(loaded, example_names, relevance, dtype)[:len(example_names)])
            out = out if isinstance(out, tuple) else (out,)
            return tuple(o.contiguous() for o in out[:len(inputs)])

        batch, tokens = torch.export.Dim("batch"), torch.export.Dim("num_tokens", min=2)
        spec = GraphSpec(name, "prune", OpInputs(), inputs, list(inputs), example_inputs=example,
                         dynamic_shapes=(tuple({0: batch, 1: tokens} for _ in inputs),))  # forward(*inputs)
        if form == EXPORT:
            spec.attach = lambda graph: method.attach(graph, settings, relevance=relevance is not None)
            return spec
        if form == TORCH:
            spec.module = method.torch_module(settings, relevance=relevance is not None)
        elif form == REFERENCE:
            spec.module = ReferenceModule(method.reference(settings), tuple(inputs))
        else:
            raise ValueError(f"unknown graph form {form!r}")
        spec.output_names = list(method.outputs(settings))
        return spec

    def pruning_graph(self, loaded: LoadedModel, manifest: Manifest, index: int, form: str = EXPORT) -> GraphSpec:
        """The graph that prunes before decoder segment ``index`` (a method that prunes inside the LLM),
        built by the method on this family's LLM modules (shared with the decoder segments, never copied)."""
        method = get_method(manifest.method.name)
        settings = method.settings_from_json(manifest.method.settings)
        segments = manifest.decoder_segments
        segment = segments[index]
        if index == 0 or not segment.prune_before:
            raise ModelError(f"decoder segment {segment.graph!r} has no pruning graph before it")
        lm, head = self.language_model(loaded)
        stage = LlmStage(segment.layers[0], segments[index - 1].image_tokens, segment.image_tokens)
        part = method.pruning_graph(settings, stage, language_model=lm, lm_head=head, form=form)
        return GraphSpec(segment.prune_before, "pruning", part.module, list(part.input_names),
                         list(part.output_names), example_inputs=part.example_inputs,
                         dynamic_shapes=part.dynamic_shapes, translations=part.translation_table,
                         finish=part.finish)

    def embed_graph(self, loaded: LoadedModel) -> GraphSpec:
        seq = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
        return GraphSpec("embed", "embed", self.embedding(loaded), ["input_ids"], ["inputs_embeds"],
                         example_inputs=lambda: (torch.tensor([[1, 2, 3], [4, 5, 6]]),), dynamic_shapes=(seq,))

    def text_encoder_graph(self, loaded: LoadedModel, manifest: Manifest) -> GraphSpec:
        width = manifest.relevance.text_max_tokens
        batch = {0: torch.export.Dim("batch")}

        def example():
            ids = torch.ones(2, width, dtype=torch.long)
            return ids, torch.ones_like(ids)

        return GraphSpec("text_encoder", "text_encoder", ClipTextEncoder(loaded.clip),
                         ["input_ids", "attention_mask"], ["text_embeds"], example_inputs=example,
                         dynamic_shapes=(batch, batch))

    def decoder_graph(self, loaded: LoadedModel, name: str, start: int, stop: int, dtype: torch.dtype,
                      attention: str = PORTABLE) -> GraphSpec:
        """A decoder segment: the portable form, its ``forms`` holding the fused ONNX Runtime one (the
        fused form itself: ``attention=FUSED``)."""
        step = self.decoder_step(loaded, start, stop, attention)
        llm = self.llm_dims(loaded.config)
        n_past = 2 * (stop - start)

        def example():
            b, s, p = 2, 3, 4  # batch 2: a batch-1 example would fix the batch to 1
            past = tuple(torch.randn(b, llm.num_kv_heads, p, llm.head_dim, dtype=dtype) for _ in range(n_past))
            return (torch.randn(b, s, llm.hidden_size, dtype=dtype), torch.ones(b, p + s, dtype=torch.long),
                    torch.arange(p, p + s).repeat(b, 1), *past)

        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        past_len, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
        # keyed by the forward's parameter names (``inputs_embeds`` is the hidden states of a later segment)
        dynamic = {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                   "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in range(n_past))}
        optional, example_kwargs = {}, None
        if step.is_last:
            optional = {LOGITS_INDEX: np.array([-1], dtype=np.int64)}
            dynamic[LOGITS_INDEX] = {0: torch.export.Dim("logits")}

            def example_kwargs():
                return {LOGITS_INDEX: torch.tensor([0, 2])}

        spec = GraphSpec(name, "decoder", step, step.input_names, step.output_names, example_inputs=example,
                         dynamic_shapes=dynamic, optional_inputs=optional, example_kwargs=example_kwargs)
        if attention == FUSED:
            from fsr.models.attention import gqa_translation_table

            spec.translations = gqa_translation_table
        else:
            spec.forms = {ORT_FORM: self.decoder_graph(loaded, name, start, stop, dtype, FUSED)}
        return spec

    # -- host side --------------------------------------------------------------------------

    def image_token(self, processor) -> str:
        return processor.image_token

    def format_prompt(self, processor, prompt: str, raw: bool = False) -> str:
        """The text the LLM sees: the chat template around the prompt, or the prompt as given (``raw``)."""
        image = self.image_token(processor)
        count = prompt.count(image)
        if raw:
            if count != 1:
                raise InputError(
                    f"with --raw the prompt is used as given and must contain the image token {image} exactly "
                    f"once (found {count}); add {image} where the image goes, or drop --raw to use the chat "
                    "template")
            return prompt
        if count:
            raise InputError(f"the prompt contains {image}; the chat template places the image itself: remove it, "
                             "or pass --raw to use your prompt as given")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    def instruction_text(self, processor, prompt: str) -> str:
        """The instruction a relevance term is computed from: the prompt without the image token."""
        return " ".join(prompt.replace(self.image_token(processor), " ").split())

    def tokenize(self, processor, texts: list[str], image_token_id: int) -> list[list[int]]:
        rows = [processor.tokenizer(t)["input_ids"] for t in texts]
        for t, row in zip(texts, rows):
            if row.count(image_token_id) != 1:
                raise InputError(f"prompt {t!r} must tokenize to exactly one image token")
        return rows

    def benchmark_image_size(self, processor) -> int | None:
        """The side of the square images ``fsr-bench`` feeds (None: the vision tower's input size)."""
        return None

    def preprocess_images(self, processor, images: list) -> VisionBatch:
        """PIL images -> the vision graph's pixels (one row per image here)."""
        pixels = processor.image_processor(images=images, return_tensors="np")["pixel_values"]
        return VisionBatch(pixels, [1] * len(images))

    def vision_feeds(self, batch: VisionBatch, instruction_embeds: np.ndarray | None, dtype) -> dict[str, np.ndarray]:
        """The vision graph's feeds; the instruction embedding of each image goes to each of its rows."""
        feeds = {"pixel_values": batch.pixel_values.astype(dtype), **batch.extra}
        if instruction_embeds is not None:
            feeds["instruction_embeds"] = np.repeat(instruction_embeds, batch.rows_per_image, axis=0).astype(dtype)
        return feeds

    def image_features(self, outputs: dict[str, np.ndarray], batch: VisionBatch,
                       prune: HostPruning | CropPruning | None = None) -> ImageFeatures:
        """The vision graph's outputs -> each row's image embeddings (one image per row here;
        ``prune`` is for families with ``host_pruning``: the op on host-gathered rows, or the layout of
        crops a ``PER_CROP`` method pruned in the vision graph)."""
        tokens = outputs["image_tokens"]
        kept = outputs.get("kept_indices")
        return ImageFeatures([[tokens[b]] for b in range(tokens.shape[0])],
                             None if kept is None else [kept[b].tolist() for b in range(kept.shape[0])])

    def assemble_prefill(self, rows: list[list[int]], text_embeds: list[np.ndarray],
                         images: list[list[np.ndarray]], image_token_id: int, pad_embed: np.ndarray) -> PrefillInputs:
        """Left-padded prefill input: each image token of a row replaced by that image's embeddings.

        ``text_embeds[b]`` holds the embeddings of ``rows[b]`` ([L_b, H]); ``images[b]`` the
        row's images in order, each [K_i, H] (K_i may differ from image to image and row to
        row). Positions come from `positions`.
        """
        seqs, spans = [], []
        for b, row in enumerate(rows):
            at = [i for i, t in enumerate(row) if t == image_token_id]
            if len(at) != len(images[b]):
                raise InputError(f"row {b} has {len(at)} image token(s) for {len(images[b])} image(s)")
            parts, row_spans, cursor, length = [], [], 0, 0
            for position, image in zip(at, images[b]):
                parts.append(text_embeds[b][cursor:position])
                length += position - cursor
                row_spans.append((length, int(image.shape[0])))
                parts.append(image.astype(text_embeds[b].dtype, copy=False))
                length += image.shape[0]
                cursor = position + 1
            parts.append(text_embeds[b][cursor:])
            seqs.append(np.concatenate(parts, axis=0))
            spans.append(row_spans)
        width = max(s.shape[0] for s in seqs)
        hidden = seqs[0].shape[-1]
        embeds = np.broadcast_to(pad_embed, (len(seqs), width, hidden)).astype(seqs[0].dtype)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for b, s in enumerate(seqs):
            pad = width - s.shape[0]
            embeds[b, pad:] = s
            mask[b, pad:] = 1
            spans[b] = [(start + pad, length) for start, length in spans[b]]
        return PrefillInputs(embeds, mask, self.positions(mask, spans), spans)

    def positions(self, mask: np.ndarray, spans: list[list[tuple[int, int]]]) -> np.ndarray:
        """1-D positions: the cumulative sum of the mask minus one; padding gets 1 (as Hugging
        Face ``generate`` does)."""
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        return positions

    def next_positions(self, last: np.ndarray) -> np.ndarray:
        """Positions of the next decode step from the last ones ([B] -> [B, 1])."""
        return (last + 1)[:, None].astype(np.int64)
