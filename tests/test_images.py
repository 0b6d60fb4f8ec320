"""Images as the pipelines see them (`fsr.runtime.inputs.load_image`), and the README's sample picture.

Issue 9: a 16-bit PNG was clipped (99.6 % of its pixels became 255), an animated GIF
silently lost all but its first frame, and an image whose header claims 30000x30000
ended in a traceback. Ordinary images must still load exactly as transformers'
``load_image`` loads them (the HF parity tests depend on it).
"""

from __future__ import annotations

import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsr.runtime.inputs import InputError, InputNote, load_image, to_8bit

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None) -> Path:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor a lying header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = zlib.compress(rows if rows is not None else b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    clipped = np.asarray(Image.open(path).convert("RGB"))  # the old behaviour
    assert (clipped == 255).mean() > 0.99
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expected = ramp.astype(np.float64) / 257
    assert np.abs(rgb[..., 0] - expected).max() <= 0.5 + 1e-9
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb == 255).mean() < 0.01


def test_16bit_rgb_png_keeps_its_high_byte(tmp_path):
    """Pillow reduces 16-bit RGB itself (mode RGB); only grey images needed the fix."""
    values = np.array([0x0000, 0x80FF, 0xFFFF], dtype=">u2")
    row = b"\0" + np.tile(values, 4).tobytes()  # 4 pixels of (R, G, B)
    path = _png(tmp_path / "rgb16.png", 4, 2, 16, 2, row * 2)
    assert np.asarray(load_image(path))[0, 0].tolist() == [0, 128, 255]


def test_integer_and_float_modes(tmp_path):
    i32 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(to_8bit(i32)).tolist() == [[0, 128, 255]]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_8bit(f)).tolist() == [[0, 128, 255]]
    with pytest.raises(InputError, match="32-bit"):
        load_image(Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I"))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(Image.fromarray(np.array([[0.0, 3.0]], dtype=np.float32), mode="F"))


def test_animated_gif_says_only_the_first_frame_is_used(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "lime", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(InputNote, match="has 3 frames .* only the first frame is used"):
        rgb = np.asarray(load_image(path))
    assert rgb[0, 0].tolist() == [255, 0, 0]


def test_single_frame_image_gives_no_note(tmp_path):
    path = tmp_path / "one.gif"
    Image.new("RGB", (8, 8), "red").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(path)


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 9000)], ids=["over-twice-the-limit", "over-the-limit"])
def test_decompression_bomb_header_is_refused(tmp_path, size):
    """Pillow raises past twice its limit and only warns between; both are refused, before decoding."""
    path = _png(tmp_path / "bomb.png", *size, 8, 2)
    with pytest.raises(InputError, match=r"bomb.png .*(too large|megapixels).* downscale it"):
        load_image(path)


@pytest.mark.parametrize("content", [b"this is not a png", b""], ids=["text", "empty"])
def test_non_images_keep_their_message(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot be read as an image"):
        load_image(path)


def test_truncated_png_keeps_its_message(tmp_path, images):
    path = tmp_path / "cut.png"
    data = Path(images[0]).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot be read as an image"):
        load_image(path)


def test_missing_and_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is not a file"):
        load_image(tmp_path)


def _exif_rotated(path: Path) -> Path:
    im = Image.new("RGB", (40, 20), "white")
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("kind", ["rgb", "rgba", "palette", "grey", "cmyk", "exif"])
def test_ordinary_images_load_as_transformers_loads_them(tmp_path, kind):
    """Parity with the ecosystem: transformers' load_image (EXIF orientation, then RGB)."""
    from transformers.image_utils import load_image as hf_load_image

    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (24, 32, 4)).astype(np.uint8)
    path = tmp_path / f"{kind}.png"
    if kind == "exif":
        _exif_rotated(path := tmp_path / "exif.jpg")
    elif kind == "cmyk":
        Image.fromarray(pixels, "CMYK").save(path := tmp_path / "cmyk.jpg")
    else:
        im = Image.fromarray(pixels, "RGBA")
        im = {"rgb": im.convert("RGB"), "rgba": im, "palette": im.convert("RGB").convert("P"),
              "grey": im.convert("L")}[kind]
        im.save(path)
    ours, theirs = load_image(path), hf_load_image(str(path))
    assert ours.mode == "RGB" and ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    if kind == "exif":
        assert ours.size == (20, 40)


def test_sample_photo_is_what_its_script_draws():
    """examples/photo.png (the README quickstart's picture) is made by examples/photo.py."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import photo
    finally:
        sys.path.pop(0)
    committed = np.asarray(Image.open(ROOT / "examples" / "photo.png").convert("RGB"))
    drawn = photo.draw_photo()
    assert committed.shape == drawn.shape == (photo.HEIGHT, photo.WIDTH, 3)
    differ = np.any(committed != drawn, axis=-1).mean()
    assert differ < 1e-3, f"{differ:.2%} of the pixels differ: run python examples/photo.py and commit the PNG"
    assert np.array_equal(np.asarray(load_image(ROOT / "examples" / "photo.png")), committed)
    assert len(np.unique(committed.reshape(-1, 3), axis=0)) > 100  # a picture, not a flat colour
