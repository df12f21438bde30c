"""Resumable training states: the exact trainable weights, optimizer and schedule, and step.

A state folder holds ``trainable.safetensors`` (fp32 weights), ``optimizer.pt`` and
``scheduler.pt`` (plain tensors and numbers, read back with ``weights_only=True``) and
``state.json``. The loop derives every random draw from (seed, step), so resuming needs no
RNG snapshot and gives the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats.safetensors_io import load_safetensors, save_safetensors

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATES_DIR = "states"


class StateError(ValueError):
    """A state folder is missing, incomplete or from an incompatible run."""


@dataclass
class TrainingState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    info: dict


def state_dir_for(output_dir: Path, step: int) -> Path:
    return output_dir / STATES_DIR / f"step_{step:08d}"


def save_state(folder: Path, state: TrainingState) -> Path:
    """Write ``state`` to ``folder`` atomically (a temp folder renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        save_safetensors(tmp / "trainable.safetensors", state.trainable)
        torch.save(state.optimizer, tmp / "optimizer.pt")
        torch.save(state.scheduler, tmp / "scheduler.pt")
        info = dict(state.info, step=state.step, version=STATE_VERSION)
        (tmp / "state.json").write_text(json.dumps(info, indent=2, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_state(folder: Path) -> TrainingState:
    """Read a state folder written by :func:`save_state` (no unpickling of objects)."""
    needed = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise StateError(f"train.resume = {str(folder)!r} is not a complete Tsuika state "
                         f"(missing {', '.join(missing)}); point it at a folder under "
                         f"<output.dir>/{STATES_DIR}/.")
    info = json.loads((folder / "state.json").read_text())
    if info.get("version") != STATE_VERSION:
        raise StateError(f"state {str(folder)!r} has version {info.get('version')!r}; this "
                         f"Tsuika reads version {STATE_VERSION}.")
    trainable, _ = load_safetensors(folder / "trainable.safetensors")
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    scheduler = torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True)
    return TrainingState(step=int(info["step"]), trainable=trainable, optimizer=optimizer,
                         scheduler=scheduler, info=info)


def find_latest_state(output_dir: Path) -> Path | None:
    """The newest complete state folder in ``output_dir``, or None."""
    root = output_dir / STATES_DIR
    if not root.is_dir():
        return None
    folders = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return folders[-1] if folders else None


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """``train.resume``: '' = fresh start, 'latest' = newest state in output.dir, or a path."""
    if not resume:
        return None
    if resume == "latest":
        latest = find_latest_state(output_dir)
        if latest is None:
            raise StateError(f"train.resume = 'latest' but {str(output_dir / STATES_DIR)!r} "
                             "holds no saved state; start without train.resume.")
        return latest
    return Path(resume).expanduser()


def prune(paths: list[Path], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` of ``paths`` (files or folders); 0 keeps all."""
    if keep_last <= 0 or len(paths) <= keep_last:
        return paths
    for old in paths[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():
            old.unlink()
        log.info("removed old save %s", old)
    return paths[-keep_last:]
