"""Scores of generated images against what their prompts asked for (the shipped evaluator)."""

from __future__ import annotations

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
    import torch

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
