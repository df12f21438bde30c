"""Train Tsuika's reference text-to-image model from scratch on the procedural world.

    python -m tsuika.reference.train_model --out reference/model --device cpu --seed 0

The SD1.5 recipe, scaled down: the same classes (``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel`` with the real CLIP tokenizer, a DDPM scheduler config) built from the small
configs in ``reference/model_configs/``, at 64x64 pixels and 16x16x4 latents.

Stage 1 trains the VAE on freshly rendered pretraining scenes, turned and mirrored at random
(MSE + L1, subject pixels weighted up, a small KL term), then folds a per-channel latent
normalisation into its ``quant_conv`` / ``post_quant_conv`` so that
``latents * 0.18215`` (SD's scaling factor, which single-file loaders assume) has zero mean and
unit variance. Stage 2 freezes the VAE, encodes a fixed pool of rendered scenes once, and
trains the text encoder and the UNet jointly with the epsilon-prediction loss on paraphrased
captions (10 % empty, so classifier-free guidance works). Held-out concepts are never seen.

Writes ``<out>/diffusers/``, ``<out>/tsuika_reference.safetensors`` (fp16, original layout),
``<out>/training_report.json`` (command, seed, device, times, losses, scores) and
``<out>/samples.png``. Scores need the evaluator (``reference/evaluator.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .concepts import BACKGROUNDS, HELD_OUT
from .sampling import MAX_TOKENS, TokenCache, autocast, generate, sample_grid, seconds_per_image
from .scores import evaluate
from .world import caption, prompts_for_eval, render, sample_finetune_scene, sample_scene

log = logging.getLogger(__name__)

MODEL_NAME = "tsuika_reference"
CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_EVALUATOR = Path(__file__).parent / "evaluator.safetensors"
VALIDATION_SEED_OFFSET = 1_000_003
CONFIG_PARTS = ("unet", "vae", "text_encoder", "scheduler")


# ------------------------------------------------------------------------------ models
def load_configs(config_dir: str | Path = CONFIG_DIR) -> dict[str, dict]:
    """The four architecture configs (``unet``, ``vae``, ``text_encoder``, ``scheduler``).

    Args:
        config_dir: a folder with ``<part>.json`` for each part.
    """
    folder = Path(config_dir)
    missing = [p for p in CONFIG_PARTS if not (folder / f"{p}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"config_dir {str(folder)!r} lacks {missing}; it needs "
                                f"{', '.join(p + '.json' for p in CONFIG_PARTS)}.")
    cfg = {p: json.loads((folder / f"{p}.json").read_text()) for p in CONFIG_PARTS}
    if cfg["unet"]["cross_attention_dim"] != cfg["text_encoder"]["hidden_size"]:
        raise ValueError(f"unet.cross_attention_dim = {cfg['unet']['cross_attention_dim']} but "
                         f"text_encoder.hidden_size = {cfg['text_encoder']['hidden_size']}; "
                         "they must be equal.")
    return cfg


def build_models(configs: dict[str, dict], seed: int):
    """Fresh ``(unet, vae, text_encoder)`` with seeded initial weights (fp32, CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(configs["vae"])
    unet = UNet2DConditionModel.from_config(configs["unet"])
    te = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return unet, vae, te


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


class LearningRate:
    """Linear warm-up, then cosine decay to zero over the run. Progress is the larger of the
    step count and the elapsed share of the time limit, so a run cut short by its time
    budget still anneals instead of stopping at a high rate.

    Args:
        opt: the optimiser whose groups get the rate.
        peak: the rate after warm-up.
        steps: planned steps.
        warmup: warm-up steps.
        deadline: ``time.perf_counter()`` value at which the run will stop, or ``None``.
    """

    def __init__(self, opt, peak: float, steps: int, warmup: int, deadline: float | None):
        self.opt, self.peak, self.steps, self.warmup = opt, peak, max(1, steps), max(1, warmup)
        self.start, self.deadline = time.perf_counter(), deadline

    def update(self, step: int) -> float:
        """Set and return the rate for ``step`` (1-based)."""
        progress = step / self.steps
        if self.deadline is not None:
            span = max(self.deadline - self.start, 1e-9)
            progress = max(progress, (time.perf_counter() - self.start) / span)
        rate = self.peak * min(1.0, step / self.warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, progress)))
        for group in self.opt.param_groups:
            group["lr"] = rate
        return rate


def _out_of_time(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


# ------------------------------------------------------------------------------ stage 1
def train_vae(vae, *, steps: int, batch_size: int, learning_rate: float = 1e-3,
              kl_weight: float = 1e-6, l1_weight: float = 1.0, subject_weight: float = 4.0,
              seed: int = 0, image_size: int = 64,
              device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
              deadline: float | None = None, log_every: int = 50) -> dict:
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
        if _out_of_time(deadline):
            log.warning("VAE: time budget reached after %d of %d steps", done, steps)
            break
        scenes = [sample_scene(rng) for _ in range(batch_size)]
        x = augment_dihedral(render_batch(scenes, image_size), rng)
        weight = (1 + subject_weight * subject_mask(x, scenes)).to(device)
        x = x.to(device)
        with autocast(device, dtype):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=gen)).sample
        err = rec.float() - x
        mse = err.pow(2).mean()
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        pixel = ((err.pow(2) + l1_weight * err.abs()) * weight).sum() / (weight.sum() * 3)
        loss = pixel + kl_weight * kl
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


# ------------------------------------------------------------------------------ stage 2
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
        if _out_of_time(deadline):
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


# ------------------------------------------------------------------------------ saving
@torch.no_grad()
def round_to_fp16(*modules) -> None:
    """Round every floating weight to fp16 precision (kept as fp32), so that the model that is
    evaluated is exactly the one the fp16 files hold."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def _write_diffusers_folder(folder: Path, unet, vae, text_encoder, scheduler_config: dict
                            ) -> None:
    """A ``StableDiffusionPipeline`` folder, written to a temporary sibling and renamed.

    UNet and VAE are stored as fp16 (diffusers loads them as fp32); the text encoder stays
    fp32 because transformers 5 loads weights in their stored dtype, and a fp16 encoder next
    to a fp32 UNet would break every loader that does not pass a dtype.
    """
    from ..trainers.families.sd15 import TOKENIZER_DIR

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    unet.to("cpu", torch.float16).save_pretrained(tmp / "unet")
    vae.to("cpu", torch.float16).save_pretrained(tmp / "vae")
    unet.float(), vae.float()
    text_encoder.to("cpu").save_pretrained(tmp / "text_encoder")
    (tmp / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, tmp / "tokenizer" / name)
    (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer"}, indent=2))
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config,
                                                                        indent=2))
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_config["_class_name"]],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def save_model(out_dir: str | Path, unet, vae, text_encoder, configs: dict[str, dict], *,
               training_info: dict | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write ``<out>/diffusers/`` and ``<out>/tsuika_reference.safetensors`` (fp16, LDM layout,
    with the ``tsuika.*`` hints that let the single-file loader rebuild the configs).

    Args:
        out_dir: destination folder (created).
        unet, vae, text_encoder: the trained modules (moved to the CPU).
        configs: as ``load_configs`` returns (the scheduler config is written as is).
        training_info: small JSON-able facts (seed, command) stored in the file's metadata.
        overwrite: replace existing outputs.
    """
    from ..trainers.formats.ldm_checkpoint import config_metadata_hints, diffusers_to_ldm
    from ..trainers.formats.safetensors_io import save_safetensors

    out = Path(out_dir)
    paths = {"diffusers": out / "diffusers", "single_file": out / f"{MODEL_NAME}.safetensors"}
    check_outputs(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for m in (unet, vae, text_encoder):
        m.to("cpu")
    _write_diffusers_folder(paths["diffusers"], unet, vae, text_encoder, configs["scheduler"])
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(),
                           unet_config=dict(unet.config), vae_config=dict(vae.config),
                           prediction_type=configs["scheduler"]["prediction_type"])
    ldm = {k: v.half() if v.is_floating_point() else v for k, v in ldm.items()}
    metadata = config_metadata_hints(dict(unet.config), dict(vae.config),
                                     configs["text_encoder"])
    metadata.update({"modelspec.architecture": "stable-diffusion-v1",
                     "modelspec.prediction_type": configs["scheduler"]["prediction_type"],
                     "modelspec.title": "Tsuika reference model",
                     "modelspec.resolution": "64x64",
                     "tsuika.reference_model": json.dumps(training_info or {})})
    save_safetensors(paths["single_file"], ldm, metadata, overwrite=overwrite)
    log.info("saved %s and %s", paths["diffusers"], paths["single_file"])
    return paths


def check_outputs(out_dir: str | Path, overwrite: bool) -> None:
    """Fail before training when outputs exist and ``overwrite`` is off."""
    out = Path(out_dir)
    for p in (out / "diffusers", out / f"{MODEL_NAME}.safetensors", out / "training_report.json"):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists; choose another --out or pass "
                                  "--overwrite.")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the run
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """The whole training run described by the parsed command line; returns the report."""
    from ..trainers.device import resolve_device
    from ..trainers.families.sd15 import load_tokenizer

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.precision if args.precision != "auto" else
        ("bf16" if device.type == "cuda" else "fp32")]
    budget = args.time_budget_minutes * 60 if args.time_budget_minutes else None
    out = Path(args.out)
    check_outputs(out, args.overwrite)
    configs = load_configs(args.config_dir)
    unet, vae, te = build_models(configs, args.seed)
    sizes = {n: sum(p.numel() for p in m.parameters())
             for n, m in (("unet", unet), ("vae", vae), ("text_encoder", te))}
    log.info("parameters: %s; device %s, compute %s", sizes, device, dtype)
    image_size = configs["vae"]["sample_size"]

    vae_stats = train_vae(vae, steps=args.vae_steps, batch_size=args.vae_batch,
                          learning_rate=args.vae_lr, seed=args.seed, image_size=image_size,
                          device=device, dtype=dtype, log_every=args.log_every,
                          deadline=t_start + 0.2 * budget if budget else None)
    val_rng = random.Random(args.seed + VALIDATION_SEED_OFFSET)
    val = [sample_scene(val_rng) for _ in range(args.val_images)]
    held = [sample_finetune_scene(val_rng, c) for c in HELD_OUT for _ in range(
        max(1, args.val_images // len(HELD_OUT)))]
    vae_stats["latents"] = normalize_latents(vae, val[:512], device=device, image_size=image_size)
    vae_stats["psnr_pretraining_scenes"] = round(
        reconstruction_psnr(vae, val, device=device, image_size=image_size), 2)
    vae_stats["psnr_held_out_concepts"] = round(
        reconstruction_psnr(vae, held, device=device, image_size=image_size), 2)
    log.info("VAE PSNR %.2f dB (pretraining scenes), %.2f dB (held-out concepts)",
             vae_stats["psnr_pretraining_scenes"], vae_stats["psnr_held_out_concepts"])

    t_pool = time.perf_counter()
    pool_rng = random.Random(args.seed + 1)
    pool = [sample_scene(pool_rng) for _ in range(args.pool_size)]
    latents = encode_pool(vae, pool, device=device, image_size=image_size)
    log.info("encoded a pool of %d scenes in %.0f s", len(pool), time.perf_counter() - t_pool)

    tokens = TokenCache(load_tokenizer())
    # Leave a tenth of the budget for evaluation and saving.
    unet_stats = train_diffusion(
        unet, te, tokens, latents, pool, configs["scheduler"], steps=args.unet_steps,
        batch_size=args.batch, learning_rate=args.unet_lr, seed=args.seed, device=device,
        dtype=dtype, scaling_factor=vae.config.scaling_factor, log_every=args.log_every,
        ema_decay=args.ema_decay, subject_weight=args.subject_weight,
        timestep_bias=args.timestep_bias, deadline=t_start + 0.9 * budget if budget else None)
    del latents
    round_to_fp16(unet, vae, te)
    train_seconds = time.perf_counter() - t_start

    report = {"command": "python -m tsuika.reference.train_model " + " ".join(argv),
              "seed": args.seed, "device": _device_name(device), "compute_dtype": str(dtype),
              "torch": torch.__version__, "parameters": sizes, "pool_size": args.pool_size,
              "unet_batch": args.batch, "vae_batch": args.vae_batch, "vae": vae_stats,
              "unet": unet_stats, "train_seconds": round(train_seconds, 1)}
    sample_kw = {"steps": args.sample_steps, "device": device, "dtype": dtype}
    prompts = prompts_for_eval()
    retention = [p for p in prompts if p.kind == "retention"]
    evaluator_path = Path(args.evaluator)
    if args.eval_images > 0 and evaluator_path.is_file():
        from .evaluator import Evaluator

        k = args.eval_images
        texts = [p.text for p in prompts for _ in range(k)]
        seeds = [args.seed + j for _ in prompts for j in range(k)]
        images = generate(unet, vae, te, tokens, configs["scheduler"], texts, seeds,
                          guidance=args.guidance, **sample_kw)
        by_prompt = {p: images[i * k:(i + 1) * k] for i, p in enumerate(prompts)}
        report["evaluation"] = {"images_per_prompt": k, "sample_steps": args.sample_steps,
                                "guidance": args.guidance, "evaluator": str(evaluator_path),
                                **evaluate(Evaluator.load(evaluator_path), by_prompt)}
        log.info("retention: attribute accuracy %s, shape+colour %.3f, all attributes %.3f",
                 report["evaluation"]["retention_attribute_accuracy"],
                 report["evaluation"]["retention_subject_fidelity"],
                 report["evaluation"]["retention_prompt_fidelity"])
    else:
        log.warning("no evaluation: %s", "--eval-images 0" if args.eval_images <= 0 else
                    f"{evaluator_path} does not exist (train it with train_evaluator)")
    grid = generate(unet, vae, te, tokens, configs["scheduler"],
                    [p.text for p in retention for _ in range(4)],
                    [args.seed + j for _ in retention for j in range(4)],
                    guidance=args.guidance, **sample_kw)
    report["sample_seconds_per_image"] = round(seconds_per_image(
        unet, vae, te, tokens, configs["scheduler"], **sample_kw), 3)
    info = {k: report[k] for k in ("command", "seed", "device", "train_seconds")}
    paths = save_model(out, unet, vae, te, configs, training_info=info,
                       overwrite=args.overwrite)
    sample_grid(grid, 4).save(out / "samples.png")
    report["files"] = {k: {"path": str(p), "bytes": sum(
        f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())}
        for k, p in paths.items()}
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _write_json(out / "training_report.json", report)
    log.info("done in %.1f min; report in %s", report["total_seconds"] / 60,
             out / "training_report.json")
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command line (defaults: the full run, about an hour on a 2-core CPU)."""
    p = argparse.ArgumentParser(prog="python -m tsuika.reference.train_model",
                                description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--out", required=True, help="output folder (diffusers/, single file, report)")
    a("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    a("--seed", type=int, default=0, help="seeds weights, scenes, captions, noise (default 0)")
    a("--vae-steps", type=int, default=1500, help="VAE optimiser steps (default 1500)")
    a("--vae-batch", type=int, default=32, help="images per VAE step (default 32)")
    a("--vae-lr", type=float, default=1e-3, help="VAE peak learning rate (default 1e-3)")
    a("--unet-steps", type=int, default=5000, help="UNet + text encoder steps (default 5000)")
    a("--batch", type=int, default=64, help="latents per UNet step (default 64)")
    a("--unet-lr", type=float, default=5e-4, help="UNet peak learning rate (default 5e-4)")
    a("--subject-weight", type=float, default=3.0,
      help="extra UNet loss weight on the subject's latent pixels (default 3)")
    a("--timestep-bias", type=float, default=0.0,
      help="timestep density ~ (t/T)**bias; > 0 favours high noise (default 0: uniform)")
    a("--ema-decay", type=float, default=0.999, help="weight EMA decay, 0 = off (default 0.999)")
    a("--pool-size", type=int, default=20000, help="pre-encoded training scenes (default 20000)")
    a("--val-images", type=int, default=600, help="scenes for the VAE PSNR (default 600)")
    a("--precision", choices=("auto", "fp32", "bf16"), default="auto",
      help="autocast dtype; auto = bf16 on CUDA, fp32 on the CPU")
    a("--time-budget-minutes", type=float, default=None,
      help="whole-run limit: the VAE stops at 20 %% of it, the UNet at 90 %%, then the "
           "model is still evaluated and saved")
    a("--evaluator", default=str(DEFAULT_EVALUATOR), help="evaluator .safetensors for scores")
    a("--eval-images", type=int, default=16, help="samples per evaluation prompt (default 16)")
    a("--sample-steps", type=int, default=25, help="DDIM steps when sampling (default 25)")
    a("--guidance", type=float, default=7.0, help="CFG scale when sampling (default 7)")
    a("--config-dir", default=str(CONFIG_DIR), help="architecture configs (default: shipped)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--log-every", type=int, default=100, help="log the loss every N steps (default 100)")
    a("--overwrite", action="store_true", help="replace existing outputs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args, argv)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
