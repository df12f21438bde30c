"""Sampling from the reference model's modules: DDIM with classifier-free guidance.

Works on the raw modules (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``),
so the training script, the quality scores and the demo draw images the same way.
"""

from __future__ import annotations

import math
import time

import torch
from PIL import Image

from .world import prompts_for_eval

MAX_TOKENS = 77  # CLIP's context; Tsuika's family loader pads every prompt to it


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes; a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class TokenCache:
    """CLIP token ids of captions, padded to 77 like the family loader; memoised because the
    world has few distinct captions and BPE in Python is slow.

    Args:
        tokenizer: a ``CLIPTokenizer`` (the shipped real vocabulary).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str], device: torch.device) -> torch.Tensor:
        for t in texts:
            if t not in self.cache:
                self.cache[t] = self.tokenizer(t, padding="max_length", max_length=MAX_TOKENS,
                                               truncation=True).input_ids
        return torch.tensor([self.cache[t] for t in texts], device=device)


@torch.no_grad()
def sample_latents(unet, text_encoder, tokens: TokenCache, scheduler_config: dict,
                   prompts: list[str], seeds: list[int], *, steps: int = 25,
                   guidance: float = 7.0, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32, batch_size: int = 32) -> torch.Tensor:
    """Denoised latents for ``prompts`` (DDIM, classifier-free guidance against ""), unscaled
    (what ``vae.decode`` takes), float (N, C, h, w) on ``device``.

    Image ``i`` starts from ``torch.randn`` seeded with ``seeds[i]`` on the CPU, the same
    noise ``trainers.sampling.sample_images`` draws for that seed. Arguments as ``generate``.
    """
    from diffusers import DDIMScheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed each.")
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps, device=device)
    side = unet.config.sample_size
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        with autocast(device, dtype):
            cond = text_encoder(tokens([""] * len(chunk) + chunk, device))[0]
        x = torch.cat([torch.randn((1, unet.config.in_channels, side, side),
                                   generator=torch.Generator().manual_seed(s))
                       for s in seeds[i:i + batch_size]]).to(device) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            with autocast(device, dtype):
                eps = unet(inp, t, encoder_hidden_states=cond).sample.float()
            uncond, text = eps.chunk(2)
            x = sched.step(uncond + guidance * (text - uncond), t, x).prev_sample
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32, batch_size: int = 32) -> torch.Tensor:
    """Images in [0, 1] (float, CPU) of denoised latents from ``sample_latents``."""
    out = []
    for i in range(0, len(latents), batch_size):
        with autocast(device, dtype):
            img = vae.decode(latents[i:i + batch_size] / vae.config.scaling_factor).sample
        out.append(((img.float().clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def generate(unet, vae, text_encoder, tokens: TokenCache, scheduler_config: dict,
             prompts: list[str], seeds: list[int], *, steps: int = 25, guidance: float = 7.0,
             device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
             batch_size: int = 32) -> torch.Tensor:
    """Images for ``prompts`` (DDIM, classifier-free guidance against ""), in [0, 1].

    Args:
        unet, vae, text_encoder: the model.
        tokens: caption -> token ids.
        scheduler_config: the model's scheduler config.
        prompts: one prompt per image.
        seeds: one seed per image (the same seed gives the same starting noise everywhere).
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        device: where to run.
        dtype: autocast dtype.
        batch_size: images per pass.

    Returns:
        float (N, 3, H, W) on the CPU.
    """
    latents = sample_latents(unet, text_encoder, tokens, scheduler_config, prompts, seeds,
                             steps=steps, guidance=guidance, device=device, dtype=dtype,
                             batch_size=batch_size)
    return decode_latents(vae, latents, device=device, dtype=dtype, batch_size=batch_size)


def seconds_per_image(unet, vae, text_encoder, tokens, scheduler_config, *, steps: int,
                      device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one 64x64 image (batch 1, CFG, ``steps`` DDIM steps)."""
    prompt = prompts_for_eval()[0].text
    generate(unet, vae, text_encoder, tokens, scheduler_config, [prompt], [0], steps=steps,
             device=device, dtype=dtype)  # warm-up
    best = float("inf")
    for r in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        generate(unet, vae, text_encoder, tokens, scheduler_config, [prompt], [r], steps=steps,
                 device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def sample_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """Images (N, 3, H, W) in [0, 1] tiled row by row."""
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.zeros(3, rows * h, columns * w)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    return Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
