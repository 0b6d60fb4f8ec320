"""Host-side inputs shared by every pipeline (exported graphs and PyTorch reference): images,
CLIP text chunks of an instruction, the checkpoint's end-of-sequence ids.

Prompt formatting, tokenization and the prefill assembly are the model spec's
(`fsr.models.spec.ModelSpec`), so that both pipelines feed their models identical numbers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from fsr.errors import InputError


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
