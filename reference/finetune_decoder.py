"""Teach a reference model's VAE decoder to draw the whole world, without touching its latents.

    python -m tsuika.reference.finetune_decoder --model reference/model --out OUT --steps 800

A VAE trained on pretraining scenes only cannot draw some held-out concepts (checkered
fills, the zorbit's colours): every sample of a fine-tuned model passes through its decoder,
so no fine-tuning method can teach them (``reference.quality.vae_ceiling``). This trains only
the decoder and ``post_quant_conv`` on renders of the whole world (held-out concepts
included: a VAE is a codec, not a concept learner). The encoder is frozen, so the latents the
UNet was trained on, and the UNet and text encoder themselves, stay valid and unchanged.

Learning new patterns must not change how the model's own samples look: the decoder also
sees a fixed set of latents the model itself samples for pretraining captions, and is held
to what the original decoder made of them (``anchor_weight``). Without that anchor, an
800-step run moved retention (texture 0.92 -> 0.84: stripes decoded as checks).

Measured limit (why the shipped model no longer uses it): the frozen encoder has no code of
its own for a pattern it never saw, so the new decoder also draws that pattern from latents
the UNet makes for textures it is unsure of; after this run the untrained model "drew" the
checkered prompts 0.13-0.69 of the time. ``train_model --vae-whole-world`` trains the whole
VAE on the whole world from the start and does not leak; use this only where retraining the
UNet is not an option, and check the held-out baselines after it.

Writes the same two formats as ``train_model``, ``decoder_report.json``, and when the source
folder has one, its ``training_report.json`` with the evaluation and VAE ceiling redone on
the new decoder (the old ones kept under ``before_decoder_finetune``) and a new
``samples.png``.
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

from .export import _write_json, check_outputs, round_to_fp16, save_model
from .sampling import TokenCache, generate, sample_grid, sample_latents
from .vae_stage import pixel_loss, render_batch
from .world import caption, prompts_for_eval, sample_scene

ANCHOR_SEED = 7_000_003  # scenes and noise of the anchor set, apart from any other seed

log = logging.getLogger(__name__)


def anchor_set(bundle, count: int, *, seed: int = ANCHOR_SEED, steps: int = 20,
               guidance: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents the model samples for ``count`` random pretraining captions, and what the
    decoder makes of them now: ``(latents scaled for vae.decode, decoder outputs)``."""
    rng = random.Random(seed)
    texts = [caption(sample_scene(rng)) for _ in range(count)]
    z = sample_latents(bundle.unet, bundle.text_encoders[0], TokenCache(bundle.tokenizers[0]),
                       bundle.scheduler_config, texts, [seed + i for i in range(count)],
                       steps=steps, guidance=guidance)
    z = z / bundle.vae.config.scaling_factor
    with torch.no_grad():
        target = torch.cat([bundle.vae.decode(z[i:i + 32]).sample for i in range(0, count, 32)])
    return z, target


def finetune_decoder(vae, *, steps: int, batch_size: int = 16, learning_rate: float = 3e-4,
                     subject_weight: float = 4.0, seed: int = 0, evaluator=None,
                     anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
                     anchor_weight: float = 1.0, anchor_batch: int = 16,
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
        anchor: ``anchor_set`` output; each step adds ``anchor_weight`` times the MSE between
            the decoder's output on ``anchor_batch`` of its latents and the original output.

    Returns:
        ``{"steps", "seconds", "loss_curve", "ceiling"}`` (curve rows: step, render loss,
        anchor loss).
    """
    from .quality import vae_ceilings

    vae.requires_grad_(False).train()
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    rng = random.Random(seed)
    pick = torch.Generator().manual_seed(seed)
    start, curve, ceiling = time.perf_counter(), [], {}
    for step in range(1, steps + 1):
        scenes = [sample_scene(rng, include_held_out=True) for _ in range(batch_size)]
        x = render_batch(scenes, vae.config.sample_size)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss = pixel_loss(vae.decode(z).sample, x, scenes, subject_weight=subject_weight)
        keep = torch.zeros(())
        if anchor is not None and anchor_weight > 0:
            idx = torch.randint(len(anchor[0]), (anchor_batch,), generator=pick)
            keep = torch.nn.functional.mse_loss(vae.decode(anchor[0][idx]).sample,
                                                anchor[1][idx])
        opt.zero_grad(set_to_none=True)
        (loss + anchor_weight * keep).backward()
        opt.step()
        if step % check_every == 0 or step == steps:
            curve.append([step, round(loss.item(), 6), round(keep.item(), 6)])
            if evaluator is not None:
                vae.eval()
                ceiling = vae_ceilings(vae, evaluator)
                vae.train()
            log.info("decoder step %d/%d  loss %.5f  anchor %.5f  ceiling %s", step, steps,
                     loss.item(), keep.item(), ceiling)
    vae.eval().requires_grad_(False)
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1),
            "loss_curve": curve, "ceiling": ceiling}


def _redo_report(source: Path, out: Path, bundle, evaluator, decoder: dict,
                 eval_images: int) -> None:
    """The source model's training report with its VAE ceiling and evaluation redone on the
    new decoder (same prompts, seeds and sampler settings), and a new samples grid."""
    from .scores import evaluate_as_reported

    old_path = source / "training_report.json"
    report = json.loads(old_path.read_text()) if old_path.is_file() else {}
    old_eval = report.get("evaluation", {})
    seed = report.get("seed", 0)
    steps, guidance = old_eval.get("sample_steps", 25), old_eval.get("guidance", 7.0)
    report["before_decoder_finetune"] = {
        "vae_ceiling": report.get("vae", {}).get("ceiling"),
        "evaluation": {k: old_eval.get(k) for k in (
            "retention_attribute_accuracy", "retention_subject_fidelity",
            "retention_prompt_fidelity")}}
    report.setdefault("vae", {})["ceiling"] = decoder["ceiling"]
    report["decoder_finetune"] = decoder
    te, tokens = bundle.text_encoders[0], TokenCache(bundle.tokenizers[0])
    if evaluator is not None and eval_images > 0:
        report["evaluation"] = {
            **evaluate_as_reported(report, bundle, evaluator, eval_images),
            "evaluator": old_eval.get("evaluator", "reference/evaluator.safetensors")}
        log.info("retention after: attribute accuracy %s, shape+colour %.3f",
                 report["evaluation"]["retention_attribute_accuracy"],
                 report["evaluation"]["retention_subject_fidelity"])
    retention = [p for p in prompts_for_eval() if p.kind == "retention"]
    grid = generate(bundle.unet, bundle.vae, te, tokens, bundle.scheduler_config,
                    [p.text for p in retention for _ in range(4)],
                    [seed + j for _ in retention for j in range(4)],
                    steps=steps, guidance=guidance)
    sample_grid(grid, 4).save(out / "samples.png")
    _write_json(out / "training_report.json", report)


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
    p.add_argument("--anchor-images", type=int, default=256,
                   help="model samples the decoder is held to (0 = no anchor)")
    p.add_argument("--anchor-weight", type=float, default=1.0)
    p.add_argument("--eval-images", type=int, default=16,
                   help="samples per evaluation prompt for the new report (0 = skip)")
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
    anchor = None
    if args.anchor_images > 0:
        t0 = time.perf_counter()
        anchor = anchor_set(bundle, args.anchor_images)
        log.info("anchor: %d model samples in %.0f s", args.anchor_images,
                 time.perf_counter() - t0)
    report = finetune_decoder(bundle.vae, steps=args.steps, batch_size=args.batch,
                              learning_rate=args.lr, seed=args.seed, evaluator=evaluator,
                              anchor=anchor, anchor_weight=args.anchor_weight)
    te = bundle.text_encoders[0]
    round_to_fp16(bundle.vae)  # what is evaluated is exactly what the fp16 files hold
    configs = {"scheduler": bundle.scheduler_config, "text_encoder": te.config.to_dict()}
    report["command"] = "python -m tsuika.reference.finetune_decoder " + " ".join(argv)
    save_model(args.out, bundle.unet, bundle.vae, te, configs, overwrite=args.overwrite,
               training_info={"decoder_finetune": report["command"]})
    Path(args.out, "decoder_report.json").write_text(json.dumps(report, indent=2))
    _redo_report(Path(args.model), Path(args.out), bundle, evaluator, report, args.eval_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
