"""Stage 2 of the reference model: the text encoder and the UNet, trained jointly on the
encoded scene pool with paraphrased captions."""

from __future__ import annotations

import logging
import random
import time

import torch

from .captions import caption
from .sampling import TokenCache, autocast
from .schedule import LearningRate, out_of_time

log = logging.getLogger(__name__)


def train_diffusion(unet, text_encoder, tokens: TokenCache, latents: tuple[torch.Tensor, ...],
                    scenes, scheduler_config: dict, *, steps: int,
                    batch_size: int, learning_rate: float = 5e-4, cfg_dropout: float = 0.1,
                    snr_gamma: float | None = 5.0, timestep_bias: float = 0.0,
                    subject_weight: float = 0.0,
                    ema_decay: float = 0.999,
                    scaling_factor: float = 0.18215, seed: int = 0,
                    device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32, deadline: float | None = None,
                    log_every: int = 100) -> dict:
    """Train ``unet`` and ``text_encoder`` jointly (epsilon loss); EMA weights are copied in.

    Args:
        unet: ``UNet2DConditionModel`` with ``cross_attention_dim`` = the encoder's width.
        text_encoder: ``CLIPTextModel``.
        tokens: caption -> token ids.
        latents: ``(mean, std, subject_mask)`` of the pool, unscaled, from ``encode_pool``.
        scenes: the pool's scenes (captions are drawn fresh each time, with paraphrases).
        scheduler_config: the DDPM config (betas, 1000 steps, epsilon).
        steps: optimiser steps.
        batch_size: latents per step.
        learning_rate: peak AdamW rate (warm-up, cosine decay).
        cfg_dropout: share of captions replaced by "" (the unconditional prompt).
        snr_gamma: Min-SNR loss weighting (``None``: plain MSE); speeds up convergence.
        timestep_bias: draw timesteps with density ~ (t / T) ** bias (0: uniform); more
            high-noise steps, where the layout (the subject's position) is decided.
        subject_weight: extra loss weight of latent pixels under the subject. The subject
            covers 5-15 % of the image; unweighted, the background dominates the loss and the
            model learns backgrounds long before shapes.
        ema_decay: decay of the weight average that is kept (0 disables it).
        scaling_factor: the VAE's latent scaling factor.
        seed: seeds batches, captions, noise and timesteps.
        device: where to train.
        dtype: autocast dtype (``torch.float32`` for none).
        deadline: ``time.perf_counter()`` value at which to stop early.
        log_every: log the running loss every this many steps.

    Returns:
        ``{"steps", "seconds", "images_per_second", "loss_curve": [[step, loss], ...]}``.
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    noise_sched = DDPMScheduler.from_config(scheduler_config)
    if noise_sched.config.prediction_type != "epsilon":
        raise ValueError(f"scheduler prediction_type = {noise_sched.config.prediction_type!r}; "
                         "the reference model is trained with 'epsilon'.")
    rng = random.Random(seed)
    gen = torch.Generator(device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    params = [*unet.parameters(), *text_encoder.parameters()]
    for m in (unet, text_encoder):
        m.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    lr = LearningRate(opt, learning_rate, steps, min(200, steps // 10), deadline)
    # EMA warm-up: the average spans about step**(2/3) recent steps (100 at step 1000), capped
    # by ``ema_decay``, so a short or early-stopped run does not keep its first, worst weights.
    ema = (EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
           if ema_decay > 0 else None)
    mean, std, masks = latents
    start, running, curve, done = time.perf_counter(), 0.0, [], 0
    for step in range(1, steps + 1):
        if out_of_time(deadline):
            log.warning("UNet: time budget reached after %d of %d steps", done, steps)
            break
        idx = torch.randint(len(scenes), (batch_size,), generator=cpu_gen)
        texts = ["" if rng.random() < cfg_dropout else caption(scenes[i], rng)
                 for i in idx.tolist()]
        idx = idx.to(device)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen, device=device)
             ) * scaling_factor
        noise = torch.randn(z.shape, generator=gen, device=device)
        u = torch.rand(batch_size, generator=gen, device=device)
        t = (u ** (1 / (1 + timestep_bias)) * noise_sched.config.num_train_timesteps).long()
        t = t.clamp_(max=noise_sched.config.num_train_timesteps - 1)
        noisy = noise_sched.add_noise(z, noise, t)
        with autocast(device, dtype):
            hidden = text_encoder(tokens(texts, device))[0]
            pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        weight = 1 + subject_weight * masks[idx]
        per_sample = ((pred.float() - noise).pow(2) * weight).mean(dim=(1, 2, 3)) / weight.mean(
            dim=(1, 2, 3))
        if snr_gamma:
            snr = compute_snr(noise_sched, t)
            per_sample = per_sample * torch.clamp(snr, max=snr_gamma) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr.update(step)
        opt.step()
        if ema is not None:
            ema.step(params)
        running, done = running + loss.item(), step
        if step % log_every == 0 or step == steps:
            n = step % log_every or log_every
            curve.append([step, round(running / n, 6)])
            elapsed = time.perf_counter() - start
            log.info("UNet step %d/%d  loss %.5f  %.3f s/step  %.0f img/s", step, steps,
                     running / n, elapsed / step, step * batch_size / elapsed)
            running = 0.0
    if ema is not None and done:
        ema.copy_to(params)
    for m in (unet, text_encoder):
        m.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    return {"steps": done, "seconds": round(seconds, 1),
            "images_per_second": round(done * batch_size / max(seconds, 1e-9), 1),
            "loss_curve": curve}
