"""Images and prompts the comparisons run on: built-in ones made in code, plus the user's.

The built-in images are smooth structured patterns with a little noise (so saliency and
relevance are not flat and FSR has real decisions to make), in three sizes so the
processor's resize and crop paths both run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from fsr.errors import FsrError

BUILTIN_PROMPTS = ("What is in this picture?", "Describe the image in detail.", "How many shapes are there?")
BUILTIN_SIZES = ((240, 320), (360, 360), (480, 288))


class SampleError(FsrError, ValueError):
    """Images and prompts that cannot be paired; the message says how to pass them."""


@dataclasses.dataclass
class Sample:
    image: object  # a PIL image or a path
    prompt: str
    label: str

    def to_json(self) -> dict:
        return {"image": self.label, "prompt": self.prompt}


def builtin_image(index: int):
    """A deterministic RGB test image (PIL)."""
    h, w = BUILTIN_SIZES[index % len(BUILTIN_SIZES)]
    rng = np.random.RandomState(100 + index)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    k = 1 + index
    base = np.stack([np.sin(x / (6 + 3 * k)) * np.cos(y / (9 + k)),
                     np.cos((x - y) / (8 + 2 * k)),
                     ((x // (40 + 10 * k) + y // (50 + 5 * k)) % 2) - 0.5], -1)
    pixels = ((base * 0.4 + 0.5 + rng.rand(h, w, 3) * 0.15).clip(0, 1) * 255).astype("uint8")
    return Image.fromarray(pixels)


def make_samples(images: list | None = None, prompts: list[str] | None = None, *, builtin: int = 3) -> list[Sample]:
    """``builtin`` built-in (image, prompt) pairs, then the user's pairs.

    The user's images and prompts are paired in order; when one list has a single entry
    it goes with every entry of the other; a prompt without an image uses built-in image 0,
    an image without a prompt uses the first built-in prompt.
    """
    samples = [Sample(builtin_image(i), BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)], f"builtin-{i}")
               for i in range(builtin)]
    images, prompts = list(images or []), list(prompts or [])
    if not images and not prompts:
        return samples
    if not images:
        images = [None]
    if not prompts:
        prompts = [BUILTIN_PROMPTS[0]]
    if len(images) == 1:
        images = images * len(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(images) != len(prompts):
        raise SampleError(f"got {len(images)} --image and {len(prompts)} --prompt: pass one prompt per image, "
                          "or a single prompt (used for every image), or a single image")
    for image, prompt in zip(images, prompts):
        if image is None:
            samples.append(Sample(builtin_image(0), prompt, "builtin-0"))
        else:
            samples.append(Sample(str(image), prompt, str(image)))
    return samples
