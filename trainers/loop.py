"""THE training loop: one readable run (``TrainingRun``), host-agnostic, device and precision
as arguments.

Every random draw of step ``s`` comes from generators seeded by (seed, micro-batch index), so
a resumed run repeats exactly what an uninterrupted one would have done. Under
``accelerate launch`` the same loop runs data-parallel: each process takes every N-th
micro-batch and DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import prior
from .callbacks import Callbacks, SaveInfo, StepInfo, TrainingStopped
from .config import TsuikaConfig
from .device import resolve_device, resolve_precision
from .device.cpu_conv import packed_frozen_convs
from .device.stored_dtype import StoredDtype
from .distributed import accelerator_if_launched, check_ranks_in_sync
from .families import ModelBundle, get_family, load_model
from .guards import NonFiniteLoss, run_identity
from .init_lora import adopt_init_lora
from .methods import get_method
from .model_placement import ModelDtypes, place_unet_and_encoders, place_vae
from .preflight import dataset_report
from .prepare import TrainingData
from .run_io import FIX_LR, RunWriter, open_output
from .text_conditioning import TextConditioning
from .updates import WeightUpdates

log = logging.getLogger(__name__)


__all__ = ["NonFiniteLoss", "TrainResult", "train"]


@dataclass
class TrainResult:
    file_path: Path | None  # None on data-parallel ranks other than the main one
    state_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    samples_before: list = field(default_factory=list)
    samples_after: list = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def train(config: TsuikaConfig, callbacks: Callbacks | None = None,
          bundle: ModelBundle | None = None, scan=None) -> TrainResult:
    """Train ``config.network.method`` on ``config.data.dir`` and write the results.

    Args:
        config: a validated :class:`TsuikaConfig`.
        callbacks: the host's listener (progress, samples, stop requests).
        bundle: already-loaded models (the ComfyUI nodes pass the user's models); when
            None, ``config.model.path`` is loaded.
        scan: an already-scanned dataset (``data.folder.DatasetScan``); None scans data.dir.
    """
    # The loop seeds torch's global RNG per step (adapter dropout); the host's RNG state is
    # restored afterwards, so a long-lived host (ComfyUI) sees no side effect.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda), contextlib.ExitStack() as run_scope:
        return TrainingRun(config, callbacks, bundle, scan, run_scope).run()


class TrainingRun:
    """One run, in the order it happens.

    :meth:`setup` loads the models and the data, prepares the method, the optimizer and a
    resumed state; :meth:`run` then calls :meth:`step` until ``train.steps`` (each step one
    :meth:`forward_loss` per micro-batch, then one optimizer update), calling :meth:`save`
    on the way and at the end. ``step_count`` is the number of optimizer steps done (a
    resumed run starts at its state's step).

    Args:
        config, callbacks, bundle, scan: as for :func:`train`.
        scope: holds what must be undone when the run ends or fails (packed convolutions,
            optimizer hooks); :func:`train` closes it, and restores the global RNG.
    """

    def __init__(self, config: TsuikaConfig, callbacks: Callbacks | None,
                 bundle: ModelBundle | None, scan, scope: contextlib.ExitStack):
        self.config = config
        self.cb = callbacks or Callbacks()
        self.bundle = bundle
        self.scan = scan
        self.scope = scope
        self.acc = accelerator_if_launched()
        self.is_main = self.acc is None or self.acc.is_main_process
        self.step_count = 0

    # -- setup ------------------------------------------------------------------------------
    def per_image(self) -> contextlib.AbstractContextManager:
        """Around the data phase's work that grows with the number of images (scan,
        pre-flight check, latent cache): the estimate's probe times it (trainers/estimate.py)."""
        return contextlib.nullcontext()

    def setup(self) -> None:
        """Everything before the first step, in an order resumed runs depend on."""
        self._load_model()
        self._prepare_data()
        self.samples_before = self.out.sample(self.family, self.bundle, self.precision, step=0,
                                              cb=self.cb)
        self._prepare_method()
        self.encode_captions_once()
        self._prepare_updates()
        self._prepare_step()

    def _load_model(self) -> None:
        """Device, precision and method; the model loaded in the dtypes the method needs."""
        config, acc = self.config, self.acc
        self.device = acc.device if acc is not None else resolve_device(config.train.device)
        self.precision = resolve_precision(self.device, config.train.mixed_precision)
        self.method = method = get_method(config.network.method)
        if self.is_main:  # output.dir checked and locked before any load
            notes: list[str] = []
            self.scope.enter_context(open_output(config, notes))
            for note in notes:
                self.cb.on_message(note)
        self.dtypes = ModelDtypes.for_run(config, self.precision, method,
                                          loads_model=self.bundle is None)
        self.stored: list[StoredDtype] = []  # per-layer casts, once the models are placed
        if self.bundle is None:
            config.require_inputs()
            self.bundle = load_model(config.model.path, config.model.family,
                                     config.model.prediction_type, dtype=self.dtypes.load)
        self.family = get_family(self.bundle.family)
        init_steps = 0
        if config.network.init_lora:  # the file decides the network before validation
            notes, init_steps = adopt_init_lora(config, self.bundle)
            for note in notes:
                self.cb.on_message(note)
        method.validate(config, self.bundle)
        self.out = RunWriter(config, self.bundle, is_main=self.is_main)
        self.out.step_offset = init_steps

    def _prepare_data(self) -> None:
        """Scan the data, fill the latent caches (rank 0 first), move the models in place."""
        config, cb, acc, bundle, device = self.config, self.cb, self.acc, self.bundle, self.device
        place_vae(bundle, device)
        prior.check_class_dir(config)
        hook = getattr(self.method, "caption", None)  # the instance data's, not the class's
        with self.per_image():
            self.data = data = TrainingData(
                config, bundle, self.precision, self.out.cache_dir, scan=self.scan,
                caption_hook=None if hook is None else functools.partial(hook, config))
            if self.is_main:  # the pre-flight check, shown with the start report (scan done)
                self.preflight = dataset_report(config, bundle, data.scan, cb)
        for skipped in data.scan.skipped:
            cb.on_message(f"skipped {skipped.path}: {skipped.reason}")
        for warning in data.scan.warnings:
            cb.on_message(f"warning: {warning}")
        self.out.identity = run_identity(config, bundle, data.scan.fingerprint())  # before training
        if acc is not None and not acc.is_main_process:
            acc.wait_for_everyone()  # rank 0 draws class images and fills the shared cache first
        # The VAE alone on the device while it encodes: at 1024 px its activations and an
        # SDXL UNet beside it would set the run's peak (measured in docs/BENCHMARKS.md).
        if data.cache is not None:  # the VAE's hash (in every cache key): once, not per image
            _ = data.vae_hash
        with self.per_image():
            hits, encoded = data.fill_latent_cache()
        self.stored = place_unet_and_encoders(
            bundle, device, self.dtypes, scope=self.scope,
            encoders_shared="host_shared_bytes" in bundle.extra
            and not self.method.trains_text_encoder(config))
        if self.is_main:
            prior.generate_missing(config, self.family, bundle, self.precision, cb)  # base model
        self.class_data = prior.class_data(config, bundle, self.precision, self.out.cache_dir)
        if self.class_data is not None and data.cache is not None:
            self.class_data.vae_hash = data.vae_hash  # the same VAE: read its weights once
        if self.class_data is not None:
            class_hits, class_encoded = self.class_data.fill_latent_cache()
            cb.on_message(f"prior preservation: {len(self.class_data.examples)} class images; "
                          f"latent cache: {class_hits} reused, {class_encoded} encoded")
        if acc is not None and acc.is_main_process:
            acc.wait_for_everyone()
        cb.on_message(f"{len(data.examples)} images used, {len(data.scan.skipped)} skipped; "
                      f"latent cache: {hits} reused, {encoded} encoded")
        if data.cache is not None:
            bundle.vae.to("cpu")  # everything it had to encode is cached

    def _prepare_method(self) -> None:
        """Let the method change the modules (adapters, unfrozen weights); train mode."""
        config, bundle = self.config, self.bundle
        torch.manual_seed(config.train.seed)  # adapter initialisation draws from the global RNG
        self.groups = self.method.prepare(config, bundle)
        for stored in self.stored:  # base weights a method unfroze train in the compute dtype
            stored.release_trained()
        self.train_te = self.method.trains_text_encoder(config)
        self.text = TextConditioning(self.family, bundle, self.device,
                                     cacheable=self.data.captions_static and not self.train_te)
        if config.train.gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
        bundle.unet.train()
        if config.train.compile:
            bundle.unet.compile()  # in place: state_dict keys and the adapters stay as they are
        elif self.device.type == "cpu" and config.train.cpu_prepack_pixels:
            # Until the run ends (or fails): the plain weights come back when the scope closes.
            self.scope.enter_context(packed_frozen_convs(bundle.unet,
                                                         config.train.cpu_prepack_pixels))

    def encode_captions_once(self) -> None:
        """Every caption's conditioning before the first step, then the text encoders off
        the accelerator (``train.offload_text_encoders``), when no caption can change."""
        if not (self.config.train.offload_text_encoders and self.text.cacheable):
            if not (self.train_te or self.data.captions_static):
                self.cb.on_message("captions change every step (tag shuffling or dropout): the "
                                   "text encoders run every step and stay on the device; "
                                   "data.caption_variants = 16 encodes 16 versions of each "
                                   "caption once instead")
            return
        captions = [d.fixed_captions() for d in (self.data, self.class_data) if d is not None]
        if any(c is None for c in captions):
            return
        with self.precision.context():
            count = self.text.encode_all([c for cs in captions for c in cs])
        moved = self.text.offload()
        self.scope.callback(self.text.restore)  # where they were, when the run ends or fails
        self.cb.on_message(f"{count} captions encoded once before the first step" + (
            f"; text encoders moved off {self.device} ({moved / 2**30:.2f} GiB)" if moved
            else ""))

    def _prepare_updates(self) -> None:
        """The optimizer, schedule, scaler and EMA; then ``train.resume``'s state into them."""
        self.updates = updates = WeightUpdates.for_run(
            self.config, self.groups, self.bundle, self.device, self.precision.compute_dtype,
            self.method.trains_base_weights, distributed=self.acc is not None)
        resumed = updates.resume(self.config, self.out.dir, self.out.identity, self.method,
                                 self.bundle)
        if resumed is None:
            return
        for note in resumed.notes:
            self.cb.on_message(f"warning: {note}")
        self.step_count = resumed.step
        self.out.losses = resumed.losses
        self.cb.on_message(f"resumed from {resumed.folder} at step {resumed.step}")

    def _prepare_step(self) -> None:
        """What every step uses: the module to call, the noise schedule, the grad scaler."""
        acc, device = self.acc, self.device
        self.unet = self.bundle.unet  # called through family.predict
        if acc is not None:
            self.unet = torch.nn.parallel.DistributedDataParallel(
                self.bundle.unet, device_ids=None if device.type == "cpu" else [device])
        from diffusers import DDPMScheduler

        self.noise_sched = DDPMScheduler.from_config(self.bundle.scheduler_config)
        self.alphas = self.noise_sched.alphas_cumprod.to(device)
        self.accum = self.config.train.gradient_accumulation
        self.world = acc.num_processes if acc else 1
        self.rank = acc.process_index if acc else 0

    # -- one step ---------------------------------------------------------------------------
    def forward_loss(self, batch, seed: int) -> torch.Tensor:
        """One micro-batch's loss (still attached to the graph); every draw from ``seed``."""
        config, bundle, device, precision = self.config, self.bundle, self.device, self.precision
        noise_sched = self.noise_sched
        latents = batch.latents.to(device)
        g = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(latents.shape, generator=g)
        if config.train.noise_offset:
            noise += config.train.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],),
                          generator=g)
        noise, t = noise.to(device), t.to(device)
        noisy = noise_sched.add_noise(latents, noise, t)
        target = noise if bundle.prediction_type == "epsilon" else \
            noise_sched.get_velocity(latents, noise, t)
        with torch.set_grad_enabled(self.train_te), precision.context():
            cond = self.text(batch.captions)
        if batch.time_ids is not None:  # per-sample size / crop conditioning (SDXL)
            cond = dict(cond, time_ids=batch.time_ids.to(device))
        # Dropout inside the adapters uses the global RNG: seed it per micro-batch.
        torch.manual_seed(seed)
        with precision.context():
            # self.unet: the UNet itself, or its DDP wrapper (which averages the gradients).
            pred = self.family.predict(bundle, noisy, t, cond, self.unet)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
        if config.train.min_snr_gamma:
            loss = loss * _min_snr_weight(self.alphas, t, config.train.min_snr_gamma,
                                          bundle.prediction_type)
        return loss.mean()

    def step(self) -> tuple[float, int]:
        """One optimizer step over ``train.gradient_accumulation`` micro-batches; returns the
        step's loss and the epoch it drew from. Refuses a non-finite loss before updating."""
        config, step = self.config, self.step_count
        accum, world, rank = self.accum, self.world, self.rank
        seed = config.train.seed * 1_000_003
        loss_sum = torch.zeros((), device=self.device)
        for j in range(accum):
            m = (step * accum + j) * world + rank
            batch, epoch = self.data.micro_batch(m)
            loss = self.forward_loss(batch, seed + m)
            if self.class_data is not None:  # prior preservation: its own stream of draws
                loss = loss + config.train.prior_loss_weight * self.forward_loss(
                    self.class_data.micro_batch(m)[0], seed + m + (1 << 40))
            # One backward per micro-batch: with the step inside it, one backward is one step.
            self.updates.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach() / accum
        self.updates.unscale_and_clip()
        loss_value = float(loss_sum)  # one host sync per step: the progress bar shows it
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"the loss became {loss_value} at step {step + 1}; stopped "
                                f"without saving the broken weights; "
                                f"{self.out.last_good_text()}. {FIX_LR}")
        self.step_count = step + 1
        self.updates.apply(self.step_count)
        return loss_value, epoch

    def save(self, final: bool) -> SaveInfo:
        """Write the method's file (the EMA when on) and a resumable state (the trained
        weights, and the EMA when on) at the current step; tell the host."""
        state = self.updates.state(self.step_count, self.method.trainable_state(self.bundle),
                                   self.out.losses)
        with self.updates.ema_applied():  # the state above already holds the trained weights
            info = self.out.save(self.method, state, self.step_count, final)
        self.cb.on_save(info)
        return info

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Set up, step to ``train.steps`` (sampling and saving on the way), save, report."""
        self.setup()
        config, cb = self.config, self.cb
        total = config.train.steps
        cb.on_start({"images": len(self.data.examples), "steps": total,
                     "start_step": self.step_count,
                     "buckets": {f"{w}x{h}": n for (w, h), n in self.data.bucket_counts.items()},
                     "trainable_parameters": sum(p.numel() for p in self.updates.params),
                     "device": str(self.device), "dtype": str(self.precision.compute_dtype),
                     "preflight": getattr(self, "preflight", "")})
        self.scope.enter_context(self.updates.step_in_backward())  # hooks go with the scope
        for note in self.updates.messages():
            cb.on_message(note)
        t_last = time.perf_counter()
        while self.step_count < total:
            if cb.should_stop():
                info = self.save(final=False)
                raise TrainingStopped(
                    f"training stopped at step {self.step_count}/{total}; the file so far is "
                    f"{info.file_path} and a resumable state is {info.state_dir} (resume with "
                    f"train.resume = '{info.state_dir}' or 'latest').", info)
            loss_value, epoch = self.step()
            step = self.step_count
            now = time.perf_counter()
            lr = self.updates.learning_rate()
            self.out.losses.append((step, loss_value, lr))
            cb.on_step(StepInfo(step=step, total_steps=total, loss=loss_value, learning_rate=lr,
                                seconds_per_step=now - t_last, epoch=epoch))
            t_last = now
            every = config.sample.every
            if every and step % every == 0 and step < total:
                with self.updates.ema_applied():
                    self.out.sample(self.family, self.bundle, self.precision, step=step, cb=cb)
            if config.output.save_every and step % config.output.save_every == 0 and step < total:
                self.save(final=False)

        if self.acc is not None:
            check_ranks_in_sync(self.acc, self.updates.params)
        final = self.save(final=True)
        if self.updates.ema is not None:  # the model in memory now holds what the file holds
            self.updates.ema.copy_to()
        samples_after = self.out.sample(self.family, self.bundle, self.precision,
                                        step=self.step_count, cb=cb, final=True)
        files = self.out.finish(self.samples_before, samples_after)
        return TrainResult(file_path=Path(final.file_path) if final.file_path else None,
                           state_dir=Path(final.state_dir) if final.state_dir else None,
                           steps=self.step_count, losses=[r[1] for r in self.out.losses],
                           samples_before=self.samples_before, samples_after=samples_after,
                           files=files)


def _min_snr_weight(alphas_cumprod, t, gamma, prediction_type):
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR (or SNR + 1 for v)."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
