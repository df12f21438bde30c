"""Teach a reference model's VAE decoder to draw the whole world, without touching its latents.

    python -m tsuika.reference.finetune_decoder --model reference/model --out OUT --steps 800

A VAE trained on pretraining scenes only cannot draw some held-out concepts (checkered
fills, the zorbit's colours): every sample of a fine-tuned model passes through its decoder,
so no fine-tuning method can teach them (``reference.quality.vae_ceiling``). This trains only
the decoder and ``post_quant_conv`` on renders of the whole world (held-out concepts
included: a VAE is a codec, not a concept learner). The encoder is frozen, so the latents the
UNet was trained on, and the UNet and text encoder themselves, stay valid and unchanged.
Writes the same two formats as ``train_model`` plus ``decoder_report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

from .concepts import HELD_OUT
from .export import check_outputs, round_to_fp16, save_model
from .vae_stage import pixel_loss, render_batch
from .world import sample_scene

log = logging.getLogger(__name__)


def finetune_decoder(vae, *, steps: int, batch_size: int = 16, learning_rate: float = 3e-4,
                     subject_weight: float = 4.0, seed: int = 0, evaluator=None,
                     check_every: int = 100) -> dict:
    """Train ``vae.decoder`` and ``vae.post_quant_conv`` in place (encoder frozen).

    Args:
        vae: the model's ``AutoencoderKL`` (on the CPU).
        steps: optimiser steps, one fresh batch of whole-world renders each.
        batch_size, learning_rate: AdamW settings.
        subject_weight: extra loss weight of subject pixels (as in the VAE stage).
        seed: seeds the scenes.
        evaluator: when given, the ceiling of each held-out concept is logged every
            ``check_every`` steps and returned.

    Returns:
        ``{"steps", "seconds", "loss_curve", "ceiling"}``.
    """
    from .quality import vae_ceiling

    vae.requires_grad_(False).train()
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    rng = random.Random(seed)
    start, curve, ceiling = time.perf_counter(), [], {}
    for step in range(1, steps + 1):
        scenes = [sample_scene(rng, include_held_out=True) for _ in range(batch_size)]
        x = render_batch(scenes, vae.config.sample_size)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss = pixel_loss(vae.decode(z).sample, x, scenes, subject_weight=subject_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % check_every == 0 or step == steps:
            curve.append([step, round(loss.item(), 6)])
            if evaluator is not None:
                vae.eval()
                ceiling = {c: vae_ceiling(vae, c, evaluator=evaluator) for c in HELD_OUT}
                vae.train()
            log.info("decoder step %d/%d  loss %.5f  ceiling %s", step, steps, loss.item(),
                     ceiling)
    vae.eval().requires_grad_(False)
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1),
            "loss_curve": curve, "ceiling": ceiling}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m tsuika.reference.finetune_decoder",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="reference model folder (holds diffusers/)")
    p.add_argument("--out", required=True, help="output folder (both formats and a report)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .evaluator import Evaluator
    from .quality import EVALUATOR, load_reference

    try:
        check_outputs(args.out, args.overwrite)
        bundle = load_reference(Path(args.model) / "diffusers")
    except (FileExistsError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    evaluator = Evaluator.load(EVALUATOR) if EVALUATOR.is_file() else None
    report = finetune_decoder(bundle.vae, steps=args.steps, batch_size=args.batch,
                              learning_rate=args.lr, seed=args.seed, evaluator=evaluator)
    te = bundle.text_encoders[0]
    round_to_fp16(bundle.vae)  # what is evaluated is exactly what the fp16 files hold
    configs = {"scheduler": bundle.scheduler_config, "text_encoder": te.config.to_dict()}
    report["command"] = "python -m tsuika.reference.finetune_decoder " + " ".join(argv)
    save_model(args.out, bundle.unet, bundle.vae, te, configs, overwrite=args.overwrite,
               training_info={"decoder_finetune": report["command"]})
    Path(args.out, "decoder_report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
