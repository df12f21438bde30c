"""Resumable training states: the exact trainable weights, optimizer and schedule, and step.

A state folder holds ``trainable.safetensors`` (fp32 weights), ``optimizer.pt`` and
``scheduler.pt`` (plain tensors and numbers, read back with ``weights_only=True``),
``state.json``, and with ``train.ema_decay`` the moving average in ``ema.safetensors``.
The loop derives every random draw from (seed, step), so resuming needs no RNG snapshot and
gives the same final weights as an uninterrupted run.
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

from .files import give_default_permissions
from .formats.safetensors_io import check_safetensors, load_safetensors, save_safetensors

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATES_DIR = "states"
EMA_FILE = "ema.safetensors"
_TMP_PREFIX = ".tmp-"
_ASIDE_PREFIX = ".replaced-"
# Half-written files of a killed save: save_safetensors' temp names, report.py's.
_TMP_FILE_PATTERNS = (".*.safetensors.*.tmp", "*.csv.tmp", "*.png.tmp", "*.json.tmp")


class StateError(ValueError):
    """A state folder is missing, incomplete or from an incompatible run.

    ``reason`` is what is wrong in a few words, without the folder or what to do (for a
    caller that words those itself, such as a node passing over a damaged state).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


@dataclass
class TrainingState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    info: dict
    ema: dict[str, torch.Tensor] | None = None  # the moving average (trainers/ema.py), if on


def state_dir_for(output_dir: Path, step: int) -> Path:
    return output_dir / STATES_DIR / f"step_{step:08d}"


def save_state(folder: Path, state: TrainingState) -> Path:
    """Write ``state`` to ``folder`` atomically (a temp folder renamed into place).

    An existing ``folder`` is moved aside first and deleted only once the new one is in
    place: a crash in between leaves the old state under a ``.replaced-`` name, which
    :func:`clean_interrupted_saves` puts back at the next start.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=folder.parent))
    aside: Path | None = None
    try:
        give_default_permissions(tmp)  # mkdtemp made it owner-only
        save_safetensors(tmp / "trainable.safetensors", state.trainable)
        torch.save(state.optimizer, tmp / "optimizer.pt")
        torch.save(state.scheduler, tmp / "scheduler.pt")
        if state.ema is not None:
            save_safetensors(tmp / EMA_FILE, state.ema)
        info = dict(state.info, step=state.step, version=STATE_VERSION)
        (tmp / "state.json").write_text(json.dumps(info, indent=2, default=str))
        if folder.exists():
            aside = folder.with_name(f"{_ASIDE_PREFIX}{folder.name}")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(folder, aside)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and aside.exists() and not folder.exists():
            os.replace(aside, folder)  # the old state goes back where it was
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return folder


def clean_interrupted_saves(output_dir: Path) -> list[str]:
    """Remove what a killed save left in ``output_dir``; returns what was done, one line each.

    Temp state folders and half-written files are deleted; a state moved aside by a
    replacement that never finished is put back (or deleted when its replacement is in
    place). Call it only while holding the output folder's lock.
    """
    done: list[str] = []
    root = output_dir / STATES_DIR
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed the unfinished state {entry}")
            elif entry.name.startswith(_ASIDE_PREFIX):
                target = root / entry.name[len(_ASIDE_PREFIX):]
                if target.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                    done.append(f"removed the replaced state {entry}")
                else:
                    os.replace(entry, target)
                    done.append(f"restored the state {target} (its replacement never finished)")
    if output_dir.is_dir():
        for pattern in _TMP_FILE_PATTERNS:
            for entry in sorted(output_dir.glob(pattern)):
                if entry.is_file() and not entry.is_symlink():
                    entry.unlink(missing_ok=True)
                    done.append(f"removed the half-written file {entry}")
    for line in done:
        log.info("%s", line)
    return done


def _damaged(folder: Path, name: str, why: str) -> StateError:
    return StateError(f"state {str(folder)!r}: {name} is damaged ({why}); resume from another "
                      f"state under <output.dir>/{STATES_DIR}/ or start without train.resume.",
                      reason=f"{name} is damaged ({why.replace(str(folder / name), name)})")


def _load_pt(folder: Path, name: str, mmap: bool = False) -> dict:
    try:
        value = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load raises many types on damaged files
        raise _damaged(folder, name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                       if str(e) else type(e).__name__) from e
    if not isinstance(value, dict):
        raise _damaged(folder, name, f"holds a {type(value).__name__}, not a dict")
    return value


def _read_info(folder: Path) -> tuple[dict, int]:
    """``state.json`` of a state folder and its step, once every file it needs is there."""
    needed = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json"]
    if not folder.is_dir():
        raise StateError(f"train.resume = {str(folder)!r} is not a folder; point it at a "
                         f"folder under <output.dir>/{STATES_DIR}/ or use 'latest'.")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise StateError(f"train.resume = {str(folder)!r} is not a complete Tsuika state "
                         f"(missing {', '.join(missing)}); point it at a folder under "
                         f"<output.dir>/{STATES_DIR}/.", reason=f"missing {', '.join(missing)}")
    try:
        info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(folder, "state.json", str(e)) from e
    if not isinstance(info, dict):
        raise _damaged(folder, "state.json", "not a JSON object")
    if info.get("version") != STATE_VERSION:
        raise StateError(f"state {str(folder)!r}: state.json has version "
                         f"{info.get('version')!r}; this Tsuika reads version {STATE_VERSION}.",
                         reason=f"state.json has version {info.get('version')!r}, not "
                                f"{STATE_VERSION}")
    step = info.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        raise _damaged(folder, "state.json", f"step = {step!r} is not a positive whole number")
    return info, step


def _check_optimizer(folder: Path, optimizer: dict) -> None:
    if not isinstance(optimizer.get("state"), dict) or \
            not isinstance(optimizer.get("param_groups"), list):
        raise _damaged(folder, "optimizer.pt", "not an optimizer state (no state/param_groups)")


def load_state(folder: Path, max_step: int | None = None) -> TrainingState:
    """Read a state folder written by :func:`save_state` (no unpickling of objects).

    Args:
        folder: the state folder.
        max_step: the run's ``train.steps``; a state past it is refused.

    Raises:
        StateError: the folder is incomplete, or one of its files is damaged (the message
            names the folder and the file), or its step is not usable.
    """
    info, step = _read_info(folder)
    _check_step(folder, step, max_step)
    try:
        trainable, _ = load_safetensors(folder / "trainable.safetensors")
    except (ValueError, OSError) as e:
        raise _damaged(folder, "trainable.safetensors", str(e)) from e
    optimizer = _load_pt(folder, "optimizer.pt")
    _check_optimizer(folder, optimizer)
    scheduler = _load_pt(folder, "scheduler.pt")
    ema = None
    if (folder / EMA_FILE).is_file():
        try:
            ema, _ = load_safetensors(folder / EMA_FILE)
        except (ValueError, OSError) as e:
            raise _damaged(folder, EMA_FILE, str(e)) from e
    return TrainingState(step=step, trainable=trainable, optimizer=optimizer,
                         scheduler=scheduler, info=info, ema=ema)


def check_state(folder: Path) -> int:
    """What :func:`load_state` checks, without reading the tensors: the safetensors files'
    headers against their sizes, the ``.pt`` files memory-mapped (a DreamBooth state is GBs;
    choosing among states must not read each one). Returns the state's step.

    Args:
        folder: the state folder.

    Raises:
        StateError: as :func:`load_state` (the message names the folder and the file).
    """
    _, step = _read_info(folder)
    ema = [EMA_FILE] if (folder / EMA_FILE).is_file() else []
    for name in ["trainable.safetensors", *ema]:
        try:
            check_safetensors(folder / name)
        except (ValueError, OSError) as e:
            raise _damaged(folder, name, str(e)) from e
    _check_optimizer(folder, _load_pt(folder, "optimizer.pt", mmap=True))
    _load_pt(folder, "scheduler.pt", mmap=True)
    return step


def newest_sound_state(output_dirs: list[Path]) -> tuple[Path | None,
                                                        list[tuple[Path, StateError]]]:
    """The newest state that :func:`check_state` passes, looking through ``output_dirs`` in
    the order given (newest run first) and each one's states newest first.

    Args:
        output_dirs: run output folders, the one to look in first first.

    Returns:
        ``(folder or None, skipped)``: ``skipped`` holds each newer state passed over with
        why (``StateError.reason``). Nothing is deleted: a damaged state stays for the user.
    """
    skipped: list[tuple[Path, StateError]] = []
    for output_dir in output_dirs:
        for folder in reversed(state_folders(output_dir)):
            try:
                check_state(folder)
            except StateError as e:
                log.warning("passing over the state %s: %s", folder, e.reason)
                skipped.append((folder, e))
                continue
            return folder, skipped
    return None, skipped


def _check_step(folder: Path, step: int, max_step: int | None) -> None:
    if max_step is not None and step > max_step:
        raise StateError(f"state {str(folder)!r} is at step {step}, past train.steps = "
                         f"{max_step}; set train.steps above {step} to train on from it.")


def state_folders(output_dir: Path) -> list[Path]:
    """The state folders in ``output_dir``, oldest step first."""
    root = output_dir / STATES_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def load_resume(resume: str, output_dir: Path, max_step: int | None = None,
                ) -> tuple[Path, TrainingState, list[str]] | None:
    """Load ``train.resume``: '' = fresh start (None), 'latest' = the newest state in
    ``output_dir`` that loads, or a path.

    Args:
        resume: the option's value.
        output_dir: the run's output folder.
        max_step: the run's ``train.steps`` (a state past it is refused).

    Returns:
        ``(folder, state, skipped)`` where ``skipped`` says which newer states were passed
        over and why; None for a fresh start.
    """
    if not resume:
        return None
    if resume != "latest":
        folder = Path(resume).expanduser()
        return folder, load_state(folder, max_step), []
    skipped: list[str] = []
    for folder in reversed(state_folders(output_dir)):
        try:
            state = load_state(folder)
        except StateError as e:
            skipped.append(f"skipped state {folder.name}: {e}")
            log.warning("%s", skipped[-1])
            continue
        # A state past train.steps is not damaged: refuse it rather than fall back to an
        # older one (the user most likely meant to raise train.steps).
        _check_step(folder, state.step, max_step)
        return folder, state, skipped
    where = str(output_dir / STATES_DIR)
    if skipped:
        raise StateError(f"train.resume = 'latest' but no state in {where!r} can be used: "
                         + " | ".join(skipped))
    raise StateError(f"train.resume = 'latest' but {where!r} holds no saved state; start "
                     "without train.resume.")


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
