"""THE training loop: one readable function, host-agnostic, device and precision as arguments.

Every random draw of step ``s`` comes from generators seeded by (seed, micro-batch index), so
a resumed run repeats exactly what an uninterrupted one would have done. Under
``accelerate launch`` the same loop runs data-parallel: each process takes every N-th
micro-batch and DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import prior
from .callbacks import Callbacks, SaveInfo, StepInfo, TrainingStopped
from .config import TsuikaConfig
from .device import resolve_device, resolve_precision
from .families import ModelBundle, get_family, load_model
from .guards import NonFiniteLoss, resume_into, run_identity
from .methods import get_method
from .ops.cpu_conv import packed_frozen_convs
from .optimizers import (
    StepInBackward,
    make_optimizer,
    trained_weights_dtype,
    wants_step_in_backward,
)
from .prepare import TrainingData
from .run_io import FIX_LR, RunWriter, open_output
from .state import TrainingState, load_resume

log = logging.getLogger(__name__)


__all__ = ["NonFiniteLoss", "TrainResult", "train"]


@dataclass
class TrainResult:
    lora_path: Path | None  # None on data-parallel ranks other than the main one
    state_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    samples_before: list = field(default_factory=list)
    samples_after: list = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def _distributed():
    """An accelerate Accelerator when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    # On a machine without CUDA, accelerate only goes multi-process (gloo) when told cpu=True.
    return Accelerator(cpu=not torch.cuda.is_available())


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
        return _train(config, callbacks, bundle, scan, run_scope)


def _train(config, callbacks, bundle, scan, run_scope: contextlib.ExitStack) -> TrainResult:
    cb = callbacks or Callbacks()
    acc = _distributed()
    device = acc.device if acc is not None else resolve_device(config.train.device)
    precision = resolve_precision(device, config.train.mixed_precision)
    method = get_method(config.network.method)
    if acc is None or acc.is_main_process:  # output.dir checked and locked before any load
        notes: list[str] = []
        run_scope.enter_context(open_output(config, notes))
        for note in notes:
            cb.on_message(note)
    # Frozen weights live in the compute dtype. Base weights a method trains are stored as
    # train.trained_weights says (fp32 masters under autocast, or bf16 with stochastic
    # rounding). Loaded straight into the dtype they are kept in.
    unet_dtype = te_dtype = precision.compute_dtype
    if method.trains_base_weights:
        unet_dtype = trained_weights_dtype(config, precision.compute_dtype)
        # A frozen text encoder is written back into the checkpoint: keep its precision.
        te_dtype = unet_dtype if method.trains_text_encoder(config) else torch.float32
    if bundle is None:
        config.require_inputs()
        bundle = load_model(config.model.path, config.model.family, config.model.prediction_type,
                            dtype=te_dtype if te_dtype == torch.float32 else unet_dtype)
    family = get_family(bundle.family)
    method.validate(config, bundle)
    out = RunWriter(config, bundle, is_main=acc is None or acc.is_main_process)

    # The VAE stays fp32 (it is used only to fill the cache, and half-precision SD VAEs are
    # known to overflow).
    _move(bundle.vae, device, torch.float32)
    prior.check_class_dir(config)
    data = TrainingData(config, bundle, precision, out.cache_dir, scan=scan)
    for skipped in data.scan.skipped:
        cb.on_message(f"skipped {skipped.path}: {skipped.reason}")
    for warning in data.scan.warnings:
        cb.on_message(f"warning: {warning}")
    out.identity = run_identity(config, bundle, data.scan.fingerprint())  # before training
    _move(bundle.unet, device, unet_dtype)
    for te in bundle.text_encoders:
        te.to(device, te_dtype)
    if acc is None or acc.is_main_process:
        prior.generate_missing(config, family, bundle, precision, cb)  # with the base model
    if acc is not None and not acc.is_main_process:
        acc.wait_for_everyone()  # rank 0 draws class images and fills the shared cache first
    class_data = prior.class_data(config, bundle, precision, out.cache_dir)
    hits, encoded = data.fill_latent_cache()
    if class_data is not None:
        class_hits, class_encoded = class_data.fill_latent_cache()
        cb.on_message(f"prior preservation: {len(class_data.examples)} class images; latent "
                      f"cache: {class_hits} reused, {class_encoded} encoded")
    if acc is not None and acc.is_main_process:
        acc.wait_for_everyone()
    cb.on_message(f"{len(data.examples)} images used, {len(data.scan.skipped)} skipped; "
                  f"latent cache: {hits} reused, {encoded} encoded")
    if data.cache is not None:
        bundle.vae.to("cpu")  # everything it had to encode is cached

    samples_before = out.sample(family, bundle, precision, step=0, cb=cb)
    torch.manual_seed(config.train.seed)  # adapter initialisation draws from the global RNG
    groups = method.prepare(config, bundle)
    train_te = method.trains_text_encoder(config)
    text_cache: dict[str, dict] = {}
    if config.train.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
    bundle.unet.train()
    if config.train.compile:
        bundle.unet.compile()  # in place: state_dict keys and the adapters stay as they are
    elif device.type == "cpu" and config.train.cpu_prepack_pixels:
        # Until the run ends (or fails): the plain weights come back when the scope closes.
        run_scope.enter_context(packed_frozen_convs(bundle.unet,
                                                    config.train.cpu_prepack_pixels))

    optimizer = make_optimizer(config, groups, device)
    in_backward = wants_step_in_backward(config, method.trains_base_weights, acc is not None,
                                         precision.compute_dtype == torch.float16)
    from diffusers.optimization import get_scheduler

    total = config.train.steps
    lr_sched = get_scheduler(config.train.lr_scheduler if config.train.lr_warmup_steps == 0
                             or config.train.lr_scheduler != "constant"
                             else "constant_with_warmup", optimizer,
                             num_warmup_steps=config.train.lr_warmup_steps,
                             num_training_steps=total)
    start = 0
    resumed = load_resume(config.train.resume, out.dir, max_step=total)
    if resumed is not None:
        resume_dir, st, skipped_states = resumed
        for note in skipped_states + resume_into(resume_dir, st, config, out.identity, method,
                                                  bundle, optimizer, lr_sched):
            cb.on_message(f"warning: {note}")
        start = st.step
        cb.on_message(f"resumed from {resume_dir} at step {start}")
        out.losses = [tuple(r) for r in st.info.get("losses", [])][:start]

    unet = bundle.unet
    if acc is not None:
        unet = torch.nn.parallel.DistributedDataParallel(unet, device_ids=None
                                                         if device.type == "cpu" else [device])
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(bundle.scheduler_config)
    alphas = noise_sched.alphas_cumprod.to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.compute_dtype == torch.float16)
    params = [p for g in groups for p in g["params"]]
    accum, world = config.train.gradient_accumulation, acc.num_processes if acc else 1
    rank = acc.process_index if acc else 0

    def save(step: int, final: bool) -> SaveInfo:
        state = TrainingState(step=step, trainable=method.trainable_state(bundle),
                              optimizer=optimizer.state_dict(), scheduler=lr_sched.state_dict(),
                              info={"losses": out.losses})
        info = out.save(method, state, step, final)
        cb.on_save(info)
        return info

    def forward_loss(batch, seed: int) -> torch.Tensor:
        """One micro-batch's loss (still attached to the graph)."""
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
        with torch.set_grad_enabled(train_te), precision.context():
            cond = _encode(family, bundle, batch.captions, device, text_cache,
                           cache_ok=data.captions_static and not train_te)
        # Dropout inside the adapters uses the global RNG: seed it per micro-batch.
        torch.manual_seed(seed)
        with precision.context():
            pred = family.predict(bundle, noisy, t, cond) if acc is None else unet(
                noisy, t, encoder_hidden_states=cond["encoder_hidden_states"],
                return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
        if config.train.min_snr_gamma:
            loss = loss * _min_snr_weight(alphas, t, config.train.min_snr_gamma,
                                          bundle.prediction_type)
        return loss.mean()

    cb.on_start({"images": len(data.examples), "steps": total, "start_step": start,
                 "buckets": {f"{w}x{h}": n for (w, h), n in data.bucket_counts.items()},
                 "trainable_parameters": sum(p.numel() for p in params),
                 "device": str(device), "dtype": str(precision.compute_dtype)})
    if in_backward:  # until the run ends: the hooks go when the scope closes
        run_scope.enter_context(StepInBackward(optimizer, config.train.max_grad_norm))
        cb.on_message("optimizer steps inside the backward pass (gradients freed as they "
                      "are used; gradient clipping per tensor)")
    step = start
    t_last = time.perf_counter()
    while step < total:
        if cb.should_stop():
            info = save(step, final=False)
            raise TrainingStopped(
                f"training stopped at step {step}/{total}; the file so far is {info.lora_path} "
                f"and a resumable state is {info.state_dir} (resume with train.resume = "
                f"'{info.state_dir}' or 'latest').", info)
        loss_sum = torch.zeros((), device=device)
        for j in range(accum):
            m = (step * accum + j) * world + rank
            batch, epoch = data.micro_batch(m)
            loss = forward_loss(batch, config.train.seed * 1_000_003 + m)
            if class_data is not None:  # prior preservation: its own stream of draws
                loss = loss + config.train.prior_loss_weight * forward_loss(
                    class_data.micro_batch(m)[0], config.train.seed * 1_000_003 + m + (1 << 40))
            # One backward per micro-batch: with the step inside it, one backward is one step.
            scaler.scale(loss / accum).backward()
            loss_sum += loss.detach() / accum
        scaler.unscale_(optimizer)
        if config.train.max_grad_norm and not in_backward:
            torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
        loss_value = float(loss_sum)  # one host sync per step: the progress bar shows it
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"the loss became {loss_value} at step {step + 1}; stopped "
                                f"without saving the broken weights; "
                                f"{out.last_good_text()}. {FIX_LR}")
        scaler.step(optimizer)
        scaler.update()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        now = time.perf_counter()
        lr = lr_sched.get_last_lr()[0]
        out.losses.append((step, loss_value, lr))
        cb.on_step(StepInfo(step=step, total_steps=total, loss=loss_value, learning_rate=lr,
                            seconds_per_step=now - t_last, epoch=epoch))
        t_last = now
        every = config.sample.every
        if every and step % every == 0 and step < total:
            out.sample(family, bundle, precision, step=step, cb=cb)
        if config.output.save_every and step % config.output.save_every == 0 and step < total:
            save(step, final=False)

    if acc is not None:
        _check_ranks_in_sync(acc, params)
    final = save(step, final=True)
    samples_after = out.sample(family, bundle, precision, step=step, cb=cb, final=True)
    files = out.finish(samples_before, samples_after)
    return TrainResult(lora_path=Path(final.lora_path) if final.lora_path else None,
                       state_dir=Path(final.state_dir) if final.state_dir else None, steps=step,
                       losses=[r[1] for r in out.losses], samples_before=samples_before,
                       samples_after=samples_after, files=files)


def _move(module: torch.nn.Module, device, dtype) -> None:
    # torch's own .to(): diffusers' override warns about fp32-kept modules these models lack.
    torch.nn.Module.to(module, device=device, dtype=dtype)


def _encode(family, bundle, captions, device, cache, cache_ok):
    if not cache_ok:
        return family.encode_text(bundle, captions, device)
    missing = [c for c in dict.fromkeys(captions) if c not in cache]
    if missing:
        with torch.no_grad():
            enc = family.encode_text(bundle, missing, device)
        for i, c in enumerate(missing):
            cache[c] = {k: v[i:i + 1].detach() for k, v in enc.items()}
    return {k: torch.cat([cache[c][k] for c in captions]) for k in cache[captions[0]]}


def _min_snr_weight(alphas_cumprod, t, gamma, prediction_type):
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR (or SNR + 1 for v)."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def _check_ranks_in_sync(acc, params):
    """Every process must end with the same weights; say so (or fail) explicitly."""
    local = torch.stack([p.detach().float().sum() for p in params]).sum().reshape(1)
    gathered = acc.gather(local.to(acc.device))
    spread = float(gathered.max() - gathered.min())
    if spread > 1e-5 * max(1.0, float(gathered.abs().max())):
        raise RuntimeError(f"data-parallel ranks diverged: weight checksums {gathered.tolist()}")
    log.info("ranks in sync: %d processes, weight checksum %.6f", acc.num_processes,
             float(gathered[0]))
