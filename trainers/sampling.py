"""Sample images from a bundle (with whatever adapters are active) for previews and grids."""

from __future__ import annotations

import torch
from PIL import Image

from .device import Precision
from .device.placement import modules_on
from .families.base import ModelBundle


@torch.no_grad()
def sample_images(family, bundle: ModelBundle, prompts: list[str], precision: Precision, *,
                  size: int, steps: int = 20, guidance_scale: float = 7.0, seed: int = 0,
                  negative_prompt: str = "") -> list[Image.Image]:
    """One image per prompt, DDIM with classifier-free guidance, fixed seed per prompt.

    Args:
        family: the bundle's family (encodes prompts, runs the UNet).
        prompts: text prompts; image ``i`` uses seed ``seed + i``.
        size: image side in pixels (rounded down to what the VAE and UNet accept).
    """
    from diffusers import DDIMScheduler

    device = precision.device
    sched = DDIMScheduler.from_config(bundle.scheduler_config)
    sched.set_timesteps(steps, device=device)
    vae_scale = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    unet_mult = 2 ** (len(bundle.unet.config.block_out_channels) - 1)
    lat = max(unet_mult, (size // vae_scale) // unet_mult * unet_mult)
    was_training = bundle.unet.training
    bundle.unet.eval()
    images = []
    try:
        # The VAE (after the latent cache) and the text encoders (train.offload_text_encoders)
        # may be parked off the device: here for the previews, back where they were after.
        with modules_on(device, [bundle.vae, *bundle.text_encoders]):
            with precision.context():
                uncond = family.encode_text(bundle, [negative_prompt], device)
            for i, prompt in enumerate(prompts):
                with precision.context():
                    cond = family.encode_text(bundle, [prompt], device)
                both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                g = torch.Generator("cpu").manual_seed(seed + i)
                x = torch.randn((1, bundle.unet.config.in_channels, lat, lat), generator=g)
                x = x.to(device) * sched.init_noise_sigma
                for t in sched.timesteps:
                    inp = sched.scale_model_input(torch.cat([x, x]), t)
                    with precision.context():
                        out = family.predict(bundle, inp, t.expand(2).to(device), both).float()
                    u, c = out.chunk(2)
                    x = sched.step(u + guidance_scale * (c - u), t, x).prev_sample
                vae = bundle.vae
                img = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample
                img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                images.append(Image.fromarray(img[0].permute(1, 2, 0).cpu().numpy()))
    finally:
        bundle.unet.train(was_training)
    return images
