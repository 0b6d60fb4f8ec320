"""The PyTorch reference pipeline: the same steps as ``Pipeline``, with the source model's
PyTorch modules, the readable FSR reference and Hugging Face ``generate``.

An export (ONNX Runtime / TensorRT) must generate exactly what this generates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fsr.export.manifest import read_manifest
from fsr.models.llava import CLIP_MAX_TOKENS, ClipTextEncoder, LoadedModel, TokenEmbedding, VisionPrefix, load_model
from fsr.runtime.inputs import (
    InputError, assemble_prefill, clip_chunks, format_prompt, instruction_text, load_image,
    tokenize_prompts,
)
from fsr.runtime.pipeline import GenerationResult


class ReferencePipeline:
    def __init__(self, loaded: LoadedModel, *, method: str = "fsr", budget: int | None = 64,
                 fsr: dict | None = None, relevance: str | None = "clip", device: str = "cpu"):
        self.loaded, self.method, self.budget = loaded, method, budget
        self.fsr = fsr or {}
        self.relevance = relevance if method != "none" else None
        self.device = torch.device(device)
        self.llava = loaded.llava.to(self.device).eval()
        self.processor = loaded.processor
        self.tokenizer = self.processor.tokenizer
        self.dtype = next(self.llava.parameters()).dtype
        clip = loaded.clip.to(self.device) if (self.relevance == "clip" and loaded.clip is not None) else None
        if self.relevance == "clip" and clip is None:
            raise InputError("relevance 'clip' needs the CLIP model; load the model with its clip/ folder")
        self.vision_prefix = VisionPrefix(self.llava, clip).eval()
        self.text_encoder = ClipTextEncoder(clip).eval() if clip is not None else None
        self.embedding = TokenEmbedding(self.llava).eval()
        eos = self.llava.generation_config.eos_token_id  # as saved in generation_config.json
        self.eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else {self.tokenizer.eos_token_id}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.clip_tokenizer = loaded.clip_tokenizer

    @classmethod
    def from_export(cls, export_dir, device: str = "cpu") -> "ReferencePipeline":
        """The reference for an export: its ``source/`` model with its method and settings."""
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        source = export_dir / manifest["source_model"]
        loaded = load_model(str(source))
        relevance = (manifest.get("relevance") or {}).get("source")
        return cls(loaded, method=manifest["method"], budget=manifest["budget"], fsr=manifest.get("fsr"),
                   relevance=relevance, device=device)

    def _t(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.no_grad()
    def instruction_embeds(self, instructions: list[str]) -> torch.Tensor | None:
        if self.relevance is None:
            return None
        rows = []
        for text in instructions:
            if self.relevance == "clip":
                ids, mask = clip_chunks(self.clip_tokenizer, text, CLIP_MAX_TOKENS)
                rows.append(self.text_encoder(self._t(ids), self._t(mask)).float().mean(0))
            else:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                rows.append(self.embedding(self._t(np.asarray([ids])))[0].float().mean(0) if ids else
                            torch.zeros(self.llava.config.text_config.hidden_size, device=self.device))
        return torch.stack(rows).to(self.dtype)

    @torch.no_grad()
    def image_tokens(self, pixel_values: np.ndarray, instructions: list[str]):
        """[B,K,H] image tokens for the LLM, and the kept indices (None without pruning)."""
        from fsr.pruning import focus_scan_refine_reference

        pixels = self._t(pixel_values).to(self.dtype)
        text = self.instruction_embeds(instructions)
        if text is None:
            text = torch.zeros(pixels.shape[0], self.vision_prefix.projector.linear_2.out_features,
                               dtype=self.dtype, device=self.device)
        tokens, features, saliency, relevance = self.vision_prefix(pixels, text)
        if self.method == "none":
            return tokens, None
        return focus_scan_refine_reference(
            tokens, features, saliency, relevance if self.relevance else None, budget=self.budget,
            **{k: self.fsr[k] for k in ("alpha", "beta", "rho", "kappa") if k in self.fsr})

    @torch.no_grad()
    def generate(self, images: list, prompts: list[str], *, raw: bool = False,
                 max_new_tokens: int = 32) -> list[GenerationResult]:
        pil = [load_image(im) for im in images]
        texts = [format_prompt(self.processor, p, raw) for p in prompts]
        rows = tokenize_prompts(self.tokenizer, texts, self.llava.config.image_token_id)
        pixels = self.processor.image_processor(images=pil, return_tensors="np")["pixel_values"]
        image_embeds, kept = self.image_tokens(pixels, [instruction_text(p) for p in prompts])
        embed = lambda ids: self.embedding(self._t(np.asarray(ids))).cpu().numpy()  # noqa: E731
        text_rows = [embed([r])[0] for r in rows]
        embeds, mask, _ = assemble_prefill(rows, text_rows, image_embeds.cpu().numpy(),
                                           self.llava.config.image_token_id, embed([[self.pad_id]])[0, 0])
        out = self.llava.generate(inputs_embeds=self._t(embeds), attention_mask=self._t(mask),
                                  max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                  eos_token_id=sorted(self.eos))
        results = []
        for b in range(len(rows)):
            ids = cut_after_eos(out[b].tolist(), self.eos)
            results.append(GenerationResult(ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                            None if kept is None else kept[b].tolist()))
        return results


def cut_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (drops the padding after it)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids
