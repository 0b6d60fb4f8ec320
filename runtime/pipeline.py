"""End-to-end generation from an export: image + prompt -> text, on any backend.

    pipe = Pipeline("exports/llava-tiny-fsr-b64")            # ONNX Runtime
    [result] = pipe.generate(["cat.png"], ["What is this?"], max_new_tokens=16)
    result.token_ids, result.text

Steps: image preprocessing with the saved processor; prompt formatting with the chat
template; the instruction embedding for FSR's relevance (CLIP text graph, or the mean
LLM input embedding); the vision graph (tower + FocusScanRefine); the image token
expanded to the K kept embeddings; prefill; greedy decoding with the KV cache until
EOS or ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from fsr.export.manifest import read_manifest
from fsr.runtime.backend import get_backend
from fsr.runtime.inputs import (
    InputError, assemble_prefill, clip_chunks, eos_token_ids, format_prompt, instruction_text, load_image,
    tokenize_prompts,
)

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    kept_indices: list[int] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"token_ids": self.token_ids, "text": self.text}


class Pipeline:
    """Runs an export's graphs on one backend (``ort`` or ``trt``)."""

    def __init__(self, export_dir, backend: str = "ort", verify: bool = True, **backend_options):
        from transformers import AutoProcessor, AutoTokenizer

        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir, verify=verify)
        source = self.export_dir / self.manifest["source_model"]
        self.processor = AutoProcessor.from_pretrained(source)
        self.tokenizer = self.processor.tokenizer
        self.eos = eos_token_ids(source, self.tokenizer)
        self.dtype = NP_DTYPES[self.manifest["dtype"]]
        self.backend = get_backend(backend, self.export_dir, self.manifest, **backend_options)
        graphs = self.manifest["graphs"]
        self.segments = [s["graph"] for s in self.manifest["decoder_segments"]]
        names = ["vision", "embed", *self.segments] + (["text_encoder"] if "text_encoder" in graphs else [])
        self.runners = {n: self.backend.runner(n).activate() for n in names}
        relevance = (self.manifest.get("relevance") or {}).get("source")
        self.relevance = relevance
        self.clip_tokenizer = AutoTokenizer.from_pretrained(source / "clip") if relevance == "clip" else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- steps ---------------------------------------------------------------------------

    def _run(self, graph: str, feeds: dict) -> dict:
        return self.runners[graph].infer({k: self.backend.from_host(v) if isinstance(v, np.ndarray) else v
                                          for k, v in feeds.items()})

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.backend.to_host(self._run("embed", {"input_ids": ids.astype(np.int64)})["inputs_embeds"])

    def instruction_embeds(self, instructions: list[str]) -> np.ndarray | None:
        if "instruction_embeds" not in self.runners["vision"].input_names:
            return None
        rows = []
        if self.relevance == "clip":
            width = self.manifest["relevance"]["text_max_tokens"]
            for text in instructions:
                ids, mask = clip_chunks(self.clip_tokenizer, text, width)
                out = self._run("text_encoder", {"input_ids": ids, "attention_mask": mask})["text_embeds"]
                rows.append(self.backend.to_host(out).astype(np.float32).mean(axis=0))
        else:
            for text in instructions:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if ids:
                    rows.append(self.embed(np.asarray([ids]))[0].astype(np.float32).mean(axis=0))
                else:
                    rows.append(np.zeros(self.manifest["llm"]["hidden_size"], np.float32))
        return np.stack(rows).astype(self.dtype)

    def vision(self, pixel_values: np.ndarray, instruction_embeds: np.ndarray | None):
        feeds = {"pixel_values": pixel_values.astype(self.dtype)}
        if instruction_embeds is not None:
            feeds["instruction_embeds"] = instruction_embeds
        out = self._run("vision", feeds)
        kept = out.get("kept_indices")
        return self.backend.to_host(out["image_tokens"]), None if kept is None else self.backend.to_host(kept)

    def decoder(self, embeds, mask: np.ndarray, positions: np.ndarray, pasts: list[list]):
        hidden, presents = embeds, []
        for segment, past in zip(self.segments, pasts):
            runner = self.runners[segment]
            feeds = {runner.input_names[0]: hidden, "attention_mask": mask, "position_ids": positions}
            feeds.update(zip(runner.input_names[3:], past))
            out = self._run(segment, feeds)
            hidden = out[runner.output_names[0]]
            presents.append([out[n] for n in runner.output_names[1:]])
        return hidden, presents

    def prefill_inputs(self, rows: list[list[int]], image_embeds: np.ndarray):
        """Embed the prompts (one left-padded call) and expand each image token to its K image
        embeddings: ``inputs_embeds``, ``attention_mask``, ``position_ids`` for the prefill."""
        width = max(len(r) for r in rows)
        padded = np.asarray([[self.pad_id] * (width - len(r)) + r for r in rows])
        text_embeds = self.embed(padded)
        text_rows = [text_embeds[b, width - len(r):] for b, r in enumerate(rows)]
        pad_embed = self.embed(np.asarray([[self.pad_id]]))[0, 0]
        return assemble_prefill(rows, text_rows, image_embeds.astype(self.dtype),
                                self.manifest["image_token_id"], pad_embed)

    def empty_cache(self, batch: int) -> list[list]:
        llm = self.manifest["llm"]
        shape = (batch, llm["num_kv_heads"], 0, llm["head_dim"])
        pasts = []
        for segment in self.segments:
            n = len(self.runners[segment].input_names) - 3
            pasts.append([self.backend.from_host(np.zeros(shape, self.dtype)) for _ in range(n)])
        return pasts

    # -- public API ----------------------------------------------------------------------

    def prepare(self, images: list, prompts: list[str], raw: bool = False):
        """Validate and preprocess: pixel values, token rows, instructions."""
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} image(s) for {len(prompts)} prompt(s); pass one image per prompt")
        if not prompts:
            raise InputError("no prompt given")
        pil = [load_image(im) for im in images]
        texts = [format_prompt(self.processor, p, raw) for p in prompts]
        rows = tokenize_prompts(self.tokenizer, texts, self.manifest["image_token_id"])
        pixels = self.processor.image_processor(images=pil, return_tensors="np")["pixel_values"]
        return pixels, rows, [instruction_text(p) for p in prompts]

    def generate(self, images: list, prompts: list[str], *, raw: bool = False,
                 max_new_tokens: int = 32) -> list[GenerationResult]:
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        t0 = time.perf_counter()
        pixels, rows, instructions = self.prepare(images, prompts, raw)
        timings: dict[str, float] = {}

        t = time.perf_counter()
        image_embeds, kept = self.vision(pixels, self.instruction_embeds(instructions))
        timings["vision_s"] = time.perf_counter() - t

        embeds, mask, positions = self.prefill_inputs(rows, image_embeds)

        batch = len(rows)
        t = time.perf_counter()
        logits, pasts = self.decoder(embeds, mask, positions, self.empty_cache(batch))
        timings["prefill_s"] = time.perf_counter() - t
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        last_pos = positions[:, -1]
        t = time.perf_counter()
        for step in range(max_new_tokens):
            next_ids = self.backend.to_host(logits)[:, -1].astype(np.float32).argmax(-1)
            for b in range(batch):
                if not done[b]:
                    generated[b].append(int(next_ids[b]))
                    done[b] = int(next_ids[b]) in self.eos
            if done.all() or step == max_new_tokens - 1:
                break
            next_ids = np.where(done, self.pad_id, next_ids)[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            last_pos = last_pos + 1
            logits, pasts = self.decoder(self.embed(next_ids), mask, last_pos[:, None].astype(np.int64), pasts)
        timings["decode_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        return [
            GenerationResult(ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                             None if kept is None else kept[b].tolist(), dict(timings))
            for b, ids in enumerate(generated)
        ]
