"""Open any image a user may drop into a dataset folder as a plain 8-bit RGB picture.

Real folders hold phone photos with EXIF rotation, transparent PNGs, 16-bit scans, CMYK
JPEGs from print workflows, animated GIFs and files that are cut short or are not images
at all. ``load_image_rgb`` turns every readable one into the same thing (mode "RGB", fully
decoded, upright, transparency on white) and rejects the rest with an ``ImageLoadError``
that says what is wrong, so the dataset scan can list the file instead of crashing later.

Truncated files are detected, not padded: Pillow's global ``LOAD_TRUNCATED_IMAGES`` is
left off, because a half-grey training image silently teaches the model grey halves.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
"""Lower-case file extensions the dataset reads (compare with ``path.suffix.lower()``)."""

BACKGROUND = (255, 255, 255)
"""Colour that transparent pixels are composited onto."""

_EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5-8 rotate by 90 or 270 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Errors Pillow's decoders raise on damaged data. Plugins are not consistent: a cut-off
# PNG can surface as OSError, SyntaxError, struct.error, zlib.error or EOFError.
_CORRUPT_DATA_ERRORS = (OSError, SyntaxError, EOFError, struct.error, zlib.error, ValueError,
                        IndexError)


class ImageLoadError(ValueError):
    """An image file that cannot be used, with a short human-readable reason.

    Attributes:
        path: the file that failed.
        reason: what is wrong, e.g. "empty file" or "truncated or corrupt image data".
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}. Re-export or replace the "
                         f"file, or remove it from the folder.")


def load_image_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` completely into an upright 8-bit RGB image.

    EXIF orientation is applied; alpha and palette transparency are composited onto white;
    16-bit and float grayscale are scaled to 8 bits (see ``to_rgb``); CMYK is converted;
    animated GIF/WebP give their first frame.

    Args:
        path: the image file.

    Returns:
        A new, fully loaded ``PIL.Image.Image`` of mode "RGB" (independent of the file).

    Raises:
        ImageLoadError: the file is missing, empty, not an image, truncated or corrupt, or
            larger than Pillow's decompression-bomb limit.
    """
    path = Path(path)
    _check_not_empty(path)
    try:
        with _open(path) as image:
            try:
                image.seek(0)  # animated GIF / WebP: always the first frame
                image.load()
            except _CORRUPT_DATA_ERRORS as exc:
                log.debug("decoding %s failed: %r", path, exc)
                raise ImageLoadError(path, "truncated or corrupt image data") from exc
            upright = _apply_exif_orientation(image, path)
            return to_rgb(upright)
    except ImageLoadError:
        raise
    except MemoryError as exc:
        raise ImageLoadError(path, "image too large to decode in memory") from exc
    except Exception as exc:  # noqa: BLE001 - a broken file must never crash a dataset scan
        # Pillow plugins raise many unrelated types on malformed headers (KeyError,
        # TypeError, ZeroDivisionError...); name the type so the report stays useful.
        raise ImageLoadError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of ``path`` as ``load_image_rgb`` would return it, from the header.

    Reads only the header (no pixel decode), and swaps the sides when the EXIF orientation
    rotates by 90/270 degrees. For PNGs whose EXIF chunk comes after the pixel data the
    orientation cannot be seen without decoding; those report the stored size.

    Args:
        path: the image file.

    Raises:
        ImageLoadError: the file is missing, empty or not an image.
    """
    path = Path(path)
    _check_not_empty(path)
    with _open(path) as image:
        width, height = image.size
        if image.format == "PNG" and "exif" not in image.info:
            return width, height  # getexif() would decode the whole PNG to look for it
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        except _CORRUPT_DATA_ERRORS:
            orientation = 1  # unreadable EXIF: load_image_rgb also keeps the stored layout
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to a new 8-bit "RGB" image.

    - alpha ("RGBA", "LA", "PA", premultiplied) and palette/colour-key transparency are
      composited onto white;
    - 16-bit grayscale ("I;16*") maps 0..65535 to 0..255;
    - 32-bit integer "I": if any value exceeds 255 the data is taken as 16-bit (0..65535,
      how Pillow stores 16-bit PNG/TIFF), otherwise as 8-bit; values outside are clipped;
    - float "F": if the maximum is at most 1.0 the data is taken as 0..1, otherwise like "I";
    - "CMYK", "YCbCr", "1", "L", "P" and the rest: Pillow's own conversion.

    Args:
        image: a loaded image.

    Raises:
        ValueError: a mode Pillow cannot convert to RGB (e.g. "LAB").
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(image), mode="L").convert("RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # convert() returns a copy even when the mode is already RGB, so the result never
    # shares state with the (soon closed) source file.
    return image.convert("RGB")


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        scale = 255.0 / 65535.0
    else:
        finite = values[np.isfinite(values)]
        peak = float(finite.max()) if finite.size else 0.0
        if image.mode == "F" and peak <= 1.0:
            scale = 255.0
        elif peak > 255.0:
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
    values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or "transparency" in image.info or image.mode in ("RGBa", "La")


def _apply_exif_orientation(image: Image.Image, path: Path) -> Image.Image:
    try:
        if image.getexif().get(_EXIF_ORIENTATION_TAG, 1) in (1, None):
            return image  # upright already; skip exif_transpose's full-size copy
        return ImageOps.exif_transpose(image)
    except _CORRUPT_DATA_ERRORS as exc:
        # Broken EXIF does not make the pixels unusable; keep the stored layout but say so.
        log.warning("ignoring unreadable EXIF orientation in %s (%s)", path, exc)
        return image


def _check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file not found") from exc
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if size == 0:
        raise ImageLoadError(path, "empty file")


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, "image too large (over Pillow's decompression-bomb "
                                   "pixel limit); downscale it") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image (cannot identify format)") from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file not found") from exc
    except PermissionError as exc:
        raise ImageLoadError(path, "permission denied") from exc
    except _CORRUPT_DATA_ERRORS as exc:
        raise ImageLoadError(path, "truncated or corrupt image data") from exc
