"""The PyTorch reference pipeline: the same host-side steps as ``Pipeline`` (`HostSteps`), with
the source model's PyTorch modules from the family's spec, the method's readable reference
in the vision graph, and Hugging Face ``generate``.

An export (ONNX Runtime / TensorRT) must generate exactly what this generates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fsr.manifest import Manifest, read_manifest
from fsr.models import ModelError, get_spec
from fsr.models.parts import ClipTextEncoder, VisionTower
from fsr.models.spec import CLIP_RELEVANCE, REFERENCE, ImageFeatures, LoadedModel, Request, prune_graph_name
from fsr.runtime.pipeline import GenerationResult, HostSteps, kept_per_row


class ReferencePipeline(HostSteps):
    """``loaded`` run as ``manifest`` plans (method, settings, relevance), in PyTorch."""

    def __init__(self, loaded: LoadedModel, manifest: Manifest, *, device: str = "cpu", eos: set[int] | None = None):
        self.loaded, self.device = loaded, torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        spec = get_spec(manifest.family)
        if manifest.relevance.source == CLIP_RELEVANCE and loaded.clip is None:
            raise ModelError("this export's relevance comes from CLIP, but the model has no CLIP text tower; load the "
                             "model with its clip/ folder")
        if eos is None:
            configured = self.model.generation_config.eos_token_id  # as saved in generation_config.json
            eos = set(configured if isinstance(configured, list) else [configured]) if configured is not None \
                else {loaded.processor.tokenizer.eos_token_id}
        self._init_host(manifest, loaded.processor, loaded.clip_tokenizer, eos)
        self.torch_dtype = next(self.model.parameters()).dtype
        self.dtype = torch.empty(0, dtype=self.torch_dtype).numpy().dtype  # the model's own, not the export's
        vision = spec.vision_graph(loaded, manifest, REFERENCE)
        self.vision_module = vision.module.to(self.device).eval()
        self.vision_output_names = vision.output_names
        self.vision_input_names = vision.input_names
        self.prune_graphs = {name: spec.prune_graph(loaded, manifest, name, REFERENCE)
                             for name in spec.prune_graph_names(loaded.config, manifest)}
        self.embedding = spec.embedding(loaded).eval()
        clip = loaded.clip.to(self.device).eval() if loaded.clip is not None else None
        self.text_encoder = ClipTextEncoder(clip).eval() if clip is not None else None
        self._towers: dict[tuple, VisionTower] = {}

    @classmethod
    def from_export(cls, export_dir, device: str = "cpu", manifest: Manifest | None = None) -> "ReferencePipeline":
        """The reference for an export: its ``source/`` model with its method and settings (float32)."""
        export_dir = Path(export_dir)
        manifest = manifest or read_manifest(export_dir)
        source = manifest.resolve(export_dir, manifest.source.folder)
        loaded = get_spec(manifest.family).load(str(source))
        return cls(loaded, manifest, device=device)

    def _t(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    # -- host steps' embeddings -------------------------------------------------------------

    @torch.no_grad()
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embedding(self._t(np.asarray(ids, np.int64))).cpu().numpy()

    @torch.no_grad()
    def encode_text(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.text_encoder(self._t(ids), self._t(mask)).float().cpu().numpy()

    # -- vision -----------------------------------------------------------------------------

    def tower(self, outputs: tuple[str, ...], relevance: str | None = None) -> VisionTower:
        """The vision tower up to the named outputs (for analyses over a method's inputs)."""
        relevance = relevance if relevance is not None else self.relevance
        key = (tuple(outputs), relevance)
        if key not in self._towers:
            self._towers[key] = self.spec.vision_tower(self.loaded, tuple(outputs), relevance).to(self.device)
        return self._towers[key]

    @torch.no_grad()
    def vision_outputs(self, request: Request, instruction_embeds: np.ndarray | None) -> dict[str, np.ndarray]:
        feeds = self.spec.vision_feeds(request.vision, instruction_embeds, self.dtype)
        args = [self._t(feeds[n]).to(self.torch_dtype) if feeds[n].dtype.kind == "f" else self._t(feeds[n])
                for n in self.vision_input_names]
        out = self.vision_module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {name: o.cpu().numpy() for name, o in zip(self.vision_output_names, out)}

    def vision(self, request: Request, instruction_embeds: np.ndarray | None) -> ImageFeatures:
        return self.spec.image_features(self.vision_outputs(request, instruction_embeds), request.vision,
                                        self.pruning_plan())

    @torch.no_grad()
    def prune_rows(self, budget: int, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The method's readable reference with this per-row budget on host-gathered rows."""
        graph = self.prune_graphs[prune_graph_name(budget)]
        args = [self._t(feeds[n]).to(self.torch_dtype) if feeds[n].dtype.kind == "f" else self._t(feeds[n])
                for n in graph.input_names]
        pruned, kept = graph.module(*args)
        return pruned.cpu().numpy(), kept.cpu().numpy()

    # -- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, images: list, prompts: list[str], *, raw: bool = False,
                 max_new_tokens: int = 32) -> list[GenerationResult]:
        request = self.prepare(images, prompts, raw)
        features = self.vision(request, self.instruction_embeds(request.instructions))
        inputs = self.assemble(request.rows, features)
        if self.method.prunes_in == "llm":
            return self._generate_pruning_llm(inputs, features, max_new_tokens)
        out = self.model.generate(inputs_embeds=self._t(inputs.inputs_embeds),
                                  attention_mask=self._t(inputs.attention_mask), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.pad_id, eos_token_id=sorted(self.eos))
        results = []
        for b in range(len(request.rows)):
            ids = cut_after_eos(out[b].tolist(), self.eos)
            kept = None if features.kept_indices is None else features.kept_indices[b]
            results.append(GenerationResult(ids, self.tokenizer.decode(ids, skip_special_tokens=True), kept))
        return results

    def _generate_pruning_llm(self, inputs, features: ImageFeatures, max_new_tokens: int) -> list[GenerationResult]:
        """Each row alone, unpadded, through the method's readable reference inside the LLM
        (`PruningMethod.reference_generate`: transformers' layers, the method between them)."""
        settings = self.method.settings_from_json(self.manifest.method.settings)
        lm, head = self.spec.language_model(self.loaded)
        results, stages = [], []
        for b, spans in enumerate(inputs.image_spans):
            pad = int((inputs.attention_mask[b] == 0).sum())
            if len(spans) != 1:
                raise ModelError(f"row {b} has {len(spans)} images; pruning inside the LLM takes one image per row")
            (start, length), = spans
            ids, kept = self.method.reference_generate(
                settings, language_model=lm, lm_head=head, embed_tokens=self.embedding,
                inputs_embeds=self._t(inputs.inputs_embeds[b, pad:]), image_span=(start - pad, length),
                max_new_tokens=max_new_tokens, eos_token_ids=sorted(self.eos))
            results.append(ids)
            stages.append(kept)
        kept = kept_per_row(features.kept_indices, stages)
        return [GenerationResult(ids, self.tokenizer.decode(ids, skip_special_tokens=True), kept[b])
                for b, ids in enumerate(results)]


def cut_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (drops the padding after it)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids
