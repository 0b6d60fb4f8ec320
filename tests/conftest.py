"""Shared fixtures: tiny exports (made once per test session) and test images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fsr.export import ExportSettings, export_model
from fsr.models import load_model


@pytest.fixture(scope="session")
def tiny_model():
    return load_model("tiny")


def _export(tmp_path_factory, name, method, **settings):
    out = tmp_path_factory.mktemp("exports") / name
    export_model(load_model("tiny"), out, ExportSettings(method, **settings))
    return out


@pytest.fixture(scope="session")
def export_none(tmp_path_factory):
    return _export(tmp_path_factory, "none", method="none")


@pytest.fixture(scope="session")
def export_fsr64(tmp_path_factory):
    return _export(tmp_path_factory, "fsr64", method="fsr", budget=64)


@pytest.fixture(scope="session")
def export_vz64(tmp_path_factory):
    return _export(tmp_path_factory, "vz64", method="visionzip", budget=64)


@pytest.fixture(scope="session")
def export_pio64(tmp_path_factory):
    """PIO-FVLM at average budget 64 (the spec's LLaVA-1.5 schedule 1:92,10:54,15:22) on the 16-layer
    ``tiny-deep`` preset: decoder segments [0,1), [1,10), [10,15), [15,16) with a pruning graph
    before each but the first."""
    out = tmp_path_factory.mktemp("exports") / "pio64"
    export_model(load_model("tiny-deep"), out, ExportSettings("pio-fvlm", budget=64))
    return out


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Three PNGs with different sizes and content (structured, so saliency is not flat)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    paths = []
    for i, (h, w) in enumerate([(240, 320), (336, 336), (500, 280)]):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / (7 + i)), np.cos(y / (5 + 2 * i)), np.sin((x + y) / 11)], -1)
        pixels = ((base * 0.4 + 0.5 + rng.rand(h, w, 3) * 0.2).clip(0, 1) * 255).astype("uint8")
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


# -- LLaVA-NeXT: the tiny preset, images of four aspect ratios, the unpruned and the VisionZip export ---------

#: (width, height): square (2x2 grid, 5 crops), 2:1 (1x2, 3 crops), 1:3 (3x1, 4 crops), 5:4 (2x2; its
#: stitched grid loses rows to unpadding)
NEXT_SIZES = {"square": (400, 400), "wide": (800, 400), "tall": (300, 900), "unpadded": (500, 400)}


@pytest.fixture(scope="session")
def next_model():
    return load_model("tiny", family="llava-next")


@pytest.fixture(scope="session")
def next_images():
    rng = np.random.default_rng(7)
    out = {}
    for name, (w, h) in NEXT_SIZES.items():
        # pixel noise: no two patches alike, so no exact ties that float rounding could break either way
        out[name] = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return out


def _export_next(tmp_path_factory, loaded, name, method, **settings):
    out = tmp_path_factory.mktemp("next") / name
    export_model(loaded, out, ExportSettings(method, **settings))
    return out


@pytest.fixture(scope="session")
def next_none(next_model, tmp_path_factory):
    return _export_next(tmp_path_factory, next_model, "none", "none")


@pytest.fixture(scope="session")
def next_vz64(next_model, tmp_path_factory):
    """VisionZip per crop at 64 tokens per crop (54 + 10)."""
    return _export_next(tmp_path_factory, next_model, "vz64", "visionzip", budget=64)


PROMPTS = ["What is this?", "Describe the image in detail, please.", "How many objects are there?"]


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)
