"""Host-side inputs shared by every pipeline (exported graphs and PyTorch reference): images,
CLIP text chunks of an instruction, the checkpoint's end-of-sequence ids.

Prompt formatting, tokenization and the prefill assembly are the model spec's
(`fsr.models.spec.ModelSpec`), so that both pipelines feed their models identical numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fsr.errors import InputError


def load_image(image):
    """A PIL image from a path (or a PIL image as is), converted to RGB."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.exists():
        raise InputError(f"image {path} does not exist; pass the path of a PNG/JPEG/... file")
    if not path.is_file():
        raise InputError(f"image {path} is not a file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"image {path} cannot be read as an image ({exc}); pass a PNG, JPEG or other "
                         "format Pillow reads") from exc


def clip_chunks(tokenizer, text: str, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [C, max_tokens] and mask of ``text`` in chunks of ``max_tokens`` (BOS ... EOS, padded).

    Longer instructions are split into several chunks whose embeddings are averaged.
    """
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    width = max_tokens - 2
    chunks = [body[i:i + width] for i in range(0, len(body), width)] or [[]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((len(chunks), max_tokens), pad, dtype=np.int64)
    mask = np.zeros((len(chunks), max_tokens), dtype=np.int64)
    for c, chunk in enumerate(chunks):
        row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        ids[c, :len(row)] = row
        mask[c, :len(row)] = 1
    return ids, mask


def eos_token_ids(source: Path, tokenizer) -> set[int]:
    """EOS ids from the checkpoint's generation config (falls back to the tokenizer's)."""
    ids: set[int] = set()
    gen = Path(source) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
