"""Everything a run writes: LoRA files with metadata, states, samples, loss log and plot."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .callbacks import SaveInfo
from .config import TsuikaConfig
from .device import DTYPES
from .families.base import ModelBundle
from .formats.metadata import training_metadata
from .formats.safetensors_io import save_safetensors
from .report import image_grid, render_loss_plot, save_png, write_loss_csv
from .state import TrainingState, prune, save_state, state_dir_for

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
            config=c, step=step, base_model_name=self.bundle.source_name,
            base_model_version=self.bundle.family, prediction_type=self.bundle.prediction_type,
            started_at=self.started, include_paths=c.output.metadata_paths)

    def save(self, method, state: TrainingState, step: int, final: bool) -> SaveInfo:
        if not self.is_main:
            return SaveInfo(step=step, final=final)
        dtype = DTYPES[self.config.output.save_dtype]
        tensors = method.export(self.config, self.bundle, dtype)
        if final:
            path = self.final_path
        else:
            path = self.dir / f"{self.config.output.name}-step{step:08d}.safetensors"
        meta = method.file_metadata(self.config, self.bundle, self.metadata(step))
        save_safetensors(path, tensors, meta,
                         overwrite=final and self.config.output.overwrite or not final,
                         dtype=dtype)
        sdir = save_state(state_dir_for(self.dir, step), state)
        if not final:
            self._intermediate = prune(self._intermediate + [path], self.config.output.keep_last)
            self._states = prune(self._states + [sdir], self.config.output.keep_last)
        log.info("saved %s (state %s)", path, sdir)
        return SaveInfo(step=step, file_path=str(path), state_dir=str(sdir), final=final)

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
