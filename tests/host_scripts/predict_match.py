"""Tsuika's noise prediction against ComfyUI's own model on the same checkpoint and inputs.

Run with ComfyUI's python (tests/test_real_host.py does), ``tsuika`` importable:

    PYTHONPATH=<parent of tsuika> <comfy-venv>/bin/python tests/host_scripts/predict_match.py \
        --comfy <ComfyUI dir> --checkpoint model.safetensors --report out.json

ComfyUI side, as its sampler calls it: Load Checkpoint's loader, the prompt encoded by its
CLIP, the model's ``encode_adm`` (SDXL: pooled output + size/crop ids; None for SD1) and
``apply_model`` at the sigma of timestep ``--t`` on ``x0 + sigma * noise`` (its own input
scaling and sigma -> timestep mapping). Tsuika side: the host bridge's bundle of the same
loaded objects (``nodes/_host.bundle_from_comfy``), the family's ``encode_text`` and
``predict`` on the DDPM-noised ``sqrt(a) x0 + sqrt(1 - a) noise`` with the bundle's own
scheduler, turned into a denoised estimate. Both denoised estimates are compared twice:
with each side's own text conditioning, and with ComfyUI's conditioning fed to the family's
``predict`` (isolating the UNet, the pooled embedding and the time ids from the text
encoders). The text conditioning is compared too. Prints one JSON line ``RESULT {...}``.
"""

from __future__ import annotations

import argparse
import json
import sys


def _rel(a, b) -> float:
    """Largest absolute difference, relative to the largest magnitude of ``b``."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--comfy", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="a photo of a red circle on a white table")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--t", type=int, default=500, help="DDPM timestep")
    p.add_argument("--report", help="also write the JSON here")
    args = p.parse_args()
    sys.path.insert(0, args.comfy)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # what main.py --cpu sets, before model_management picks a device
    import torch
    from diffusers import DDPMScheduler

    import comfy.sd

    from tsuika.nodes import _host
    from tsuika.trainers.families import get_family

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint)[:4]
    kind = type(model.model.model_config).__name__
    side = args.size
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, side // 8, side // 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)

    with torch.inference_mode():  # as ComfyUI runs its nodes
        cond, pooled = clip.encode_from_tokens(clip.tokenize(args.prompt), return_pooled=True)
        adm = model.model.encode_adm(pooled_output=pooled, width=side, height=side)
        extra = {} if adm is None else {"y": adm}
        sampling = model.model.model_sampling
        sigma = sampling.sigmas[args.t].reshape(1).float()
        comfy_x0 = model.model.apply_model(x0 + sigma * noise, sigma, c_crossattn=cond, **extra)
        cond, pooled, comfy_x0 = cond.clone(), pooled.clone(), comfy_x0.clone()

    family = get_family(_host.comfy_family(model))
    bundle = _host.bundle_from_comfy(model, clip, vae)  # the bridge the train nodes use
    for module in bundle.components.values():  # in ComfyUI's dtypes: fp32, as a run computes
        torch.nn.Module.to(module, torch.float32)
    sched = DDPMScheduler.from_config(bundle.scheduler_config)
    a = sched.alphas_cumprod[args.t].float()
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    timesteps = torch.tensor([args.t])

    def denoised(out):
        if bundle.prediction_type == "v_prediction":
            return a.sqrt() * noisy - (1 - a).sqrt() * out
        return (noisy - (1 - a).sqrt() * out) / a.sqrt()

    with torch.no_grad():
        own = family.encode_text(bundle, [args.prompt], torch.device("cpu"))
        hosts = dict(own, encoder_hidden_states=cond.float())
        if "pooled" in own:  # the family's name for the pooled text embedding (SDXL)
            hosts["pooled"] = pooled.float()
        ours_own = denoised(family.predict(bundle, noisy, timesteps, own))
        ours_hosts = denoised(family.predict(bundle, noisy, timesteps, hosts))
    result = {
        "comfy_model": kind, "family": bundle.family, "prediction_type": bundle.prediction_type,
        "text_rel": _rel(own["encoder_hidden_states"], cond),
        "pooled_rel": _rel(own["pooled"], pooled) if "pooled" in own else None,
        "denoised_rel_same_cond": _rel(ours_hosts, comfy_x0),
        "denoised_rel_own_cond": _rel(ours_own, comfy_x0),
        "comfy_text_dtype": str(cond.dtype),
    }
    line = json.dumps(result)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(line)
    print("RESULT " + line, flush=True)


if __name__ == "__main__":
    main()
