"""Draw ``examples/photo.png``, the sample picture of the README's quickstart.

A small landscape (sky, sun, hills, a house, a tree) computed with numpy alone, so the
same pixels come out on every machine and Pillow version; no photograph, no licence
question (it is part of this repository, Apache-2.0). Run it to make the file again::

    python examples/photo.py [PATH]        # default: examples/photo.png beside this script
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 512, 384


def draw_photo(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """The picture as a uint8 array [height, width, 3]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / width, y / height  # 0..1 across, 0..1 down
    img = np.zeros((height, width, 3))

    # sky: deep blue at the top to pale near the horizon
    sky_top, sky_low = np.array([40, 90, 170]), np.array([190, 220, 240])
    t = np.clip(v / 0.62, 0, 1)[..., None]
    img[:] = sky_top * (1 - t) + sky_low * t

    # sun with a soft halo
    d = np.hypot(u - 0.8, (v - 0.18) * height / width)
    img += (np.array([255, 230, 150]) - img) * np.clip(1 - (d - 0.06) / 0.05, 0, 1)[..., None] * 0.5
    img[d < 0.06] = [255, 236, 160]

    # two hills, the far one bluish, the near one green
    far = 0.55 - 0.08 * np.cos(2 * np.pi * (u * 1.3 + 0.1))
    img[v > far] = [95, 140, 120]
    near = 0.66 - 0.06 * np.sin(2 * np.pi * (u * 0.9 + 0.3))
    ground = v > near
    shade = np.clip((v - near) / 0.35, 0, 1)[..., None]
    green = np.array([80, 160, 70]) * (1 - shade) + np.array([40, 110, 40]) * shade
    img = np.where(ground[..., None], green, img)

    # house: walls, roof, door, two windows
    wall = (u > 0.18) & (u < 0.40) & (v > 0.52) & (v < 0.78)
    img[wall] = [220, 200, 170]
    roof = (v > 0.38) & (v <= 0.52) & (np.abs(u - 0.29) < (v - 0.38) / 0.14 * 0.13)
    img[roof] = [170, 50, 40]
    img[(u > 0.27) & (u < 0.31) & (v > 0.65) & (v < 0.78)] = [110, 70, 40]
    for cx in (0.225, 0.355):
        img[(np.abs(u - cx) < 0.022) & (v > 0.57) & (v < 0.62)] = [120, 170, 220]

    # tree: trunk and a round crown
    img[(u > 0.66) & (u < 0.685) & (v > 0.55) & (v < 0.74)] = [100, 70, 40]
    crown = np.hypot(u - 0.672, (v - 0.50) * height / width) < 0.07
    img[crown] = [50, 120, 50]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def main(argv: list[str]) -> None:
    from PIL import Image

    path = Path(argv[0]) if argv else Path(__file__).with_name("photo.png")
    Image.fromarray(draw_photo()).save(path, optimize=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
