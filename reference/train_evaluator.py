"""Train the reference evaluator on freshly rendered scenes of the whole world.

    python -m tsuika.reference.train_evaluator --out reference/evaluator.safetensors \\
        --steps 1200 --seed 0

Every step renders a new batch (held-out concepts included, uniformly over each attribute's
values), roughens most of it (blur, noise, colour gain: generated samples are never clean),
and takes one AdamW step on the summed cross-entropy of all heads. At the end the accuracy
of each head is measured on a fixed set of clean renders drawn from a different seed, logged,
and saved with the weights.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .concepts import ATTRIBUTES, Scene, vocabulary
from .evaluator import IGNORE, Evaluator, EvaluatorNet
from .world import render, sample_scene

log = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 1_000_003


def render_batch(rng: random.Random, n: int, size: int) -> tuple[torch.Tensor, dict]:
    """``n`` random scenes of the whole world as (N, 3, size, size) in [0, 1], and labels.

    Stripes and checks start at a random phase in each image: the model's data fixes the grid
    to the canvas, but its samples do not keep that phase (a LoRA's checkered samples sat two
    pixels off it), and an evaluator trained on one phase called them all "solid".

    Args:
        rng: random source of the scenes.
        n: batch size.
        size: image side.

    Returns:
        ``(images, labels)``: labels map each attribute to a long tensor of vocabulary
        indices, ``IGNORE`` for the colour and texture of objects.
    """
    vocab = vocabulary()
    scenes = [sample_scene(rng, include_held_out=True) for _ in range(n)]
    images = np.stack([np.asarray(render(s, size, (rng.random(), rng.random())))
                       for s in scenes])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return x, labels_of(scenes, vocab)


def labels_of(scenes: list[Scene], vocab) -> dict[str, torch.Tensor]:
    """Vocabulary indices of each scene's attributes (``IGNORE`` where ``None``)."""
    return {a: torch.tensor([vocab[a].index(getattr(s, a)) if getattr(s, a) is not None
                             else IGNORE for s in scenes]) for a in ATTRIBUTES}


def roughen(x: torch.Tensor, gen: torch.Generator, clean_fraction: float = 0.3) -> torch.Tensor:
    """Mild, per-image degradations like a small diffusion model's samples: Gaussian blur
    (sigma up to 1.2 px at 64 px), per-channel gain (+-7 %), brightness shift (+-0.04) and
    pixel noise (std up to 0.06). Colours stay far from their neighbours in the palette.

    Args:
        x: images (N, 3, H, W) in [0, 1].
        gen: random source.
        clean_fraction: share of images left untouched.
    """
    n, c, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    sigma = u(n) * 1.2 * h / 64
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :],
                 groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None],
                 groups=n * c)
    y = y.reshape(n, c, h, w)
    y = y * (1 + (u(n, c, 1, 1) - 0.5) * 0.14) + (u(n, 1, 1, 1) - 0.5) * 0.08
    y = y + torch.randn(y.shape, generator=gen) * (u(n, 1, 1, 1) * 0.06)
    keep = (u(n) < clean_fraction)[:, None, None, None]
    return torch.where(keep, x, y.clamp(0, 1))


@torch.no_grad()
def head_accuracy(net: EvaluatorNet, x: torch.Tensor, labels: dict, batch_size: int = 250
                  ) -> dict[str, float]:
    """Per-head accuracy on labelled images (``IGNORE`` labels are not counted).

    Args:
        net: the network (put in eval mode here).
        x: images (N, 3, H, W) in [0, 1].
        labels: as ``render_batch`` returns.
        batch_size: images per forward pass.
    """
    net.eval()
    right = {a: 0 for a in labels}
    for start in range(0, len(x), batch_size):
        logits = net(x[start:start + batch_size])
        for a, y in labels.items():
            y = y[start:start + batch_size]
            right[a] += int(((logits[a].argmax(1) == y) & (y != IGNORE)).sum())
    return {a: right[a] / max(1, int((labels[a] != IGNORE).sum())) for a in labels}


def train_evaluator(steps: int = 1200, seed: int = 0, image_size: int = 64,
                    batch_size: int = 64, learning_rate: float = 3e-3, width: int = 32,
                    hidden: int = 128, val_size: int = 1000, out: str | Path | None = None,
                    overwrite: bool = False, log_every: int = 100) -> Evaluator:
    """Train an evaluator from scratch; save it when ``out`` is given.

    Args:
        steps: optimiser steps (one freshly rendered batch each).
        seed: seeds the scenes, the augmentations and the initial weights.
        image_size: side of the training renders (64 for the reference model).
        batch_size: images per step.
        learning_rate: peak AdamW learning rate (linear warm-up, cosine decay to zero).
        width: first-block channels of ``EvaluatorNet``.
        hidden: shared hidden layer size.
        val_size: clean renders (from a separate seed) the final accuracy is measured on.
        out: ``.safetensors`` path to write (plus the ``.json`` sidecar), or ``None``.
        overwrite: replace existing output files.
        log_every: log the running loss every this many steps.
    """
    if steps < 1 or batch_size < 1 or val_size < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, val_size={val_size}: "
                         "each must be at least 1.")
    if out is not None and not overwrite:
        for p in (Path(out), Path(out).with_suffix(".json")):
            if p.exists():  # fail before minutes of training, not after
                raise FileExistsError(f"{p} already exists; remove it or pass --overwrite.")
    vocab = vocabulary()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    net = EvaluatorNet({a: len(v) for a, v in vocab.items()}, width, hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5
                                              * (1 + math.cos(math.pi * min(1.0, s / steps))))
    n_params = sum(p.numel() for p in net.parameters())
    log.info("training evaluator: %d parameters, %d steps of %d images at %d px",
             n_params, steps, batch_size, image_size)
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        x, labels = render_batch(rng, batch_size, image_size)
        net.train()
        logits = net(roughen(x, gen))
        loss = sum(F.cross_entropy(logits[a], labels[a], ignore_index=IGNORE)
                   for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % log_every == 0 or step == steps:
            log.info("step %d/%d  loss %.4f  %.0f s", step, steps,
                     running / (step % log_every or log_every), time.perf_counter() - start)
            running = 0.0
    train_seconds = time.perf_counter() - start
    val_x, val_labels = render_batch(random.Random(seed + VALIDATION_SEED_OFFSET), val_size,
                                     image_size)
    clean = head_accuracy(net, val_x, val_labels)
    rough = head_accuracy(net, roughen(val_x, torch.Generator().manual_seed(seed + 1), 0.0),
                          val_labels)
    log.info("accuracy on %d fresh clean renders: %s", val_size, _fmt(clean))
    log.info("accuracy on the same renders roughened: %s", _fmt(rough))
    report = {"steps": steps, "seed": seed, "batch_size": batch_size,
              "learning_rate": learning_rate, "parameters": n_params,
              "train_seconds": round(train_seconds, 1), "val_size": val_size,
              "val_accuracy": {a: round(v, 4) for a, v in clean.items()},
              "val_accuracy_roughened": {a: round(v, 4) for a, v in rough.items()}}
    evaluator = Evaluator(net, vocab, image_size, report)
    if out is not None:
        paths = evaluator.save(out, overwrite=overwrite)
        log.info("saved %s and %s", *paths)
    return evaluator


def _fmt(acc: dict[str, float]) -> str:
    return "  ".join(f"{a} {v:.3f}" for a, v in acc.items())


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m tsuika.reference.train_evaluator",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="destination .safetensors (a .json is "
                   "written next to it)")
    p.add_argument("--steps", type=int, default=1200, help="optimiser steps (default 1200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, default=64, help="render side (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--val-size", type=int, default=1000,
                   help="fresh renders for the final accuracy (default 1000)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the net is small, and on a shared "
                   "machine more threads were many times slower)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads < 1:
        p.error(f"--threads {args.threads}: use 1 or more.")
    torch.set_num_threads(args.threads)
    try:
        evaluator = train_evaluator(steps=args.steps, seed=args.seed,
                                    image_size=args.image_size, batch_size=args.batch_size,
                                    val_size=args.val_size, out=args.out,
                                    overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        log.error("%s", err)
        return 2
    worst = min(evaluator.report["val_accuracy"].values())
    log.info("lowest head accuracy %.3f", worst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
