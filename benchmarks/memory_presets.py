"""Peak memory and step time of the memory presets, one fresh process each.

The presets people reach for when a training does not fit (the issue's list): text encoders
kept on the device or not (``train.offload_text_encoders``: every caption encoded once, the
encoders then moved off), gradient checkpointing, 8-bit AdamW (bitsandbytes, CUDA only),
full precision for comparison, and DreamBooth with its lean defaults. Same work as
``speed.py`` (random weights of the real architecture, LoRA rank 16 on the attention
projections, batch 1, one caption); each row is ``speed.py``'s Tsuika worker with the
preset's options, so loading the model from disk counts.

    python benchmarks/memory_presets.py --device cuda --family sdxl --resolution 1024
    python benchmarks/memory_presets.py --family sdxl --config tiny --resolution 256  # the plumbing

Peaks: on CUDA ``torch.cuda.max_memory_allocated`` split into setup (loading, latent cache,
caption encoding) and steps; on the CPU the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PRESETS = {
    "bf16, text encoders kept on the device": ["train.offload_text_encoders=false"],
    "bf16 (default: captions encoded once, encoders moved off)": [],
    "+ gradient checkpointing": ["train.gradient_checkpointing=true"],
    "+ gradient checkpointing + adamw8bit": ["train.gradient_checkpointing=true",
                                             "train.optimizer=adamw8bit"],
    "fp32, text encoders kept (no memory options)": ["train.mixed_precision=no",
                                                     "train.offload_text_encoders=false"],
    "dreambooth: bf16 weights, step in backward, gradient checkpointing": [
        "network.method=dreambooth", "train.learning_rate=5e-6",
        "train.gradient_checkpointing=true"],
    "dreambooth: fp32 weights + adamw8bit, gradient checkpointing": [
        "network.method=dreambooth", "train.learning_rate=5e-6",
        "train.gradient_checkpointing=true", "train.trained_weights=fp32",
        "train.optimizer=adamw8bit"],
    "bf16, shuffled tags: captions encoded every step (encoders stay)": [
        "data.shuffle_tags=true"],
    "bf16, shuffled tags, 16 caption variants encoded once (encoders moved off)": [
        "data.shuffle_tags=true", "data.caption_variants=16"],
}


def run_preset(args, options: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / "speed.py"), "--impl", "tsuika", "--family", args.family,
           "--config", args.config, "--device", args.device, "--resolution",
           str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
           *[f"--tsuika-set={o}" for o in options]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(line[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sdxl")
    p.add_argument("--config", choices=("full", "tiny"), default="full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="measured steps per preset")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", nargs="*", help="preset numbers (1-based) to run")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    print(f"{args.family} {args.config}, {args.resolution}x{args.resolution}, batch 1, "
          f"device {args.device}", flush=True)
    head = ("| preset | s/step | peak VRAM (GiB) | setup peak | steps peak |\n|---|---|---|---|---|"
            if cuda else "| preset | s/step | peak RSS (GiB) |\n|---|---|---|")
    print(head, flush=True)
    for i, (name, options) in enumerate(PRESETS.items(), 1):
        if args.only and str(i) not in args.only:
            continue
        if "adamw8bit" in " ".join(options) and not cuda:
            continue  # bitsandbytes' 8-bit AdamW runs on CUDA only
        r = run_preset(args, options)
        if "error" in r:
            print(f"| {name} | failed: {r['error']} |", flush=True)
        elif cuda:
            print(f"| {name} | {r['s_per_step']:.3f} | {r['peak_vram_gib']:.2f} | "
                  f"{r['setup_peak_vram_gib']:.2f} | {r['steps_peak_vram_gib']:.2f} |", flush=True)
        else:
            print(f"| {name} | {r['s_per_step']:.3f} | {r['peak_rss_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
