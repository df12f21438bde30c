"""Perceptual image hashes and near-duplicate groups (no image-hash library needed).

The hash is the classic DCT hash: the image in greyscale at 32x32, its 2-D DCT-II, the 8x8
lowest frequencies without the constant term, each bit set when its coefficient is above
their median. Rescaling, re-encoding (JPEG), small crops and mild colour changes move few
bits; different pictures differ in about half of the 64. A difference-of-neighbours hash
(dHash) was not used: on flat drawings most of its bits are 0 for every image, so unrelated
simple images would look alike.

The hash is blind to colour (a red and a blue version of one drawing share it), so a pair
also needs close mean colours (``colour_signature``: the image at 2x2 pixels) to count as
near-duplicates.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

HASH_SIDE = 32
LOW = 8
# Bits (of 64) two images may differ in and still count as near-duplicates. Re-encoded or
# resized copies measure 0-4; different photos of one subject usually 20 or more.
DEFAULT_MAX_DISTANCE = 6
# Largest mean difference (0-255) of the 2x2 colour signatures of near-duplicates: JPEG and
# resizing move it by a few units, a recoloured background by tens.
MAX_COLOUR_DIFFERENCE = 16


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT hash of ``image`` as an int (see the module docstring).

    Args:
        image: any PIL image (converted to greyscale here).
    """
    grey = image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.float64)
    d = _dct_matrix(HASH_SIDE)
    coeffs = (d @ pixels @ d.T)[:LOW, :LOW].reshape(-1)[1:]  # no DC: brightness alone
    bits = coeffs > np.median(coeffs)
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def colour_signature(image: Image.Image) -> tuple[int, ...]:
    """The image's mean colours at 2x2 pixels (12 numbers, 0-255).

    Args:
        image: any PIL image.
    """
    return tuple(np.asarray(image.convert("RGB").resize((2, 2), Image.Resampling.BOX),
                            dtype=np.uint8).reshape(-1).tolist())


def hamming(a: int, b: int) -> int:
    """Number of bits in which two hashes differ."""
    return (a ^ b).bit_count()


def near_duplicate_groups(hashes: Sequence[int],
                          max_distance: int = DEFAULT_MAX_DISTANCE,
                          colours: Sequence[tuple[int, ...]] | None = None) -> list[list[int]]:
    """Groups (by index, each sorted, groups in order of first member) of images that are
    within ``max_distance`` bits of another member (and, given ``colours``, within
    ``MAX_COLOUR_DIFFERENCE`` of its colours); singletons are left out.

    Args:
        hashes: one perceptual hash per image.
        max_distance: the largest Hamming distance that still counts as a near-duplicate.
        colours: one ``colour_signature`` per image, or None to compare hashes only.
    """
    n = len(hashes)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Pairwise in numpy: 63-bit values as unsigned ints, popcount of the XOR per row.
    arr = np.array(hashes, dtype=np.uint64)
    cols = np.array(colours, dtype=np.float64) if colours is not None else None
    for i in range(n - 1):
        x = np.bitwise_xor(arr[i + 1:], arr[i])
        dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        close = dist <= max_distance
        if cols is not None:
            close &= np.abs(cols[i + 1:] - cols[i]).mean(axis=1) <= MAX_COLOUR_DIFFERENCE
        for j in np.nonzero(close)[0]:
            a, b = root(i), root(i + 1 + int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for _, g in sorted(groups.items()) if len(g) > 1]
