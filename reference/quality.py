"""Did training teach the concept, and did the model keep what it knew?

The measurement behind the quality benchmark, the demo and the CI quality test:

- :func:`score` samples the evaluation prompts of one held-out concept and the retention
  prompts from a model and reads them with the shipped evaluator;
- :func:`finetune` trains a method on a held-out concept through Tsuika's own training loop
  (the code users run) and returns the saved file;
- :func:`score_lora` merges that file into a fresh copy of the base model (read through the
  same format code ComfyUI-bound files go through) and scores it.

Scores (fractions of samples, 0..1):
    concept_fidelity: samples of the concept's own prompt recognised as the concept.
    new_context_fidelity: samples of the concept in contexts the fine-tuning set never showed
        (another colour, position...) with *every* attribute right.
    new_context_concept: the same samples with just the concept recognised.
    retention_subject: retention prompts (concepts the base model knew) whose subject
        (shape, and colour for simple shapes) comes out right.
    retention_prompt: retention prompts with every attribute right.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .concepts import HELD_OUT
from .world import make_dataset, prompts_for_eval

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REFERENCE_MODEL = HERE / "model" / "diffusers"
EVALUATOR = HERE / "evaluator.safetensors"


@dataclass(frozen=True)
class Sampling:
    """How scored images are drawn: ``images`` per prompt, seeds ``seed, seed+1, ...``."""

    images: int = 8
    seed: int = 1000
    steps: int = 20
    guidance: float = 7.0


def load_reference(path: str | Path | None = None):
    """The reference model as a ``ModelBundle`` (fp32, CPU), through the sd15 family loader.

    Raises:
        FileNotFoundError: the model is not there, with the command that trains it.
    """
    from ..trainers.families import load_model

    folder = Path(path) if path else REFERENCE_MODEL
    if not folder.exists():
        raise FileNotFoundError(
            f"reference model not found at {folder}; train it with `python -m "
            "tsuika.reference.train_model --out reference/model --seed 0`.")
    return load_model(folder)


def score(bundle, concept: str, sampling: Sampling = Sampling(), *,
          words: dict[str, str] | None = None, evaluator=None) -> dict:
    """Evaluator scores of ``bundle`` on ``concept``'s prompts and the retention prompts.

    Args:
        bundle: a loaded ``ModelBundle`` of the reference model (LoRA merged or not).
        concept: a key of ``HELD_OUT``.
        sampling: how many images, which seeds, sampler steps and guidance.
        words: prompt word substitutions (the trigger the concept was trained under).
        evaluator: a loaded ``Evaluator`` (default: the shipped one).
    """
    from .evaluator import Evaluator
    from .sampling import TokenCache, generate
    from .scores import evaluate

    if concept not in HELD_OUT:
        raise ValueError(f"concept {concept!r} is not held out; choose one of "
                         f"{', '.join(HELD_OUT)}.")
    evaluator = evaluator or Evaluator.load(EVALUATOR)
    prompts = [p for p in prompts_for_eval(words) if p.concept in (None, concept)]
    k = sampling.images
    texts = [p.text for p in prompts for _ in range(k)]
    seeds = [sampling.seed + j for _ in prompts for j in range(k)]
    images = generate(bundle.unet, bundle.vae, bundle.text_encoders[0],
                      TokenCache(bundle.tokenizers[0]), bundle.scheduler_config, texts, seeds,
                      steps=sampling.steps, guidance=sampling.guidance)
    found = evaluate(evaluator, {p: images[i * k:(i + 1) * k] for i, p in enumerate(prompts)})
    rows = found["held_out_baseline"]
    new = [r for r in rows if r["kind"] == "new_context"]
    own = [r for r in rows if r["kind"] == "concept"]

    def mean(values):
        return round(sum(values) / max(1, len(values)), 4)

    return {"concept_fidelity": mean([r["concept_fidelity"] for r in own]),
            "new_context_fidelity": mean([r["prompt_fidelity"] for r in new]),
            "new_context_concept": mean([r["concept_fidelity"] for r in new]),
            "retention_subject": found["retention_subject_fidelity"],
            "retention_prompt": found["retention_prompt_fidelity"],
            "retention_attributes": found["retention_attribute_accuracy"],
            "images_per_prompt": k}


@torch.no_grad()
def vae_ceiling(vae, concept: str, images: int = 32, seed: int = 0, evaluator=None) -> float:
    """Share of fine-tuning images of ``concept`` still recognised as it after a round trip
    through the model's VAE: no method that trains the UNet or the text side can do better,
    because every sample it makes goes through that decoder.

    Args:
        vae: the model's ``AutoencoderKL`` (``bundle.vae``).
        concept: a key of ``HELD_OUT``.
        images, seed: how many fine-tuning renders, drawn from ``random.Random(seed)``.
        evaluator: a loaded ``Evaluator`` (default: the shipped one).
    """
    import random

    from .evaluator import Evaluator
    from .vae_stage import render_batch
    from .world import sample_finetune_scene

    evaluator = evaluator or Evaluator.load(EVALUATOR)
    rng = random.Random(seed)
    x = render_batch([sample_finetune_scene(rng, concept) for _ in range(images)], 64)
    x = x.to(next(vae.parameters()).device)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu()
    return evaluator.concept_fidelity((rec.clamp(-1, 1) + 1) / 2, concept)


def vae_ceilings(vae, evaluator=None) -> dict[str, float]:
    """``vae_ceiling`` of every held-out concept (default 32 images each), rounded for reports."""
    return {c: round(vae_ceiling(vae, c, evaluator=evaluator), 4) for c in HELD_OUT}


def finetune(concept: str, work_dir: str | Path, *, method: str = "lora", steps: int = 200,
             learning_rate: float = 1e-3, rank: int = 8, images: int = 24, seed: int = 0,
             model: str | Path | None = None, extra: tuple[str, ...] = (),
             callbacks=None, words: dict[str, str] | None = None) -> dict:
    """Train ``method`` on ``concept`` with Tsuika's training loop; returns what it made.

    The data set is ``images`` renders of the concept in its fine-tuning context, captioned
    with the concept's own (never pretrained) word.

    Args:
        concept: a key of ``HELD_OUT``.
        work_dir: holds ``data/`` and ``out/``; reused data is kept, outputs are replaced.
        method: a registered training method.
        steps, learning_rate, rank, seed: the training budget and settings.
        images: fine-tuning set size.
        model: base model folder (default: the shipped reference model).
        extra: further ``section.key=value`` config overrides.
        callbacks: progress callbacks for the loop.
        words: caption word substitutions, e.g. ``{"heart": "<heart>"}`` for a textual
            inversion's new word (score with the same ``words``).

    Returns:
        ``{"file", "steps", "seconds", "first_loss", "last_loss", "bytes"}``.
    """
    from ..trainers.config import build_config
    from ..trainers.loop import train

    work = Path(work_dir)
    method = next((e.split("=", 1)[1] for e in extra if e.startswith("network.method=")),
                  method)
    data = work / "data"
    if not (data.is_dir() and any(data.glob("*.png"))):
        make_dataset(data, images, seed=seed, held_out_concept=concept, words=words)
    config = build_config(overrides=[
        f"model.path={model or REFERENCE_MODEL}", f"data.dir={data}",
        f"output.dir={work / 'out'}", f"output.name={concept}_{method}",
        "output.overwrite=true", "data.resolution=64", "data.bucket_step=32",
        f"network.method={method}", f"train.steps={steps}", f"train.learning_rate={learning_rate}",
        f"network.rank={rank}", f"network.alpha={rank}", f"train.seed={seed}",
        "train.batch_size=4", "sample.prompts=", *extra])
    start = time.perf_counter()
    result = train(config, callbacks)
    return {"file": result.file_path, "steps": result.steps,
            "seconds": round(time.perf_counter() - start, 1),
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "bytes": result.file_path.stat().st_size if result.file_path else 0}


def score_lora(lora_file: str | Path, concept: str, sampling: Sampling = Sampling(), *,
               model: str | Path | None = None, strength: float = 1.0,
               words: dict[str, str] | None = None, evaluator=None) -> dict:
    """Scores of the base model with ``lora_file`` merged in at ``strength``."""
    bundle = load_reference(model)
    merge_lora_file(bundle, lora_file, strength)
    with torch.no_grad():
        return score(bundle, concept, sampling, words=words, evaluator=evaluator)


def score_trained_file(path: str | Path, concept: str, sampling: Sampling = Sampling(), *,
                       model: str | Path | None = None, words: dict[str, str] | None = None,
                       evaluator=None) -> dict:
    """Scores of what a run wrote: a LoRA merged into the base model, a hypernetwork applied
    to it, a textual-inversion embedding taught to its text encoder (prompts must then say
    its word: ``words``), or a whole checkpoint (a full fine-tune such as DreamBooth) scored
    in the base model's place."""
    from safetensors import safe_open

    from ..trainers.formats import embedding, hypernetwork
    from ..trainers.formats.ldm_checkpoint import detect

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    checkpoint = detect(keys) is not None  # an SD single file, not a LoRA
    if hypernetwork.detect(dict.fromkeys(keys)):  # applied as ComfyUI's loader applies it
        from ..trainers.methods.hypernetwork import apply_file

        bundle = load_reference(model)
        apply_file(bundle, hypernetwork.read_hypernetwork(path))
        with torch.no_grad():
            return score(bundle, concept, sampling, words=words, evaluator=evaluator)
    if embedding.detect(dict.fromkeys(keys, torch.empty(1, 1))):
        from ..trainers.methods.textual_inversion import apply_file

        bundle = load_reference(model)
        apply_file(bundle, embedding.read_embedding(path))
        with torch.no_grad():
            return score(bundle, concept, sampling, words=words, evaluator=evaluator)
    if not checkpoint:
        return score_lora(path, concept, sampling, model=model, words=words,
                          evaluator=evaluator)
    bundle = load_reference(path)
    with torch.no_grad():
        return score(bundle, concept, sampling, words=words, evaluator=evaluator)


def merge_lora_file(bundle, lora_file: str | Path, strength: float = 1.0) -> int:
    """Merge a saved LoRA into ``bundle``'s weights, read through the same format code as any
    user's file; returns the modules changed."""
    from ..trainers.formats.lora_keys import ModuleIndex
    from ..trainers.formats.lora_layouts import read_lora
    from ..trainers.ops.merge import merge_lora

    lora = read_lora(lora_file, ModuleIndex.from_models(bundle.components))
    merged = merge_lora(bundle.components, lora, strength)
    log.info("merged %d LoRA modules from %s", merged, lora_file)
    return merged


def gate(before: dict, after: dict, *, min_gain: float = 0.4,
         max_retention_drop: float = 0.2) -> list[str]:
    """What is wrong with a fine-tuning result, as sentences (empty: it taught and kept).

    Args:
        before: :func:`score` of the base model.
        after: the same scores with the fine-tuned weights.
        min_gain: the least rise of concept fidelity that counts as learning.
        max_retention_drop: the most ``retention_subject`` may fall. A short LoRA on the
            heart, without prior preservation, costs about 0.12 (other shapes start to come
            out as hearts); 0.2 leaves room for sampling noise, not for a broken run.
    """
    problems = []
    gain = after["concept_fidelity"] - before["concept_fidelity"]
    if gain < min_gain:
        problems.append(f"concept fidelity rose by {gain:+.3f} ({before['concept_fidelity']:.3f}"
                        f" -> {after['concept_fidelity']:.3f}); at least {min_gain:+.3f} "
                        "means the concept was learned.")
    drop = before["retention_subject"] - after["retention_subject"]
    if drop > max_retention_drop:
        problems.append(f"retention fell by {drop:.3f} ({before['retention_subject']:.3f} -> "
                        f"{after['retention_subject']:.3f}); at most {max_retention_drop:.3f} "
                        "is allowed.")
    return problems
