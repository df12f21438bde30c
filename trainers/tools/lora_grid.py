"""The checkpoint x strength grid, host-free: which files make the rows, the strengths that
make the columns, the change measure that flags cells where the image stops changing, and
the labelled grid image. The host (the ComfyUI node, a script) samples the cells.

The change measure: a cell's **step change** is the mean absolute difference of its pixels
(RGB in [0, 1]) from the cell above it, i.e. the same strength one saved step earlier of the
same run; its **strength change** is the same measure against the cell to its left (the
same file one strength lower). A cell whose step change is below the threshold has stopped
changing with more training; one whose strength change is below it has stopped changing
with more strength: both are cheap signs of over-training (or of a LoRA that does nothing).
Cells at strength 0 are never flagged (every file gives the base model's image there).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<step>\d+)\.safetensors$")
MAX_STRENGTHS = 16
MAX_ROWS = 32


class GridError(ValueError):
    """A grid input that cannot work; the message names the input and the fix."""


@dataclasses.dataclass(frozen=True)
class GridRow:
    """One row: a LoRA file and its label. ``run`` groups the rows of one training run (the
    step change compares a row with the previous row of the same run only)."""

    label: str
    path: Path
    run: str | None = None
    step: int | None = None


def parse_strengths(text: str, widget: str = "strengths") -> list[float]:
    """The strengths of ``text`` ("0.5, 0.75 1"), lowest first (the strength change compares
    a column with the next lower strength).

    Args:
        text: numbers separated by commas or spaces.
        widget: the input's name for the error message.
    """
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    if not parts:
        raise GridError(f"{widget} is empty; give one or more strengths, e.g. '0.5, 1.0'.")
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise GridError(f"{widget}: {p!r} is not a number; give strengths separated by "
                            "commas, e.g. '0.5, 1.0'.") from None
        if not math.isfinite(v) or abs(v) > 10:
            raise GridError(f"{widget}: {p} is outside -10..10; use strengths like 0.5 or 1.")
        values.append(v)
    if len(values) > MAX_STRENGTHS:
        raise GridError(f"{widget}: {len(values)} strengths; at most {MAX_STRENGTHS} fit a grid.")
    if len(set(values)) != len(values):
        raise GridError(f"{widget}: {text!r} repeats a strength; give each once.")
    return sorted(values)


def parse_names(text: str) -> list[str]:
    """The LoRA file names of a multi-line (or comma-separated) text, blanks dropped."""
    return [n.strip() for n in re.split(r"[\n,]+", str(text or "")) if n.strip()]


def run_rows(run_dir: Path, name: str | None = None) -> list[GridRow]:
    """The rows of one run folder: its ``<name>-step<N>.safetensors`` saves by step, then its
    final ``<name>.safetensors`` (labelled with the step its metadata records).

    Args:
        run_dir: a training run's folder (``output.dir`` of the run).
        name: the run's ``output.name``; None: any name (the folder holds one run).
    """
    steps = []
    for p in sorted(run_dir.glob("*-step*.safetensors")):
        m = STEP_FILE.match(p.name)
        if m and (name is None or m["name"] == name):
            steps.append((int(m["step"]), m["name"], p))
    steps.sort()
    tag = run_dir.name
    rows = [GridRow(f"step {s}", p, tag, s) for s, _, p in steps]
    names = {n for _, n, _ in steps} if name is None else {name}
    for n in sorted(names):
        final = run_dir / f"{n}.safetensors"
        if final.is_file():
            step = _metadata_int(final, "ss_steps")
            rows.append(GridRow(f"final (step {step})" if step is not None else "final",
                                final, tag, step))
    return rows


def find_run(runs_root: Path, name: str, started_at: str | None = None) -> Path | None:
    """The run folder under ``runs_root/<name>`` whose files record ``started_at`` (the
    ``ss_training_started_at`` of the LoRA a train node returned), else the newest run that
    saved a file; None when there is none.

    Args:
        runs_root: the folder of all runs (``<ComfyUI output>/tsuika``).
        name: the run's ``output.name`` (a checked plain name).
        started_at: ``ss_training_started_at`` to match; None: the newest run.
    """
    folder = runs_root / name
    runs = sorted((p for p in folder.glob("run_*") if p.is_dir()), reverse=True)
    for run in runs:
        files = sorted(run.glob("*.safetensors"))
        if not files:
            continue
        if started_at is None:
            return run
        if any(_metadata(f).get("ss_training_started_at") == started_at for f in files):
            return run
    return None


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError) as e:  # a damaged file: no metadata to match
        log.warning("could not read %s's metadata: %s", path.name, e)
        return {}


def _metadata_int(path: Path, key: str) -> int | None:
    try:
        return int(_metadata(path)[key])
    except (KeyError, ValueError):
        return None


def mean_abs_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute pixel difference of two images (H, W, C in [0, 1]); 0 = identical."""
    if a.shape != b.shape:
        raise GridError(f"cells of different sizes {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().mean())


@dataclasses.dataclass
class Changes:
    """Per cell: ``step[r][c]`` (None on a run's first row or a row from another run) and
    ``strength[r][c]`` (None in the first column), and the cells flagged by each."""

    step: list[list[float | None]]
    strength: list[list[float | None]]
    threshold: float

    def flags(self, strengths: list[float]) -> list[list[str]]:
        """Per cell, '' or the flags: 's' stopped changing with steps, 'w' with strength."""
        out = []
        for r, row in enumerate(self.step):
            cells = []
            for c, d in enumerate(row):
                f = ""
                if strengths[c] != 0 and d is not None and d < self.threshold:
                    f += "s"
                w = self.strength[r][c]
                if strengths[c] != 0 and w is not None and w < self.threshold:
                    f += "w"
                cells.append(f)
            out.append(cells)
        return out


def changes(cells: list[list[torch.Tensor]], rows: list[GridRow],
            threshold: float) -> Changes:
    """The step and strength change of every cell (see the module's docstring).

    Args:
        cells: ``cells[r][c]``, images (H, W, C) in [0, 1], rows as ``rows``, columns by
            strength in the order given.
        rows: the grid's rows (their ``run`` says which rows are steps of one run).
        threshold: a change below this flags the cell (mean abs pixel change, 0..1).
    """
    step, strength = [], []
    for r, row in enumerate(cells):
        same_run = r > 0 and rows[r].run is not None and rows[r].run == rows[r - 1].run
        step.append([mean_abs_change(img, cells[r - 1][c]) if same_run else None
                     for c, img in enumerate(row)])
        strength.append([mean_abs_change(img, row[c - 1]) if c else None
                         for c, img in enumerate(row)])
    return Changes(step, strength, threshold)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


FLAG_COLOURS = {"s": (230, 40, 40), "w": (240, 160, 20), "sw": (200, 0, 200)}


def assemble(cells: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str],
             flags: list[list[str]] | None = None, title: str = "") -> torch.Tensor:
    """One labelled grid image (1, H, W, 3) in [0, 1]: a header of column labels, a left
    strip of row labels, flagged cells framed (red: stopped changing with steps, orange: with
    strength, magenta: both) and marked with their flag letters.

    Args:
        cells: ``cells[r][c]``, images (H, W, 3) in [0, 1], all of one size.
        row_labels: one per row.
        col_labels: one per column.
        flags: per cell, '' or flag letters (:meth:`Changes.flags`).
        title: a line above the column labels (the prompt and seed).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = cells[0][0].shape[:2]
    size = max(10, min(16, w // 8))
    font = _font(size)
    pad = 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = pad * 2 + max(int(measure.textlength(t, font=font)) for t in row_labels)
    top = (size + pad) * (2 if title else 1) + pad
    canvas = Image.new("RGB", (left + w * len(col_labels), top + h * len(row_labels)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for c, label in enumerate(col_labels):
        draw.text((left + c * w + pad, top - size - pad), label, fill=(0, 0, 0), font=font)
    for r, (label, row) in enumerate(zip(row_labels, cells, strict=True)):
        y = top + r * h
        draw.text((pad, y + h // 2 - size // 2), label, fill=(0, 0, 0), font=font)
        for c, img in enumerate(row):
            if tuple(img.shape[:2]) != (h, w):
                raise GridError(f"cell {r},{c} is {tuple(img.shape[:2])}, not {(h, w)}")
            arr = (img[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            x = left + c * w
            canvas.paste(Image.fromarray(arr, "RGB"), (x, y))
            f = flags[r][c] if flags else ""
            if f:
                colour = FLAG_COLOURS[f]
                draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
                draw.text((x + 4, y + 2), f, fill=colour, font=font)
    out = torch.from_numpy(np.asarray(canvas).copy()).float() / 255.0
    return out.unsqueeze(0)


def report(rows: list[GridRow], strengths: list[float], ch: Changes) -> str:
    """The node's report: the grid's shape, how cells are flagged, and each flagged cell."""
    flags = ch.flags(strengths)
    n = sum(1 for row in flags for f in row if f)
    lines = [f"{len(rows)} rows x {len(strengths)} strengths, {n} flagged "
             f"(change < {ch.threshold:g})",
             "flag s: mean abs pixel change to the same strength one saved step earlier is "
             "below the threshold (stopped changing with more steps); w: to the next lower "
             "strength (stopped changing with more strength)"]
    for r, row in enumerate(flags):
        for c, f in enumerate(row):
            if not f:
                continue
            parts = []
            if "s" in f:
                parts.append(f"step change {ch.step[r][c]:.4f}")
            if "w" in f:
                parts.append(f"strength change {ch.strength[r][c]:.4f}")
            lines.append(f"{rows[r].label} @ {strengths[c]:g}: {', '.join(parts)}")
    return "\n".join(lines)
