"""The row a user would otherwise run: plain transformers ``generate`` (unpruned, SDPA attention) on the
same weights, timed like our pipeline and interleaved with it.

One run = one ``model.generate(**processor(images, text), max_new_tokens=N, min_new_tokens=N)``
(greedy, never stopping early). A streamer notes when each token is ready: **TTFT** is the time
from the call to the first new token (vision tower, projector, prefill, first argmax: everything
transformers does from preprocessed inputs, as our TTFT is), **decode ms/token** the mean time
per token after it. Inputs are the processor's output for the same synthetic images and prompt
our pipeline gets (image decoding and resizing left out on both sides).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fsr.manifest import read_manifest
from fsr.models import get_spec
from fsr.models.spec import TORCH_DTYPES, LoadedModel

LABEL = "transformers generate (unpruned, sdpa)"


class _Clock:
    """A transformers streamer that records when each ``put`` happens (the prompt, then each token)."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def put(self, value) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersGenerate:
    """``generate`` of the Hugging Face model of one benchmark's weights (``loaded.model``)."""

    label = LABEL

    def __init__(self, loaded: LoadedModel, family: str, device: str = "cpu", source: str | None = None):
        self.spec = get_spec(family)
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        if self.model.config._attn_implementation != "sdpa":
            self.model.set_attn_implementation("sdpa")
        self.processor = loaded.processor
        self.source = source or loaded.source
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_export(cls, export_dir: Path, device: str = "cpu") -> "TransformersGenerate":
        """From an export's ``source/`` checkpoint, in the export's dtype."""
        manifest = read_manifest(export_dir)
        source = manifest.resolve(export_dir, manifest.source.folder)
        loaded = get_spec(manifest.family).load(str(source), dtype=TORCH_DTYPES[manifest.dtype])
        return cls(loaded, manifest.family, device, source=str(source))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, images: list, prompt: str) -> dict:
        texts = [self.spec.format_prompt(self.processor, prompt) for _ in images]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}

    def run(self, inputs: dict, new_tokens: int) -> dict[str, float]:
        """Seconds to the first token and per later token; ``seq_len`` = the prompt length it prefilled."""
        clock = _Clock(self.sync)
        self.sync()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=self.pad_id, streamer=clock)
        first, last = clock.times[1], clock.times[-1]
        decode = (last - first) / (new_tokens - 1) if new_tokens > 1 else float("nan")
        return {"ttft": first - start, "decode_per_token": decode, "seq_len": int(inputs["input_ids"].shape[1])}
