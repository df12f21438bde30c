"""How long a training run will take on this machine, and its peak memory: measured, not
modelled.

The estimate runs the real loop (``loop.TrainingRun``) for a few steps on a probe: a copy of
a few of the dataset's own images (from its most common bucket, so the batches are full),
with the run's options, in a throwaway folder with its own cache. Each phase is timed:
loading the model, scanning and caching the images and encoding their captions (per
image), the sample round before training, each step, the final save and what comes after it
(the last samples, the loss plot). The run's time is then

    load + fixed data cost + per_image * images + steps * step + sample rounds * round
         + saves * save

with the first step's extra time (warm-up) counted once, sample rounds scaled by the run's
denoising steps over the probe's, and one save per ``output.save_every`` steps. The peak is
the probe's: the process's resident-memory high-water mark on the CPU (reset before the
probe through ``/proc/self/clear_refs``), or the accelerator's peak allocation, plus the
latents the run's larger cache keeps in memory. Measured error on CPU: docs/BENCHMARKS.md.

Only phases the probe ran are measured; it assumes an empty latent cache (a warm cache
makes the run faster than estimated) and the machine as loaded as during the probe.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .callbacks import Callbacks, StepInfo
from .config import TsuikaConfig, replace
from .data.folder import DatasetScan
from .device.host_memory import give_back_freed_memory
from .loop import TrainingRun
from .preflight import bucket_list

log = logging.getLogger(__name__)

PROBE_STEPS = 3  # the first is warm-up; the others are the step time
PROBE_SAMPLE_STEPS = 2


@dataclass
class RunEstimate:
    """Estimated time (seconds) and peak memory (bytes) of a run, and the probe's figures.

    Attributes:
        seconds: the whole run, from start to the last file written.
        setup_seconds: loading the model and scanning/caching the images.
        step_seconds: one optimizer step (after the first).
        sampling_seconds: every sample round of the run.
        cpu_seconds: the run's CPU time in this process: far less dependent on other
            programs sharing the machine than wall time (with one compute thread, about the
            wall time of an idle machine; on CPU it still grows with the load, see
            docs/BENCHMARKS.md).
        peak_bytes: peak memory; ``memory_kind`` says which ("cpu resident" or "cuda").
        probe_seconds: how long the probe itself took.
        images, steps: what the run holds and does.
    """

    seconds: float
    setup_seconds: float
    step_seconds: float
    sampling_seconds: float
    cpu_seconds: float
    peak_bytes: int
    memory_kind: str
    probe_seconds: float
    images: int
    steps: int
    device: str

    @property
    def text(self) -> str:
        """One line for reports."""
        return (f"estimate on this machine ({self.device}): {_duration(self.seconds)} for "
                f"{self.steps} steps ({self.step_seconds:.2f} s/step, setup "
                f"{_duration(self.setup_seconds)}, samples {_duration(self.sampling_seconds)}; "
                f"{_duration(self.cpu_seconds)} of CPU time), "
                f"peak memory {self.peak_bytes / 2**30:.2f} GiB ({self.memory_kind})")

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.text}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _Timed(Callbacks):
    """Each step's wall and CPU seconds (from the start report to the first step)."""

    def __init__(self):
        self.steps: list[float] = []
        self.cpu_steps: list[float] = []
        self._cpu = 0.0

    def on_start(self, info) -> None:
        self._cpu = time.process_time()

    def on_step(self, info: StepInfo) -> None:
        self.steps.append(info.seconds_per_step)
        now = time.process_time()
        self.cpu_steps.append(now - self._cpu)
        self._cpu = now


class _TimedRun(TrainingRun):
    """The real run, with each phase's time noted (the order is ``TrainingRun.setup``'s)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.times: dict[str, float] = {}  # wall seconds
        self.cpu: dict[str, float] = {}  # this process's CPU seconds, same keys

    def _phase(self, name: str, fn, *args):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.times[name] = time.perf_counter() - t
        self.cpu[name] = time.process_time() - c
        self.times[name + "_end"] = time.perf_counter()
        self.cpu[name + "_end"] = time.process_time()
        return out

    def _load_model(self) -> None:
        self._phase("load", super()._load_model)

    def _prepare_data(self) -> None:
        # The per-image parts of the data phase (scan, pre-flight, latent cache) are timed on
        # their own (``per_image``): the rest (moving the models, the run's identity) does
        # not grow with the dataset.
        self.times["per_image"] = self.cpu["per_image"] = 0.0
        self._phase("data", super()._prepare_data)

    @contextlib.contextmanager
    def per_image(self):
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.times["per_image"] += time.perf_counter() - t
            self.cpu["per_image"] += time.process_time() - c

    def encode_captions_once(self) -> None:
        # Every distinct caption up front (train.offload_text_encoders): grows with the data.
        self._phase("captions", super().encode_captions_once)

    def _prepare_method(self) -> None:
        # Between the end of the data phase and here: the sample round before training.
        self.times["samples_before"] = time.perf_counter() - self.times["data_end"]
        self.cpu["samples_before"] = time.process_time() - self.cpu["data_end"]
        super()._prepare_method()

    def save(self, final: bool):
        info = self._phase("save", super().save, final)
        return info


def _probe_items(scan: DatasetScan, config: TsuikaConfig, count: int):
    """``count`` images of the most common bucket (repeated when it holds fewer)."""
    from .data.buckets import assign_bucket

    buckets = bucket_list(config.data)
    by_bucket: dict = {}
    for item in scan.items:
        bucket = assign_bucket(item.width, item.height, buckets) if config.data.buckets else 0
        by_bucket.setdefault(bucket, []).append(item)
    common = max(by_bucket.values(), key=len)
    return [common[i % len(common)] for i in range(count)]


def _write_probe_folder(items, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, item in enumerate(items):
        shutil.copyfile(item.path, folder / f"{i:04d}{item.path.suffix.lower()}")
        (folder / f"{i:04d}.txt").write_text(item.caption, encoding="utf-8")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    give_back_freed_memory()
    with contextlib.suppress(OSError):  # not Linux: the peak then counts from process start
        Path("/proc/self/clear_refs").write_text("5")


def _peak(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda allocated"
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024, "cpu resident"
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu resident"


def estimate_run(config: TsuikaConfig, scan: DatasetScan,
                 startup: tuple[float, float] = (0.0, 0.0)) -> RunEstimate:
    """Estimate ``config``'s run on ``scan`` by timing a short probe run (module docstring).

    Args:
        config: the run's validated config (``model.path`` set: the probe loads the model
            as the run will).
        scan: the dataset the run trains on.
        startup: (wall, CPU) seconds the run spends before the loop that this process spent
            earlier (importing torch and the loop: a fresh ``tsuika train`` pays for it).
    """
    from .device import resolve_device

    config.require_inputs()
    device = resolve_device(config.train.device)
    batch = config.train.batch_size * config.train.gradient_accumulation
    items = _probe_items(scan, config, max(2, batch))
    prompts = config.sample.prompts
    with tempfile.TemporaryDirectory(prefix="tsuika-estimate-") as tmp:
        tmp = Path(tmp)
        _write_probe_folder(items, tmp / "data")
        probe = replace(config,
                        data={"dir": str(tmp / "data"), "cache_dir": str(tmp / "cache"),
                              "class_images": 0},
                        train={"steps": PROBE_STEPS, "resume": "", "lr_warmup_steps": 0},
                        output={"dir": str(tmp / "out"), "save_every": 0, "overwrite": True},
                        sample={"every": 0,
                                "steps": min(config.sample.steps, PROBE_SAMPLE_STEPS)})
        _reset_peak(device)
        cb = _Timed()
        t0 = time.perf_counter()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), contextlib.ExitStack() as scope:
            run = _TimedRun(probe, cb, None, None, scope)
            run.run()
            end, cpu_end = time.perf_counter(), time.process_time()
        probe_seconds = end - t0
        peak, kind = _peak(device)
    distinct = len({it.path for it in items})
    wall = _extrapolate(config, run.times, cb.steps, end, distinct, len(scan.items), prompts)
    cpu = _extrapolate(config, run.cpu, cb.cpu_steps, cpu_end, distinct, len(scan.items),
                       prompts)
    n = len(scan.items)
    latent_bytes = _latent_bytes(config) * max(0, n - len(items)) * (2 if config.data.flip else 1)
    del run
    give_back_freed_memory()
    return RunEstimate(seconds=wall["total"] + startup[0],
                       setup_seconds=wall["setup"] + startup[0],
                       step_seconds=wall["step"], sampling_seconds=wall["sampling"],
                       cpu_seconds=cpu["total"] + startup[1], peak_bytes=peak + latent_bytes,
                       memory_kind=kind, probe_seconds=probe_seconds, images=n,
                       steps=config.train.steps, device=str(device))


def _extrapolate(config: TsuikaConfig, times: dict, steps_seen: list[float], end: float,
                 distinct: int, n: int, prompts: list) -> dict[str, float]:
    """The run's phases from the probe's (wall or CPU seconds; see the module docstring)."""
    after = end - times["save_end"]  # the last sample round and the loss plot
    steady = statistics.median(steps_seen[1:]) if len(steps_seen) > 1 else steps_seen[0]
    warmup = max(0.0, steps_seen[0] - steady)
    # The VAE's hash (a cache key part) is computed once, outside the per-image timing.
    fixed = times["data"] - times["per_image"]
    # Copies of one image (a bucket with fewer images than a batch) hit the cache: per file.
    setup = times["load"] + fixed + (times["per_image"] + times["captions"]) / distinct * n
    rounds = 0
    if prompts:
        rounds = 2 + ((config.train.steps - 1) // config.sample.every
                      if config.sample.every else 0)
    sample_scale = config.sample.steps / min(config.sample.steps, PROBE_SAMPLE_STEPS)
    sampling = rounds * times["samples_before"] * sample_scale if prompts else 0.0
    saves = 1 + ((config.train.steps - 1) // config.output.save_every
                 if config.output.save_every else 0)
    total = (setup + warmup + config.train.steps * steady + sampling
             + saves * times["save"] + max(0.0, after - (times["samples_before"]
                                                         if prompts else 0.0)))
    return {"total": total, "setup": setup, "step": steady, "sampling": sampling}


def _latent_bytes(config: TsuikaConfig) -> int:
    """fp32 latents of one image kept in memory by the cache (4 channels at 1/8 scale)."""
    if not config.data.cache_latents:
        return 0
    side = config.data.resolution / 8
    return int(4 * 4 * math.ceil(side * side))
