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
import platform
import random
import sys
import time
from pathlib import Path

import torch

from .concepts import HELD_OUT
from .diffusion_stage import train_diffusion
from .export import MODEL_NAME, _write_json, check_outputs, round_to_fp16, save_model  # noqa: F401
from .sampling import TokenCache, generate, sample_grid, seconds_per_image
from .scores import evaluate_model
from .vae_stage import (  # noqa: F401
    augment_dihedral,
    encode_pool,
    normalize_latents,
    reconstruction_psnr,
    render_batch,
    subject_mask,
    train_vae,
)
from .world import prompts_for_eval, sample_finetune_scene, sample_scene

log = logging.getLogger(__name__)

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
                          deadline=t_start + 0.2 * budget if budget else None,
                          whole_world=args.vae_whole_world)
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
    if Path(args.evaluator).is_file():
        from .evaluator import Evaluator
        from .quality import vae_ceilings

        evaluator = Evaluator.load(args.evaluator)
        vae_stats["ceiling"] = vae_ceilings(vae, evaluator)
        log.info("VAE ceiling (held-out images recognised after a round trip): %s",
                 vae_stats["ceiling"])

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

        report["evaluation"] = {
            **evaluate_model(unet, vae, te, tokens, configs["scheduler"],
                             Evaluator.load(evaluator_path), images=args.eval_images,
                             seed=args.seed, steps=args.sample_steps, guidance=args.guidance,
                             device=device, dtype=dtype),
            "evaluator": str(evaluator_path)}
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
    a("--vae-whole-world", action="store_true",
      help="train the VAE on held-out concepts too (a codec, not a concept learner: "
           "otherwise it caps what fine-tuning can teach); the UNet never sees them")
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
