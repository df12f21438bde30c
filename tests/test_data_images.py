"""load_image_rgb on the awkward files real dataset folders contain."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from tsuika.trainers.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    image_size,
    load_image_rgb,
    to_rgb,
)


def _px(image, xy):
    return image.getpixel(xy)


def _close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def _noise_file(path, fmt, size=(96, 96), **save):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        path, fmt, **save)
    return path


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_extensions_are_lower_case_and_complete():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def test_rgba_transparent_areas_become_white(tmp_path):
    arr = np.zeros((8, 16, 4), dtype=np.uint8)
    arr[:, :8] = (255, 0, 0, 0)      # fully transparent red: must not show as red
    arr[:, 8:12] = (0, 0, 255, 255)  # opaque blue
    arr[:, 12:] = (0, 0, 0, 128)     # half-transparent black over white -> mid grey
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = load_image_rgb(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (16, 8)
    assert _px(out, (2, 2)) == (255, 255, 255)
    assert _px(out, (9, 2)) == (0, 0, 255)
    assert _close(_px(out, (14, 2)), (127, 127, 127), tol=2)


def test_la_and_palette_transparency_become_white(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))
    la.putpixel((7, 7), (0, 255))
    la.save(tmp_path / "la.png")
    out = load_image_rgb(tmp_path / "la.png")
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (7, 7)) == (0, 0, 0)

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((5, 5), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_image_rgb(tmp_path / "p.png")
    assert _px(out, (0, 0)) == (255, 255, 255)  # palette index 0 is transparent black
    assert _px(out, (5, 5)) == (200, 10, 10)


def test_palette_alpha_mode_in_memory():
    pa = Image.new("PA", (4, 4))
    pa.putpalette([30, 60, 90] * 256)
    pa.putpixel((1, 1), (0, 255))
    out = to_rgb(pa)
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 1)) == (30, 60, 90)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (4, 1))).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image_rgb(tmp_path / "g16.png"))
    assert out.shape == (4, 256, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert abs(int(out[0, 128, 0]) - 128) <= 2  # clipping would give 255 here
    assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()


def test_sixteen_bit_big_endian_and_int_and_float_modes():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    assert [p[0] for p in np.asarray(to_rgb(big))[0]] == [0, 128, 255]
    as_int = Image.fromarray(values.astype(np.int32))
    assert as_int.mode == "I"
    assert [p[0] for p in np.asarray(to_rgb(as_int))[0]] == [0, 128, 255]
    eight_bit_int = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert [p[0] for p in np.asarray(to_rgb(eight_bit_int))[0]] == [0, 100, 255]
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit_float.mode == "F"
    assert [p[0] for p in np.asarray(to_rgb(unit_float))[0]] == [0, 128, 255]
    byte_float = Image.fromarray(np.array([[0.0, 64.0, 255.0]], dtype=np.float32))
    assert [p[0] for p in np.asarray(to_rgb(byte_float))[0]] == [0, 64, 255]


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_image_rgb(tmp_path / "c.jpg")
    assert out.mode == "RGB" and _close(_px(out, (8, 8)), (255, 0, 0), tol=12)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image_rgb(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    assert image_size(tmp_path / "r.jpg") == (20, 40)
    assert _close(_px(out, (16, 3)), (255, 0, 0), tol=30)  # now at the top-right
    assert _close(_px(out, (3, 3)), (0, 0, 255), tol=30)


def test_animated_gif_and_webp_give_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=50,
                   lossless=True)
    for name in ("a.gif", "a.webp"):
        assert Image.open(tmp_path / name).n_frames == 3
        out = load_image_rgb(tmp_path / name)
        assert out.mode == "RGB" and _close(_px(out, (6, 6)), (250, 0, 0)), name


@pytest.mark.parametrize("name,mode,fmt", [("b.bmp", "RGB", "BMP"), ("w.webp", "RGB", "WEBP"),
                                           ("one.png", "1", "PNG"), ("l.png", "L", "PNG"),
                                           ("UPPER.JPEG", "RGB", "JPEG")])
def test_plain_formats_and_modes(tmp_path, name, mode, fmt):
    src = Image.new(mode, (10, 6), 1 if mode == "1" else (200 if mode == "L" else (10, 200, 30)))
    src.save(tmp_path / name, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = load_image_rgb(tmp_path / name)
    expected = {"1": (255, 255, 255), "L": (200, 200, 200)}.get(mode, (10, 200, 30))
    assert out.mode == "RGB" and out.size == (10, 6)
    assert _close(_px(out, (5, 3)), expected)
    assert image_size(tmp_path / name) == (10, 6)


def test_unicode_file_name_and_result_is_independent_of_the_file(tmp_path):
    path = tmp_path / "猫 cat.png"
    Image.new("RGB", (5, 7), (1, 2, 3)).save(path)
    out = load_image_rgb(path)
    path.unlink()
    assert out.size == (5, 7) and _px(out, (4, 6)) == (1, 2, 3)


def _written(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make,reason", [
    (lambda p: _written(p / "empty.png", b""), "empty file"),
    (lambda p: _cut_in_half(_noise_file(p / "t.png", "PNG")), "truncated or corrupt image data"),
    (lambda p: _cut_in_half(_noise_file(p / "t.jpg", "JPEG", quality=90)),
     "truncated or corrupt image data"),
    (lambda p: _written(p / "x.png", b"hello, I am text"), "not an image (cannot identify format)"),
    (lambda p: p / "missing.png", "file not found"),
], ids=["empty", "truncated-png", "truncated-jpeg", "text-named-png", "missing"])
def test_unreadable_files_raise_with_a_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_image_rgb(path)
    assert isinstance(info.value, ValueError)
    assert info.value.path == path and info.value.reason == reason
    assert str(path) in str(info.value) and reason in str(info.value)


def test_truncation_is_detected_without_touching_pillows_global(tmp_path):
    path = _cut_in_half(_noise_file(tmp_path / "t.jpg", "JPEG"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageLoadError):
        load_image_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # The header is intact, so the cheap size probe still answers without decoding pixels.
    assert image_size(path) == (96, 96)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 px > 2 x limit -> error
    with pytest.raises(ImageLoadError) as info:
        load_image_rgb(tmp_path / "big.png")
    assert "decompression-bomb" in info.value.reason
