"""The README's demo: teach the bundled reference model a concept it has never seen, with LoRA.

Trains on the bundled sample data (``examples/sample_data/heart``: red hearts, a shape held
out of the reference model's pretraining) and writes into ``OUT_DIR``: the LoRA, its loss log
and plot, ``before_after.png`` (rows: the heart prompt, the heart in two new contexts, two
prompts the model already knew; left half before training, right half after, same seeds) and
``demo_summary.json`` with the evaluator's scores before and after (``reference.quality``).

When the reference model is missing (``reference/model``), the demo falls back to the
random-weight ``sd15-tiny`` fixture and says so: the run then proves the pipeline, not
learning.

    tsuika-demo [OUT_DIR] [--steps N]          (or: python -m tsuika.reference.demo ...)

``python3 run.py demo`` runs this. The demo is its own entry point so that the backend's CLI
never imports ``reference/`` (reference uses trainers, never the reverse).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from PIL import Image

from ..trainers.config import build_config
from .quality import EVALUATOR, REFERENCE_MODEL, Sampling, load_reference, score

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "examples" / "sample_data" / "heart"
CONCEPT = "heart"
GRID_SEEDS = 4


def _model_path(out: Path) -> tuple[Path, bool]:
    if (REFERENCE_MODEL / "unet" / "config.json").is_file():
        return REFERENCE_MODEL, True
    from ..trainers.fixtures import write_fixture

    fixture = out / "model"
    if not (fixture / "diffusers").is_dir():
        write_fixture("sd15-tiny", fixture, seed=0)
    log.warning("reference model not found at %s; using the random-weight sd15-tiny fixture "
                "(the demo then shows the pipeline working, not learning)", REFERENCE_MODEL)
    return fixture / "diffusers", False


def run_demo(out_dir: str | Path = "outputs/demo", steps: int | None = None,
             images_per_prompt: int = 8) -> dict:
    """Train the demo LoRA and write its results; returns a summary dict (also saved as JSON).

    Args:
        out_dir: where results go; a previous demo's LoRA there is replaced.
        steps: optimizer steps (default: 300 on the reference model, 30 on the fixture).
        images_per_prompt: samples per prompt behind each score.
    """
    from ..trainers.cli import TerminalProgress
    from ..trainers.loop import train
    from .captions import prompts_for_eval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, pretrained = _model_path(out)
    prompts = [p for p in prompts_for_eval() if p.concept in (None, CONCEPT)]
    shown = [p for p in prompts if p.concept == CONCEPT] + [
        p for p in prompts if p.kind == "retention"][:2]
    config = build_config(overrides=[
        f"model.path={model}", f"data.dir={SAMPLE_DATA}", f"output.dir={out}",
        "output.name=demo_heart_lora", "output.overwrite=true", "data.resolution=64",
        "data.bucket_step=32", f"train.steps={steps or (300 if pretrained else 30)}",
        "train.learning_rate=5e-4", "network.rank=8", "network.alpha=8", "train.seed=0",
        "sample.prompts=" + " | ".join(p.text for p in shown[:3]), "sample.steps=20",
        "train.batch_size=4"])
    sampling = Sampling(images=images_per_prompt)
    scored = pretrained and EVALUATOR.is_file()
    before = score(load_reference(model), CONCEPT, sampling) if scored else None
    progress = TerminalProgress()
    try:
        result = train(config, progress)
    finally:
        progress.close()
    summary = {"pretrained_reference_model": pretrained, "model": str(model),
               "steps": result.steps, "lora": str(result.file_path),
               "first_loss": result.losses[0], "last_loss": result.losses[-1],
               "files": {k: str(v) for k, v in result.files.items()}}
    if pretrained:
        grid = out / "before_after.png"
        after = _before_after(model, result.file_path, shown, grid,
                              sampling if scored else None)
        summary["files"]["before_after"] = str(grid)
        if scored:
            summary["scores"] = {"before": before, "after": after,
                                 "images_per_prompt": images_per_prompt}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _before_after(model: Path, lora_file: Path, shown, grid_path: Path,
                  sampling: Sampling | None) -> dict | None:
    """Write the before/after grid; return the scores after training (None: no evaluator)."""
    from .quality import merge_lora_file
    from .sampling import TokenCache, generate, sample_grid

    texts = [p.text for p in shown for _ in range(GRID_SEEDS)]
    seeds = [j for _ in shown for j in range(GRID_SEEDS)]
    halves = []
    after = None
    bundle = load_reference(model)
    with torch.no_grad():
        for merged in (False, True):
            if merged:
                merge_lora_file(bundle, lora_file)
                if sampling is not None:
                    after = score(bundle, CONCEPT, sampling)
            halves.append(generate(bundle.unet, bundle.vae, bundle.text_encoders[0],
                                   TokenCache(bundle.tokenizers[0]), bundle.scheduler_config,
                                   texts, seeds, steps=20))
    rows = [torch.cat([halves[0][i:i + GRID_SEEDS], halves[1][i:i + GRID_SEEDS]])
            for i in range(0, len(texts), GRID_SEEDS)]
    grid = sample_grid(torch.cat(rows), 2 * GRID_SEEDS)
    # 64 px samples are tiny on a screen: show each pixel as 2x2, without smoothing.
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(grid_path)
    return after


def _print_scores(scores: dict) -> None:
    names = ("concept_fidelity", "new_context_concept", "new_context_fidelity",
             "retention_subject", "retention_prompt")
    print(f"scores ({scores['images_per_prompt']} samples per prompt): before -> after")
    for name in names:
        print(f"  {name:22s} {scores['before'][name]:.3f} -> {scores['after'][name]:.3f}")


def main(argv: list[str] | None = None) -> int:
    """``tsuika-demo [OUT_DIR] [--steps N]``: run the demo and print where its results are."""
    from ..trainers.cli import configure_logging

    p = argparse.ArgumentParser(prog="tsuika-demo", description="Train on the bundled sample "
                                "data with the bundled model (the README's demo).")
    p.add_argument("out_dir", nargs="?", default="outputs/demo")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    configure_logging()
    summary = run_demo(args.out_dir, steps=args.steps)
    for k, v in summary["files"].items():
        print(f"{k}: {v}")
    if "scores" in summary:
        _print_scores(summary["scores"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
