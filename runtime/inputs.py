"""Host-side input preparation shared by every pipeline (exported graphs and PyTorch reference).

Images, prompts, the instruction text that drives FSR's relevance term, and the
assembly of the LLM's prefill input (image token expanded to K embeddings, left
padding, positions) live here once, so the ONNX Runtime / TensorRT pipeline and the
PyTorch reference pipeline feed their models identical numbers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fsr.errors import FsrError
from fsr.models.tokenizer import IMAGE


class InputError(FsrError, ValueError):
    """A bad image or prompt; the message names the problem and the fix."""


class InputNote(UserWarning):
    """Something about an input the user should know, though it runs (e.g. only the
    first frame of an animated image is used). Issued with `warnings.warn`."""


def load_image(image):
    """A PIL RGB image from a path (or a PIL image), upright and in 8 bits per channel.

    As transformers' ``load_image``: the EXIF orientation is applied, then the image
    is converted to RGB (an alpha channel is dropped). Unlike a plain ``convert``,
    16-bit and 32-bit grey images are scaled to 8 bits instead of clipped (see
    `to_8bit`). An animated or multi-frame image gives its first frame and an
    `InputNote` saying so. An image whose header claims more pixels than Pillow's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is refused before it is
    decoded. Unreadable, truncated and non-image files raise `InputError`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image), "the image")
    path = Path(image)
    if not path.exists():
        raise InputError(f"image {path} does not exist; pass the path of a PNG/JPEG/... file")
    if not path.is_file():
        raise InputError(f"image {path} is not a file")
    fix = "pass a PNG, JPEG or other format Pillow reads"
    try:
        with warnings.catch_warnings():  # past the limit we refuse below, with our own message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is too large to decode safely ({exc}); downscale it first") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"image {path} cannot be read as an image (not a format Pillow knows); {fix}") from exc
    except OSError as exc:
        raise InputError(f"image {path} cannot be opened ({exc.strerror or exc})") from exc
    with im:
        width, height = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:
            raise InputError(
                f"image {path} claims {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), more than "
                f"the {limit / 1e6:.0f} megapixels Pillow decodes safely (its decompression-bomb limit); the model "
                "sees a small resized copy anyway: downscale it first")
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            warnings.warn(InputNote(f"image {path} has {frames} frames (animated or multi-page): only the first "
                                    "frame is used"), stacklevel=2)
        try:
            im.seek(0)
            im.load()
            upright = ImageOps.exif_transpose(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputError(f"image {path} cannot be read as an image ({exc}); {fix}") from exc
        return _to_rgb(upright, f"image {path}")


def to_8bit(im):
    """A grey image of more than 8 bits per pixel scaled to 8 bits (mode ``L``); other
    images unchanged.

    16-bit grey (modes ``I;16*``, and ``I`` holding values up to 65535, as Pillow opens
    16-bit PNGs) is divided by 257, so 0..65535 maps to 0..255 (Pillow's own
    ``convert`` clips it instead: every value above 255 becomes white). A float image
    (mode ``F``) must hold values in [0, 1]. Anything else raises `InputError`.
    """
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(f"a {im.mode} image with values in [{values.min()}, {values.max()}] (32-bit) is "
                             "not supported; save it with 8 or 16 bits per channel")
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise InputError("a floating-point image must hold values in [0, 1]; save it with 8 or 16 bits per "
                             "channel")
        return Image.fromarray(np.round(values * 255).astype(np.uint8))
    return im


def _to_rgb(im, what: str):
    try:
        return to_8bit(im).convert("RGB")
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


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
