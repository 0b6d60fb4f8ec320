"""Host-side input preparation shared by every pipeline (exported graphs and PyTorch reference).

Images, prompts, the instruction text that drives FSR's relevance term, and the
assembly of the LLM's prefill input (image token expanded to K embeddings, left
padding, positions) live here once, so the ONNX Runtime / TensorRT pipeline and the
PyTorch reference pipeline feed their models identical numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fsr.errors import FsrError
from fsr.models.tokenizer import IMAGE


class InputError(FsrError, ValueError):
    """A bad image or prompt; the message names the problem and the fix."""


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


def format_prompt(processor, prompt: str, raw: bool = False) -> str:
    """The text the LLM sees: the chat template around the prompt, or the prompt as given (``raw``)."""
    count = prompt.count(IMAGE)
    if raw:
        if count != 1:
            raise InputError(
                f"with --raw the prompt is used as given and must contain the image token {IMAGE} exactly once "
                f"(found {count}); add {IMAGE} where the image goes, or drop --raw to use the chat template")
        return prompt
    if count:
        raise InputError(f"the prompt contains {IMAGE}; the chat template places the image itself: remove it, "
                         "or pass --raw to use your prompt as given")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def instruction_text(prompt: str) -> str:
    """The instruction FSR's relevance term is computed from: the prompt without the image token."""
    return " ".join(prompt.replace(IMAGE, " ").split())


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


def tokenize_prompts(tokenizer, texts: list[str], image_token_id: int) -> list[list[int]]:
    rows = [tokenizer(t)["input_ids"] for t in texts]
    for t, row in zip(texts, rows):
        if row.count(image_token_id) != 1:
            raise InputError(f"prompt {t!r} must tokenize to exactly one image token")
    return rows


def assemble_prefill(rows: list[list[int]], text_embeds: list[np.ndarray], image_embeds: np.ndarray,
                     image_token_id: int, pad_embed: np.ndarray):
    """Left-padded prefill input: each row's image token replaced by its K image embeddings.

    ``text_embeds[b]`` holds the embeddings of ``rows[b]`` ([L_b, H]); ``image_embeds`` is
    [B, K, H]. Returns ``inputs_embeds`` [B,S,H], ``attention_mask`` [B,S] int64 and
    ``position_ids`` [B,S] int64 (cumulative sum of the mask minus one; padding gets 1,
    as Hugging Face ``generate`` does).
    """
    seqs = []
    for b, row in enumerate(rows):
        at = row.index(image_token_id)
        seqs.append(np.concatenate([text_embeds[b][:at], image_embeds[b], text_embeds[b][at + 1:]], axis=0))
    length = max(s.shape[0] for s in seqs)
    batch, hidden = len(seqs), image_embeds.shape[-1]
    embeds = np.broadcast_to(pad_embed, (batch, length, hidden)).astype(image_embeds.dtype)
    mask = np.zeros((batch, length), dtype=np.int64)
    for b, s in enumerate(seqs):
        embeds[b, length - s.shape[0]:] = s
        mask[b, length - s.shape[0]:] = 1
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    return embeds, mask, positions


def eos_token_ids(source: Path, tokenizer) -> set[int]:
    """EOS ids from the checkpoint's generation config (falls back to the tokenizer's)."""
    import json

    ids: set[int] = set()
    gen = Path(source) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
