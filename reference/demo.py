"""The README's demo: teach the bundled reference model a concept it has never seen, with LoRA.

Trains on the bundled sample data (``examples/sample_data/heart``: red hearts, a shape held
out of the reference model's pretraining) and writes into ``OUT_DIR``: the LoRA, its loss log
and plot, a before/after sample grid, and (when the shipped evaluator is present) the
concept-fidelity and retention scores before and after.

When the reference model has not been trained yet (``reference/model`` missing), the demo
falls back to the random-weight ``sd15-tiny`` fixture and says so: the run then proves the
pipeline, not learning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..trainers.config import build_config

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL_DIR = HERE / "model"
EVALUATOR = HERE / "evaluator.safetensors"
SAMPLE_DATA = REPO / "examples" / "sample_data" / "heart"
TRIGGER = "heart"


def _model_path(out: Path) -> tuple[Path, bool]:
    folder = MODEL_DIR / "diffusers"
    if (folder / "unet" / "config.json").is_file():
        return folder, True
    from ..trainers.fixtures import write_fixture

    fixture = out / "model"
    if not (fixture / "diffusers").is_dir():
        write_fixture("sd15-tiny", fixture, seed=0)
    log.warning("reference model not found at %s; using the random-weight sd15-tiny fixture "
                "(the demo then shows the pipeline working, not learning)", folder)
    return fixture / "diffusers", False


def run_demo(out_dir: str | Path = "outputs/demo", steps: int | None = None) -> dict:
    """Train the demo LoRA and write its results; returns a summary dict (also saved as JSON).

    Args:
        out_dir: where results go; a previous demo's LoRA there is replaced.
        steps: optimizer steps (default: 300 on the reference model, 30 on the fixture).
    """
    from .captions import prompts_for_eval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, pretrained = _model_path(out)
    prompts = [p for p in prompts_for_eval() if p.concept in (None, TRIGGER)]
    shown = [p for p in prompts if p.concept == TRIGGER] + [p for p in prompts
                                                            if p.kind == "retention"][:2]
    config = build_config(overrides=[
        f"model.path={model}", f"data.dir={SAMPLE_DATA}", f"output.dir={out}",
        "output.name=demo_heart_lora", "output.overwrite=true", "data.resolution=64",
        "data.bucket_step=32", f"train.steps={steps or (300 if pretrained else 30)}",
        "train.learning_rate=1e-3", "network.rank=8", "network.alpha=8", "train.seed=0",
        "sample.prompts=" + " | ".join(p.text for p in shown), "sample.steps=25",
        "sample.guidance_scale=5", "train.batch_size=4"])
    from ..trainers.cli import TerminalProgress
    from ..trainers.loop import train

    progress = TerminalProgress()
    try:
        result = train(config, progress)
    finally:
        progress.close()
    summary = {"pretrained_reference_model": pretrained, "model": str(model),
               "steps": result.steps, "lora": str(result.lora_path),
               "first_loss": result.losses[0], "last_loss": result.losses[-1],
               "files": {k: str(v) for k, v in result.files.items()}}
    if pretrained and EVALUATOR.is_file():
        summary["scores"] = _scores(config, result, shown)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    for k, v in summary["files"].items():
        print(f"{k}: {v}")
    if "scores" in summary:
        print("scores:", json.dumps(summary["scores"]))
    return summary


def _scores(config, result, shown) -> dict:
    """Evaluator scores of the before/after samples of the demo prompts."""
    from .evaluator import Evaluator

    ev = Evaluator.load(EVALUATOR)
    out = {}
    for when, images in (("before", result.samples_before), ("after", result.samples_after)):
        concept = [im for im, p in zip(images, shown) if p.kind == "concept"]
        keep = {p.scene: [im] for im, p in zip(images, shown) if p.kind == "retention"}
        out[when] = {"concept_fidelity": ev.concept_fidelity(concept, TRIGGER),
                     "retention": ev.retention(keep)}
    return out
