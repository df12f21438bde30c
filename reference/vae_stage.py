"""Stage 1 of the reference model: the VAE, trained on freshly rendered scenes, then its latent
normalisation, and the encoded scene pool stage 2 trains on."""

from __future__ import annotations

import logging
import math
import random
import time

import numpy as np
import torch
from torch.nn import functional as F

from .concepts import BACKGROUNDS
from .sampling import autocast
from .schedule import LearningRate, out_of_time
from .world import render, sample_scene

log = logging.getLogger(__name__)


def render_batch(scenes, size: int) -> torch.Tensor:
    """Rendered ``scenes`` as float (N, 3, size, size) in [-1, 1] on the CPU."""
    pixels = np.stack([np.asarray(render(s, size)) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def augment_dihedral(images: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Each image turned by a random multiple of 90 degrees and maybe mirrored.

    The VAE only sees pretraining scenes, but it should be a generic codec: turned stripes
    are the vertical edges that checkered textures need, turned triangles the points of
    hearts, so fine-tuning on held-out concepts is not capped by the decoder.
    """
    out = []
    for img in images:
        img = torch.rot90(img, rng.randrange(4), dims=(1, 2))
        out.append(img.flip(2) if rng.random() < 0.5 else img)
    return torch.stack(out)


def subject_mask(images: torch.Tensor, scenes) -> torch.Tensor:
    """(N, 1, H, W): 1 where a pixel of ``images`` (in [-1, 1]) is not the plain background
    of its scene (subject and its antialiased edge), else 0."""
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32)
    bg = (bg / 127.5 - 1)[:, :, None, None]
    return ((images - bg).abs().amax(dim=1, keepdim=True) > 2 / 255).float()


def pixel_loss(rec: torch.Tensor, x: torch.Tensor, scenes, *, subject_weight: float = 4.0,
               l1_weight: float = 1.0) -> torch.Tensor:
    """MSE + L1 between reconstructions and renders (both in [-1, 1]), subject pixels weighted
    ``1 + subject_weight``: a small subject is ~5 % of the image and would barely count."""
    weight = (1 + subject_weight * subject_mask(x.cpu(), scenes)).to(x.device)
    err = rec.float() - x
    return ((err.pow(2) + l1_weight * err.abs()) * weight).sum() / (weight.sum() * 3)


def train_vae(vae, *, steps: int, batch_size: int, learning_rate: float = 1e-3,
              kl_weight: float = 1e-6, l1_weight: float = 1.0, subject_weight: float = 4.0,
              seed: int = 0, image_size: int = 64,
              device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
              deadline: float | None = None, log_every: int = 50,
              whole_world: bool = False) -> dict:
    """Train ``vae`` in place on fresh renders of pretraining scenes.

    Args:
        vae: an ``AutoencoderKL`` (moved to ``device``).
        steps: optimiser steps, one freshly rendered batch each.
        batch_size: images per step.
        learning_rate: peak AdamW rate (warm-up, cosine decay).
        kl_weight: weight of the KL term (mean per latent element) against the pixel MSE.
        l1_weight: weight of an L1 pixel term, which keeps edges and stripes sharper than
            MSE alone.
        subject_weight: extra weight of pixels that differ from the background. A small
            subject covers ~5 % of the image; unweighted, its colour barely moves the loss.
        seed: seeds scenes and posterior samples.
        whole_world: also show it the held-out concepts. The VAE is a codec, not a concept
            learner (SD's VAE has seen everything); trained on pretraining scenes only, it
            cannot draw checkered fills or the zorbit's colours, which caps what any
            fine-tuning can teach (``reference.quality.vae_ceiling``).
        image_size: render side.
        device: where to train.
        dtype: autocast dtype (``torch.float32`` for none).
        deadline: ``time.perf_counter()`` value at which to stop early.
        log_every: log the running loss every this many steps.

    Returns:
        ``{"steps", "seconds", "loss_curve": [[step, mse], ...]}``.
    """
    rng = random.Random(seed)
    gen = torch.Generator(device).manual_seed(seed)
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    lr = LearningRate(opt, learning_rate, steps, min(100, steps // 10), deadline)
    start, running, curve, done = time.perf_counter(), 0.0, [], 0
    for step in range(1, steps + 1):
        if out_of_time(deadline):
            log.warning("VAE: time budget reached after %d of %d steps", done, steps)
            break
        scenes = [sample_scene(rng, include_held_out=whole_world) for _ in range(batch_size)]
        x = augment_dihedral(render_batch(scenes, image_size), rng).to(device)
        with autocast(device, dtype):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=gen)).sample
        mse = (rec.float() - x).pow(2).mean().detach()
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        loss = pixel_loss(rec, x, scenes, subject_weight=subject_weight,
                          l1_weight=l1_weight) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        lr.update(step)
        opt.step()
        running, done = running + mse.item(), step
        if step % log_every == 0 or step == steps:
            n = step % log_every or log_every
            curve.append([step, round(running / n, 6)])
            elapsed = time.perf_counter() - start
            log.info("VAE step %d/%d  mse %.5f  kl %.3f  %.2f s/step", step, steps,
                     running / n, kl.item(), elapsed / step)
            running = 0.0
    vae.eval().requires_grad_(False)
    return {"steps": done, "seconds": round(time.perf_counter() - start, 1),
            "loss_curve": curve}


@torch.no_grad()
def reconstruction_psnr(vae, scenes, *, device: torch.device, image_size: int = 64,
                        batch_size: int = 128) -> float:
    """PSNR (dB, 8-bit range) of ``vae``'s reconstructions (posterior mode) of ``scenes``.

    Args:
        vae: the autoencoder.
        scenes: scenes to render and reconstruct.
        device: where to run.
        image_size: render side.
        batch_size: images per pass.
    """
    err, count = 0.0, 0
    for i in range(0, len(scenes), batch_size):
        x = render_batch(scenes[i:i + batch_size], image_size).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        err += float(((rec - x) / 2).pow(2).sum())
        count += x.numel()
    return 10 * math.log10(1 / max(err / count, 1e-12))


@torch.no_grad()
def normalize_latents(vae, scenes, *, device: torch.device, image_size: int = 64) -> dict:
    """Fold a per-channel affine map into ``vae`` so ``latents * scaling_factor`` ~ N(0, 1).

    Single-file checkpoints cannot carry a scaling factor (loaders assume SD's 0.18215), so
    the normalisation lives in the weights: the mean half of ``quant_conv`` is shifted and
    scaled, its log-variance half shifted accordingly, and ``post_quant_conv`` undoes the map.
    Reconstructions are unchanged.

    Args:
        vae: the trained autoencoder (with quant convs).
        scenes: scenes whose latents give the statistics.
        device: where to run.
        image_size: render side.

    Returns:
        the per-channel mean and std before, and the check after, as lists.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("the VAE config has use_quant_conv/use_post_quant_conv off; the "
                         "latent normalisation needs both.")
    x = render_batch(scenes, image_size).to(device)
    z = vae.encode(x).latent_dist.sample(generator=torch.Generator(device).manual_seed(0))
    mean, std = z.mean(dim=(0, 2, 3)).double(), z.std(dim=(0, 2, 3)).double()
    k = 1 / (std * vae.config.scaling_factor)  # multiplies each latent channel
    c = mean.numel()
    q, pq = vae.quant_conv, vae.post_quant_conv
    w, b = q.weight.double(), q.bias.double()
    w[:c] *= k[:, None, None, None]
    b[:c] = (b[:c] - mean) * k
    b[c:] += 2 * torch.log(k)
    q.weight.copy_(w)
    q.bias.copy_(b)
    pw, pb = pq.weight.double(), pq.bias.double()
    pq.bias.copy_(pb + (pw[:, :, 0, 0] @ mean))
    pq.weight.copy_(pw / k[None, :, None, None])
    z2 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return {"latent_mean_before": mean.tolist(), "latent_std_before": std.tolist(),
            "scaled_mean_after": z2.mean(dim=(0, 2, 3)).tolist(),
            "scaled_std_after": z2.std(dim=(0, 2, 3)).tolist()}


@torch.no_grad()
def encode_pool(vae, scenes, *, device: torch.device, image_size: int = 64,
                batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every scene's latent, and its subject mask at latent
    resolution (share of subject pixels under each latent pixel), on ``device`` (the frozen
    VAE is not needed again while the UNet trains)."""
    means, stds, masks = [], [], []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i:i + batch_size]
        images = render_batch(chunk, image_size)
        post = vae.encode(images.to(device)).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
        masks.append(F.adaptive_avg_pool2d(subject_mask(images, chunk), post.mean.shape[-2:]))
    return torch.cat(means), torch.cat(stds), torch.cat(masks).to(device)
