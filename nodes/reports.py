"""Node reports, as the web extension draws them on the node (the shared "Node reports" contract).

A report is plain multi-line text whose first line is a one-line headline; lines starting
with ``warning:`` or ``skipped`` are drawn as warnings. A node returns it as
``ui={"tsuika_report": [text], "tsuika_level": [level]}``. Pure functions: no ComfyUI import.
"""

from __future__ import annotations

from pathlib import Path

LEVELS = ("info", "warning", "cancelled")


def ui_report(text: str, level: str = "info") -> dict:
    """The ``ui`` dict of a node result carrying ``text``."""
    if level not in LEVELS:
        raise ValueError(f"report level {level!r}; use one of {', '.join(LEVELS)}")
    return {"tsuika_report": [text], "tsuika_level": [level]}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def dataset_report(scan, shown_as: str) -> tuple[str, str]:
    """(text, level) for a scanned dataset: counts, captions, sizes, skipped files and why.

    ``shown_as`` is how the folder is named to the user (what they typed, never the
    server's absolute path).
    """
    n = len(scan.items)
    lines = [(f"{_plural(n, 'image')} used from {shown_as} ({scan.total_repeats} per epoch "
              f"with repeats), {len(scan.skipped)} skipped")]
    groups: dict[tuple[str, int], int] = {}
    for item in scan.items:
        groups[(item.subset, item.repeats)] = groups.get((item.subset, item.repeats), 0) + 1
    if len(groups) > 1 or any(r != 1 for _, r in groups):
        for (subset, repeats), count in sorted(groups.items()):
            lines.append(f"{subset or '(root)'}: {_plural(count, 'image')} x {repeats}")
    missing = scan.captions_missing
    lines.append(f"captions: {n - missing} present, {missing} missing or empty")
    if missing:
        lines.append(f"warning: {_plural(missing, 'image')} train{'s' if missing == 1 else ''} "
                     "with an empty caption (add a caption file next to each)")
    for s in scan.skipped:
        lines.append(f"skipped {_relative(s.path, scan.root)}: {s.reason}")
    for w in scan.warnings:
        lines.append(f"warning: {w}")
    level = "warning" if scan.skipped or scan.warnings or missing else "info"
    return "\n".join(lines), level


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def train_report(steps: int, losses: list[float], file_path, buckets: dict,
                 loras_copy: str | None = None, file_word: str = "LoRA",
                 lines: list[str] | None = None) -> str:
    """A train node's summary: steps, loss first -> last, buckets, where the files are.

    ``lines`` (the method's own words on its file: where it was published, what to connect)
    replace the LoRA node's closing line when given."""
    loss = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no loss recorded"
    out = [f"trained {steps} steps, {loss}"]
    if buckets:
        out.append("buckets (size: images): " + ", ".join(f"{s}: {n}" for s, n in
                                                          buckets.items()))
    out.append(f"{file_word}: {file_path}")
    if lines is not None:
        out.extend(lines)
    else:
        out.append("connect 'lora' to Save LoRA to keep it in models/loras" if loras_copy is None
                   else f"also in models/loras as {loras_copy}")
    return "\n".join(out)


def stopped_report(step: int, total: int, listed_name: str | None, state_dir,
                   how_to_continue: str, file_word: str = "LoRA", folder: str = "loras",
                   loader: str = "Load LoRA") -> str:
    """What a cancelled training kept, in the node's words (``listed_name``: the partial
    file's name in ``models/<folder>``, which ``loader`` lists)."""
    lines = [f"cancelled at step {step}/{total}: what was trained is kept"]
    if listed_name:
        lines.append(f"{file_word} so far: {listed_name} in models/{folder} ({loader} lists it)")
    if state_dir:
        lines.append(f"resumable state: {state_dir}")
    lines.append(how_to_continue)
    return "\n".join(lines)
