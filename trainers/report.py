"""Loss log (CSV) and loss plot (PNG) written at the end of a run; no plotting library."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw


def write_loss_csv(path: Path, rows: list[tuple[int, float, float]]) -> Path:
    """Rows of (step, loss, learning rate), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "learning_rate"])
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def render_loss_plot(steps: list[int], losses: list[float], size=(640, 360),
                     title: str = "training loss") -> Image.Image:
    """A line chart of the loss (raw in grey, moving average in blue)."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, 16, 28, 36
    d.text((left, 8), title, fill="black")
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if not finite:
        d.text((left, h // 2), "no finite loss values", fill="red")
        return img
    xs, ys = zip(*finite)
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def pt(s, v):
        px = left + (s - x0) / (x1 - x0) * (w - left - right)
        py = top + (hi - v) / (hi - lo) * (h - top - bottom)
        return px, py

    d.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        d.text((4, pt(x0, v)[1] - 6), f"{v:.4g}", fill="black")
    d.text((left, h - bottom + 6), str(x0), fill="black")
    d.text((w - right - 40, h - bottom + 6), str(x1), fill="black")
    if len(xs) > 1:
        d.line([pt(s, v) for s, v in zip(xs, ys)], fill=(190, 190, 190), width=1)
        avg = moving_average(list(ys), max(1, len(ys) // 20))
        d.line([pt(s, v) for s, v in zip(xs, avg)], fill=(30, 90, 200), width=2)
    else:
        px, py = pt(xs[0], ys[0])
        d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(30, 90, 200))
    return img


def save_png(img: Image.Image, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None,
               pad: int = 4) -> Image.Image:
    """Images in a grid, one list per row, with an optional text label left of each row."""
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    label_w = 90 if labels else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (cell_w + pad) + pad,
                             len(rows) * (cell_h + pad) + pad), "white")
    d = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * (cell_h + pad)
        if labels:
            d.text((4, y + cell_h // 2 - 6), labels[r], fill="black")
        for c, im in enumerate(row):
            grid.paste(im, (label_w + pad + c * (cell_w + pad), y))
    return grid
