"""Aspect-ratio buckets: train each image at the bucket closest to its shape, never squashed.

A bucket is a (width, height) pair, both multiples of ``step`` (the VAE and UNet need sides
divisible by 8, and 64 keeps the UNet's down-sampling stages exact), with an area of at most
``resolution ** 2`` so every bucket costs about the same memory. Each image is scaled to
cover its bucket with its aspect ratio kept, then cropped; nothing is forced to a square.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

Bucket = tuple[int, int]

CROP_MODES = ("center", "random")


@dataclass(frozen=True)
class CropInfo:
    """How an image was fitted to its bucket (what SDXL's size conditioning wants).

    Attributes:
        original_size: (width, height) of the image before resizing.
        crop_top_left: (top, left) of the crop in the resized image, in pixels; with a flip
            it is measured in the flipped image, so it always describes what the model sees.
        flipped: whether the result was mirrored horizontally.
        target_size: (width, height) of the result, i.e. the bucket.
    """

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    flipped: bool
    target_size: tuple[int, int]

    def sdxl_time_ids(self) -> tuple[int, int, int, int, int, int]:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w), SDXL's add_time_ids order."""
        (ow, oh), (top, left), (tw, th) = self.original_size, self.crop_top_left, self.target_size
        return oh, ow, top, left, th, tw


def make_buckets(resolution: int, min_size: int | None = None, max_size: int | None = None,
                 step: int = 64) -> list[Bucket]:
    """Every (width, height) bucket for a training resolution, sorted from tall to wide.

    For each width from ``min_size`` to ``max_size`` (in ``step`` increments) the bucket takes
    the largest height that keeps the area within ``resolution ** 2`` and within the limits,
    and its transpose is added too; the square bucket (``resolution`` rounded down to
    ``step``) is always included.

    Args:
        resolution: training side length; bucket areas are at most ``resolution ** 2``.
        min_size: shortest allowed side; default ``resolution // 2`` (256 at 512), rounded up
            to ``step``, and at least ``step``.
        max_size: longest allowed side; default ``2 * resolution`` (1024 at 512), rounded
            down to ``step``.
        step: every side is a multiple of this (64 usual; must be a multiple of 8).

    Raises:
        ValueError: a non-positive or inconsistent argument (named in the message).
    """
    for name, value in (("resolution", resolution), ("step", step)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"make_buckets: {name} = {value!r} must be a positive integer.")
    if resolution < step:
        raise ValueError(f"make_buckets: resolution = {resolution} is smaller than step = {step}; "
                         f"use a resolution of at least {step} or a smaller step.")
    square = resolution // step * step
    low = _round_up(max(step, resolution // 2 if min_size is None else min_size), step)
    high = (2 * resolution if max_size is None else max_size) // step * step
    if low > square:
        raise ValueError(f"make_buckets: min_size = {min_size} is larger than the square bucket "
                         f"side {square} at resolution {resolution}; lower min_size.")
    if high < square:
        raise ValueError(f"make_buckets: max_size = {max_size} is smaller than the square bucket "
                         f"side {square} at resolution {resolution}; raise max_size.")
    area = resolution * resolution
    buckets = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            # Both orientations: the floor to ``step`` is not symmetric by itself.
            buckets.update({(width, height), (height, width)})
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to width/height (log-ratio distance).

    Ties (equal distance) go to the larger bucket, then to the earlier one in ``buckets``.

    Args:
        width: image width in pixels (after EXIF orientation).
        height: image height in pixels.
        buckets: candidates, e.g. from ``make_buckets``.

    Raises:
        ValueError: non-positive size or no buckets.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"assign_bucket: image size {width}x{height} must be positive.")
    if not buckets:
        raise ValueError("assign_bucket: the bucket list is empty; build it with make_buckets.")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 12),
                                       -b[0] * b[1]))


def resize_and_crop(image: Image.Image, bucket: Bucket, crop: str = "center",
                    rng: random.Random | None = None,
                    flip: bool = False) -> tuple[Image.Image, CropInfo]:
    """Scale ``image`` to cover ``bucket`` (aspect ratio kept), crop to it, optionally mirror.

    Downscaling uses LANCZOS, upscaling BICUBIC.

    Args:
        image: the source image (usually from ``load_image_rgb``).
        bucket: target (width, height).
        crop: "center" or "random" (the offset along the overhanging side is drawn from
            ``rng``).
        rng: random source for ``crop="random"``; unused for "center".
        flip: mirror the result horizontally (the caller draws this, so it stays seeded).

    Returns:
        (image of exactly ``bucket`` size, ``CropInfo``).

    Raises:
        ValueError: unknown ``crop``, missing ``rng`` for a random crop, or a bad bucket.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"resize_and_crop: crop = {crop!r} is not one of {CROP_MODES}.")
    if crop == "random" and rng is None:
        raise ValueError("resize_and_crop: crop = 'random' needs rng (a random.Random).")
    target_w, target_h = bucket
    if target_w <= 0 or target_h <= 0:
        raise ValueError(f"resize_and_crop: bucket {bucket} must have positive sides.")
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    # Round, but never below the bucket: float error must not leave a one-pixel gap.
    new_w = max(target_w, round(width * scale))
    new_h = max(target_h, round(height * scale))
    if crop == "center":
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    else:
        left, top = rng.randint(0, new_w - target_w), rng.randint(0, new_h - target_h)
    if (new_w, new_h) != (width, height):
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        # Only the part that survives the crop is resampled (``box``, in source pixels):
        # scaling a 20000x1 strip to cover a 1024x256 bucket whole would make a 5-gigapixel
        # image to keep 0.02% of it. Pillow's filters still read the pixels around the box,
        # so the edges match a full resize. reducing_gap shrinks big photos with a fast box
        # step first; at 3.0 Pillow documents the result as indistinguishable.
        sx, sy = new_w / width, new_h / height
        box = (left / sx, top / sy, (left + target_w) / sx, (top + target_h) / sy)
        image = image.resize((target_w, target_h), resample, box=box,
                             reducing_gap=3.0 if scale < 1 else None)
    else:
        image = image.crop((left, top, left + target_w, top + target_h))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - target_w
    info = CropInfo(original_size=(width, height), crop_top_left=(top, left), flipped=flip,
                    target_size=(target_w, target_h))
    return image, info


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
