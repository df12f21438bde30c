"""Everything a run writes: LoRA files with metadata, states, samples, loss log and plot."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .callbacks import SaveInfo
from .config import TsuikaConfig
from .device import DTYPES
from .ema import ema_metadata
from .families.base import ModelBundle
from .formats.metadata import training_metadata
from .formats.safetensors_io import save_safetensors
from .guards import NonFiniteLoss, state_non_finite
from .registry import METHODS
from .report import image_grid, render_loss_plot, save_png, write_loss_csv
from .run_lock import OutputError, output_lock
from .state import (
    STATES_DIR,
    TrainingState,
    clean_interrupted_saves,
    prune,
    save_state,
    state_dir_for,
    state_folders,
)

FIX_LR = "Lower train.learning_rate or use train.mixed_precision = 'bf16'/'no'."


def check_output_dir(config: TsuikaConfig) -> Path:
    """Make sure ``output.dir`` can take this run's files, before any model is loaded.

    Returns:
        The output folder (created if missing).

    Raises:
        OutputError: it is a file, cannot be created or is not writable.
        FileExistsError: the final file exists and output.overwrite is off.
    """
    folder = Path(config.output.dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output.dir = {str(folder)!r} is a file, not a folder; set "
                          "output.dir to a folder (it is created if missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"output.dir = {str(folder)!r} cannot be created "
                          f"({e.strerror or e}); choose a folder you can write to.",
                          e.errno) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output.dir = {str(folder)!r} is not writable by this user; "
                          "choose a folder you can write to or fix its permissions.",
                          errno.EACCES)
    method = METHODS.get(config.network.method) if config.network.method in METHODS else None
    for suffix in (".safetensors", *getattr(method, "companion_suffixes", ())):
        final = folder / f"{config.output.name}{suffix}"
        if final.exists() and not config.output.overwrite:
            raise FileExistsError(
                f"{final} already exists; choose another output.name, another output.dir, or "
                "set output.overwrite = true to replace it.")
    return folder


@contextlib.contextmanager
def open_output(config: TsuikaConfig, messages: list[str]) -> Iterator[Path]:
    """Check and lock ``output.dir`` for one run (the main process's), and tidy it up.

    Under the lock: what a killed save left is removed, and a fresh start (no
    ``train.resume``) over resumable states of an earlier run needs ``output.overwrite``;
    those states are then moved aside (not deleted), so ``latest`` cannot pick them.
    What was done is appended to ``messages``.

    Args:
        config: the run's config.
        messages: lines for the user.
    """
    folder = check_output_dir(config)
    with output_lock(folder):
        messages += clean_interrupted_saves(folder)
        old = state_folders(folder)
        if old and not config.train.resume:
            if not config.output.overwrite:
                raise OutputError(
                    f"output.dir = {str(folder)!r} holds resumable states of an earlier run "
                    f"(newest {old[-1].name}); continue it with train.resume = 'latest', "
                    "choose another output.dir, or set output.overwrite = true to start over "
                    "(the old states are then moved aside, not deleted).")
            aside = folder / f"{STATES_DIR}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(folder / STATES_DIR, aside)
            messages.append(f"output.overwrite: the earlier run's states were moved to {aside}")
        yield folder

log = logging.getLogger(__name__)


class RunWriter:
    """Owns the output folder of one run. Only the main process writes."""

    def __init__(self, config: TsuikaConfig, bundle: ModelBundle, is_main: bool = True):
        self.config = config
        self.bundle = bundle
        self.is_main = is_main
        self.dir = Path(config.output.dir).expanduser()
        self.cache_dir = (Path(config.data.cache_dir).expanduser() if config.data.cache_dir
                          else self.dir / ".cache")
        self.losses: list[tuple[int, float, float]] = []
        self.started = time.time()
        self._intermediate: list[Path] = []
        self._states: list[Path] = []
        self._companions: list[list[Path]] = []  # per intermediate save, its companions
        self.identity: dict | None = None  # what a state belongs to (guards.run_identity)
        self.last_good: SaveInfo | None = None  # the newest save, verified finite
        self.step_offset = 0  # steps a file trained on from had already (network.init_lora)
        self.final_path = self.dir / f"{config.output.name}.safetensors"
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.final_path.exists() and not config.output.overwrite:
                raise FileExistsError(
                    f"{self.final_path} already exists; choose another output.name, another "
                    "output.dir, or set output.overwrite = true to replace it.")

    # -- files ------------------------------------------------------------------------------
    def metadata(self, step: int) -> dict[str, str]:
        c = self.config
        return training_metadata(
            config=c, step=step + self.step_offset, base_model_name=self.bundle.source_name,
            base_model_version=self.bundle.family, prediction_type=self.bundle.prediction_type,
            started_at=self.started, include_paths=c.output.metadata_paths,
            extra=ema_metadata(c, step))

    def save(self, method, state: TrainingState, step: int, final: bool) -> SaveInfo:
        if not self.is_main:
            return SaveInfo(step=step, final=final)
        bad = state_non_finite(state)
        if bad:
            raise NonFiniteLoss(f"the trained weights became NaN or infinite by step {step} "
                                f"({', '.join(bad)}); they were not saved; "
                                f"{self.last_good_text()}. {FIX_LR}")
        if self.identity is not None:
            state.info.setdefault("identity", self.identity)
        dtype = DTYPES[self.config.output.save_dtype]
        tensors = method.export(self.config, self.bundle, dtype)
        if final:
            path = self.final_path
        else:
            path = self.dir / f"{self.config.output.name}-step{step:08d}.safetensors"
        try:
            meta = method.file_metadata(self.config, self.bundle, self.metadata(step))
            save_safetensors(path, tensors, meta,
                             overwrite=final and self.config.output.overwrite or not final,
                             dtype=dtype)
            # e.g. a hypernetwork's .pt (what ComfyUI loads), beside every save: a cancel
            # publishes the intermediate one.
            companions = list(method.companion_files(
                self.config, self.bundle, path, meta,
                overwrite=not final or self.config.output.overwrite)) \
                if hasattr(method, "companion_files") else []
            sdir = save_state(state_dir_for(self.dir, step), state)
        except FileExistsError:
            raise
        except OSError as e:
            raise self._write_error(path, e) from e
        if not final:
            self._intermediate = prune(self._intermediate + [path], self.config.output.keep_last)
            self._companions.append(companions)
            keep = self.config.output.keep_last
            while keep and len(self._companions) > keep:  # as prune() does for the files
                for old in self._companions.pop(0):
                    old.unlink(missing_ok=True)
            self._states = prune(self._states + [sdir], self.config.output.keep_last)
        log.info("saved %s (state %s)", path, sdir)
        self.last_good = SaveInfo(step=step, file_path=str(path), state_dir=str(sdir),
                                  final=final)
        return self.last_good

    def last_good_text(self) -> str:
        """Names the last save (every save is verified finite before it is written)."""
        s = self.last_good
        return (f"the last good save is {s.file_path} (state {s.state_dir})" if s
                else "nothing was saved before it (no save_every reached)")

    def _write_error(self, path: Path, e: OSError) -> OutputError:
        if isinstance(e, OutputError):
            return e
        why = e.strerror or str(e)
        fix = ("free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
               "check output.dir's permissions and free space")
        return OutputError(f"could not write {path} ({why}); {fix}, then resume with "
                           f"train.resume = 'latest'; {self.last_good_text()}.", e.errno)

    # -- samples and report ---------------------------------------------------------------
    def sample(self, family, bundle, precision, step: int, cb, final: bool = False) -> list:
        s = self.config.sample
        if not s.prompts or not self.is_main:
            return []
        from .sampling import sample_images

        images = sample_images(family, bundle, list(s.prompts), precision,
                               size=s.size or self.config.data.resolution, steps=s.steps,
                               guidance_scale=s.guidance_scale, seed=s.seed)
        cb.on_sample(step, images, list(s.prompts))
        return images

    def finish(self, before: list, after: list) -> dict[str, Path]:
        if not self.is_main:
            return {}
        try:
            return self._finish(before, after)
        except OSError as e:
            raise self._write_error(self.dir, e) from e

    def _finish(self, before: list, after: list) -> dict[str, Path]:
        files: dict[str, Path] = {"lora": self.final_path}
        name = self.config.output.name
        files["loss_csv"] = write_loss_csv(self.dir / f"{name}-loss.csv", self.losses)
        plot = render_loss_plot([r[0] for r in self.losses], [r[1] for r in self.losses])
        files["loss_plot"] = save_png(plot, self.dir / f"{name}-loss.png")
        if before and after:
            grid = image_grid([before, after], labels=["before", "after"])
            files["samples"] = save_png(grid, self.dir / f"{name}-samples.png")
        (self.dir / f"{name}-config.json").write_text(
            json.dumps(self.config.to_dict(), indent=2))
        files["config"] = self.dir / f"{name}-config.json"
        return files
