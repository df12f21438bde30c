"""Scores of generated images against what their prompts asked for (the shipped evaluator)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from .concepts import HELD_OUT


def evaluate(evaluator, images_by_prompt: dict) -> dict:
    """Scores of generated images: per-attribute accuracy and all-attribute prompt fidelity
    over the retention prompts, and the (pre-fine-tuning) baseline of each held-out prompt.

    Args:
        evaluator: a ``reference.evaluator.Evaluator``.
        images_by_prompt: ``{EvalPrompt: images}`` for ``prompts_for_eval()``.
    """
    right: dict[str, list[int]] = {}
    per_prompt, held_out = [], []
    for prompt, images in images_by_prompt.items():
        preds = evaluator.predict(images)
        fidelity = sum(all(p[a] == v for a, v in prompt.spec.items()) for p in preds) / len(preds)
        # The subject alone: shape and, for simple shapes, colour (what a user checks first).
        subject = {a: v for a, v in prompt.spec.items() if a in ("shape", "color")}
        subject_right = sum(all(p[a] == v for a, v in subject.items()) for p in preds)
        row = {"prompt": prompt.text, "kind": prompt.kind, "prompt_fidelity": round(fidelity, 4),
               "subject_fidelity": round(subject_right / len(preds), 4)}
        if prompt.kind == "retention":
            for a, v in prompt.spec.items():
                hits = right.setdefault(a, [0, 0])
                hits[0] += sum(p[a] == v for p in preds)
                hits[1] += len(preds)
            per_prompt.append(row)
        else:
            attribute = HELD_OUT[prompt.concept].attribute
            row["concept_fidelity"] = round(
                sum(p[attribute] == prompt.concept for p in preds) / len(preds), 4)
            held_out.append(row)
    chance = {a: round(1 / len(v), 4) for a, v in evaluator.vocab.items()}
    return {"retention_attribute_accuracy": {a: round(h / n, 4) for a, (h, n) in right.items()},
            "chance_accuracy": chance,
            "retention_prompt_fidelity": round(
                sum(r["prompt_fidelity"] for r in per_prompt) / max(1, len(per_prompt)), 4),
            "retention_subject_fidelity": round(
                sum(r["subject_fidelity"] for r in per_prompt) / max(1, len(per_prompt)), 4),
            "retention_prompts": per_prompt, "held_out_baseline": held_out}


def evaluate_model(unet, vae, text_encoder, tokens, scheduler_config: dict, evaluator, *,
                   images: int, seed: int, steps: int, guidance: float,
                   device=None, dtype=None) -> dict:
    """``evaluate`` on ``images`` fresh samples of every evaluation prompt (seeds ``seed,
    seed+1, ...`` for each prompt): the scores a model's training report and README quote.

    Args:
        unet, vae, text_encoder, tokens, scheduler_config: the model, as ``sampling.generate``.
        evaluator: a loaded ``reference.evaluator.Evaluator``.
        images, seed, steps, guidance: samples per prompt, first seed, DDIM steps, CFG scale.
        device, dtype: where and in which autocast dtype to sample (default CPU, fp32).
    """
    from .sampling import generate
    from .world import prompts_for_eval

    prompts = prompts_for_eval()
    texts = [p.text for p in prompts for _ in range(images)]
    seeds = [seed + j for _ in prompts for j in range(images)]
    pixels = generate(unet, vae, text_encoder, tokens, scheduler_config, texts, seeds,
                      steps=steps, guidance=guidance, device=device or torch.device("cpu"),
                      dtype=dtype or torch.float32)
    by_prompt = {p: pixels[i * images:(i + 1) * images] for i, p in enumerate(prompts)}
    return {"images_per_prompt": images, "sample_steps": steps, "guidance": guidance,
            **evaluate(evaluator, by_prompt)}


def evaluate_as_reported(report: dict, bundle, evaluator, images: int | None = None) -> dict:
    """``evaluate_model`` on ``bundle`` with the seed, sampler steps and guidance (and, unless
    ``images`` is given, the samples per prompt) of ``report``'s earlier evaluation, so that
    old and new scores differ only in what changed."""
    from .sampling import TokenCache

    old = report.get("evaluation", {})
    return evaluate_model(
        bundle.unet, bundle.vae, bundle.text_encoders[0], TokenCache(bundle.tokenizers[0]),
        bundle.scheduler_config, evaluator, images=images or old.get("images_per_prompt", 16),
        seed=report.get("seed", 0), steps=old.get("sample_steps", 25),
        guidance=old.get("guidance", 7.0))


def reevaluate(model_dir: str | Path, evaluator_path: str | Path | None = None, *,
               images: int | None = None) -> dict:
    """The model's training report with its evaluation and VAE ceilings redone by the given
    (default: the shipped) evaluator, with the same prompts, seeds and sampler settings.

    Scores are a function of the model *and* the evaluator; when only the evaluator is
    retrained (it was, once it turned out to read only one phase of a pattern) the shipped
    figures are redone with this, and the model stays as it is. The report records which evaluator
    (its file's SHA-256) made them.

    Args:
        model_dir: a reference model folder (``diffusers/`` and ``training_report.json``).
        evaluator_path: evaluator weights (default ``reference/evaluator.safetensors``).
        images: samples per prompt (default: as many as the report's evaluation used).
    """
    from .evaluator import Evaluator
    from .quality import EVALUATOR, load_reference, vae_ceilings

    model_dir = Path(model_dir)
    report_path = model_dir / "training_report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found; --model must be a reference model "
                                "folder (e.g. reference/model).")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    evaluator_path = Path(evaluator_path or EVALUATOR)
    evaluator = Evaluator.load(evaluator_path)
    bundle = load_reference(model_dir / "diffusers")
    with torch.no_grad():
        evaluation = evaluate_as_reported(report, bundle, evaluator, images)
        ceiling = vae_ceilings(bundle.vae, evaluator)
    digest = hashlib.sha256(evaluator_path.read_bytes()).hexdigest()
    report["evaluation"] = {**evaluation, "evaluator": evaluator_path.name,
                            "evaluator_sha256": digest}
    report.setdefault("vae", {})["ceiling"] = ceiling
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m tsuika.reference.scores --model reference/model [--write]``."""
    p = argparse.ArgumentParser(prog="python -m tsuika.reference.scores",
                                description="Redo a reference model's evaluation and VAE "
                                "ceilings with the (retrained) evaluator.")
    p.add_argument("--model", required=True, help="reference model folder")
    p.add_argument("--evaluator", help="evaluator .safetensors (default: the shipped one)")
    p.add_argument("--images", type=int, help="samples per prompt (default: the report's)")
    p.add_argument("--write", action="store_true",
                   help="replace the folder's training_report.json (default: print only)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    if args.images is not None and args.images < 1:
        p.error(f"--images {args.images}: use 1 or more.")
    torch.set_num_threads(max(1, args.threads))
    try:
        report = reevaluate(args.model, args.evaluator, images=args.images)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ev = report["evaluation"]
    print(json.dumps({"retention_attribute_accuracy": ev["retention_attribute_accuracy"],
                      "retention_subject_fidelity": ev["retention_subject_fidelity"],
                      "retention_prompt_fidelity": ev["retention_prompt_fidelity"],
                      "held_out_baseline": {r["prompt"]: r["concept_fidelity"]
                                            for r in ev["held_out_baseline"]},
                      "vae_ceiling": report["vae"]["ceiling"]}, indent=2))
    if args.write:
        from .export import _write_json

        path = Path(args.model) / "training_report.json"
        _write_json(path, report)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
