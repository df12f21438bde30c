"""The procedural image world of the reference model: render scenes, sample them, write datasets.

Images are drawn at 4x the requested size and box-filtered down, so edges are antialiased
and the result is a pure function of the scene and the size (same scene, same bytes).

Names re-exported here so that callers need one import:
``Scene``, ``vocabulary``, ``HELD_OUT``, ``caption``, ``prompts_for_eval``.
"""

from __future__ import annotations

import logging
import math
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .captions import EvalPrompt, caption, parse_prompt, prompts_for_eval  # noqa: F401
from .concepts import (  # noqa: F401
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    OBJECTS,
    POSITIONS,
    SIZES,
    Scene,
    is_object,
    vocabulary,
)

log = logging.getLogger(__name__)

SUPERSAMPLE = 4
# Pattern period as a fraction of the image side: 8 px at 64 px, coarse enough for a tiny
# diffusion model to reproduce.
PATTERN_PERIOD = 1 / 8
MAX_OFFSET = 0.04


def render(scene: Scene, size: int = 64, pattern_phase: tuple[float, float] = (0.0, 0.0)
           ) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (deterministic).

    Args:
        scene: what to draw.
        size: image side in pixels (64 for the reference model; 32 is handy in tests).
        pattern_phase: where the stripe/checker grid starts, as fractions ``(x, y)`` of its
            period in [0, 1). The model's data always uses (0, 0), a grid fixed to the
            canvas; the evaluator trains on random phases, because a generated pattern
            may sit anywhere, and a classifier that saw one phase only reads that phase.
    """
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"render size = {size!r}; use an integer of at least 16, e.g. 64.")
    if not all(0.0 <= p < 1.0 for p in pattern_phase):
        raise ValueError(f"pattern_phase = {pattern_phase!r}; use two fractions in [0, 1).")
    side = size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    cx = (POSITIONS[scene.position][0] + scene.offset[0]) * side
    cy = (POSITIONS[scene.position][1] + scene.offset[1]) * side
    diameter = SIZES[scene.size] * side
    if is_object(scene.shape):
        for part in OBJECTS[scene.shape]:
            mask = _shape_mask(part.shape, cx + part.center[0] * diameter,
                               cy + part.center[1] * diameter, part.extent * diameter / 2, side)
            canvas.paste(COLORS[part.color], mask=mask)
    else:
        mask = _shape_mask(scene.shape, cx, cy, diameter / 2, side)
        canvas.paste(_shifted(_texture_fill(scene.texture, scene.color, side), pattern_phase),
                     mask=mask)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> Image.Image:
    """A binary ``L`` mask of ``shape`` centred at (cx, cy) with "radius" ``r``.

    Each shape is scaled so that its visual bulk roughly matches a circle of radius ``r``:
    the size words must mean the same for every shape.
    """
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = 0.88 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "cross":
        arm, w = 1.0 * r, 0.34 * r
        draw.rectangle([cx - arm, cy - w, cx + arm, cy + w], fill=255)
        draw.rectangle([cx - w, cy - arm, cx + w, cy + arm], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    return mask


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        # Equilateral, pointing up, centred on its bounding box rather than its centroid so
        # that it sits in the same box as the other shapes.
        R = 1.12 * r
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        top, bottom = -1.0, 0.5
        shift = (top + bottom) / 2
        return [(cx + R * x, cy + R * (y - shift)) for x, y in pts]
    if shape == "star":
        pts = []
        for k in range(10):
            radius = 1.1 * r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        return pts
    if shape == "heart":
        return list(_heart_outline(cx, cy, r))
    raise ValueError(f"shape {shape!r} has no outline; this is a bug in the renderer's table.")


@lru_cache(maxsize=1)
def _unit_heart() -> tuple[tuple[float, float], ...]:
    """The classic parametric heart, normalised to a box of half-width 1 around (0, 0)."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x, y = x - (x.max() + x.min()) / 2, y - (y.max() + y.min()) / 2
    half = max(x.max(), y.max())
    return tuple(zip((x / half).tolist(), (y / half).tolist()))


def _heart_outline(cx, cy, r):
    for x, y in _unit_heart():
        yield cx + 1.05 * r * x, cy + 1.05 * r * y


@lru_cache(maxsize=64)
def _texture_fill(texture: str, color: str, side: int) -> Image.Image:
    """A full-canvas image of ``texture`` in ``color``; the shape mask cuts it out."""
    base = np.array(COLORS[color], dtype=np.float32)
    other = _contrast_tone(base)
    if texture == "solid":
        return Image.new("RGB", (side, side), COLORS[color])
    band = _band(side)
    idx = np.arange(side) // band
    if texture == "striped":
        alt = np.broadcast_to((idx % 2)[:, None], (side, side))  # horizontal stripes
    elif texture == "checkered":
        alt = (idx[:, None] + idx[None, :]) % 2
    else:
        raise ValueError(f"texture {texture!r} has no pattern; this is a bug in the table.")
    pixels = np.where(alt[..., None] == 1, other, base)
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def _shifted(fill: Image.Image, phase: tuple[float, float]) -> Image.Image:
    """``fill`` moved by ``phase`` periods (np.roll wraps: exact for the side sizes that hold
    whole periods, a seam at the edge otherwise, where the shape mask rarely reaches)."""
    period = 2 * _band(fill.width)
    dx, dy = (round(p * period) for p in phase)
    if dx == 0 and dy == 0:
        return fill
    return Image.fromarray(np.roll(np.asarray(fill), (dy, dx), axis=(0, 1)))


def _band(side: int) -> int:
    """Width of one stripe / checker cell, in pixels of a ``side``-wide canvas."""
    return max(1, round(side * PATTERN_PERIOD / 2))


def _contrast_tone(rgb: np.ndarray) -> np.ndarray:
    """A darker shade of a light colour, a lighter tint of a dark one: the second tone of a
    pattern, readable on every colour including black and white."""
    luma = float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    return rgb * 0.5 if luma > 120 else rgb + (255 - rgb) * 0.55


def sample_scene(rng: random.Random, include_held_out: bool = False,
                 fixed: dict[str, str] | None = None, jitter: bool = True) -> Scene:
    """Draw a random scene, each attribute uniform over its allowed values.

    Args:
        rng: the random source (``random.Random(seed)`` for reproducible draws).
        include_held_out: allow held-out values (the evaluator's world); ``False`` gives
            pretraining scenes only.
        fixed: attributes to pin, e.g. ``{"shape": "heart"}``; pinned values may be held out.
        jitter: add a small random ``offset`` to the centre (off for canonical scenes).
    """
    vocab = vocabulary(include_held_out)
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"sample_scene fixed={fixed!r} names unknown attributes "
                         f"{sorted(unknown)}; valid: {', '.join(ATTRIBUTES)}.")
    spec = {a: fixed[a] if a in fixed else rng.choice(vocab[a]) for a in ATTRIBUTES}
    if is_object(spec["shape"]):
        spec["color"] = spec["texture"] = None
    offset = ((rng.uniform(-MAX_OFFSET, MAX_OFFSET), rng.uniform(-MAX_OFFSET, MAX_OFFSET))
              if jitter else (0.0, 0.0))
    return Scene.from_spec(spec, offset=offset)


def sample_finetune_scene(rng: random.Random, concept: str) -> Scene:
    """A scene of a held-out concept in its fine-tuning context (other attributes known).

    Args:
        rng: the random source.
        concept: a key of ``HELD_OUT`` (``heart``, ``checkered``, ``zorbit``).
    """
    held = _held_out(concept)
    return sample_scene(rng, include_held_out=False,
                        fixed={held.attribute: held.value, **held.finetune_context})


def _held_out(concept: str):
    if concept not in HELD_OUT:
        raise ValueError(f"concept {concept!r} is not held out; choose one of: "
                         f"{', '.join(HELD_OUT)}.")
    return HELD_OUT[concept]


def make_dataset(out_dir: str | Path, n: int, seed: int = 0,
                 held_out_concept: str | None = None, size: int = 64,
                 words: dict[str, str] | None = None, paraphrase: bool = True,
                 overwrite: bool = False) -> list[Path]:
    """Write ``n`` rendered scenes as ``NNNNN.png`` + ``NNNNN.txt`` caption pairs.

    The folder layout is the one the trainer reads (images with same-name captions).

    Args:
        out_dir: destination folder; created, and it must be empty unless ``overwrite``.
        n: number of image/caption pairs.
        seed: makes the set reproducible.
        held_out_concept: ``None`` writes a pretraining set (known values only); a key of
            ``HELD_OUT`` writes a fine-tuning set: every image shows that concept in its
            fine-tuning context.
        size: image side in pixels.
        words: caption word substitutions, e.g. ``{"zorbit": "sks"}`` for a trigger token.
        paraphrase: vary the caption wording (``False``: always the canonical sentence).
        overwrite: allow writing into a non-empty folder (same-name files are replaced).
    """
    if n < 1:
        raise ValueError(f"make_dataset n = {n!r}; ask for at least one image.")
    if held_out_concept is not None:
        _held_out(held_out_concept)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose an empty folder or pass "
                              "overwrite=True.")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        scene = (sample_scene(rng) if held_out_concept is None
                 else sample_finetune_scene(rng, held_out_concept))
        text = caption(scene, rng if paraphrase else None, words=words)
        image_path = out / f"{i:05d}.png"
        # Default arguments bind this iteration's scene and text (B023), though each lambda
        # runs before the loop moves on.
        _write_atomic(image_path,
                      lambda tmp, scene=scene: render(scene, size).save(tmp, format="PNG"))
        _write_atomic(image_path.with_suffix(".txt"),
                      lambda tmp, text=text: Path(tmp).write_text(text + "\n", encoding="utf-8"))
        paths.append(image_path)
    log.info("wrote %d scenes (%s) to %s", n, held_out_concept or "pretraining", out)
    return paths


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
