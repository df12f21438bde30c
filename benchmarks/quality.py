"""Training quality: does each method teach a held-out concept, and what does it cost?

Trains every method Tsuika has on every held-out concept of the reference world with the
same budget (steps, learning rate, rank, data), through the real training loop, then scores
the result with the shipped evaluator (``reference.quality``): concept fidelity, the concept
in new contexts, retention of what the base model knew, file size and time.

    python benchmarks/quality.py --steps 300 --images-per-prompt 8 --write-docs

``--write-docs`` replaces the table between the ``quality`` markers in docs/BENCHMARKS.md.
Methods that do not exist yet (DreamBooth, Textual Inversion, Hypernetworks) are listed as
such, not silently left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import replace_docs_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"

# name -> config overrides on top of the shared budget. Add a row when a method lands.
METHODS: dict[str, tuple[str, ...]] = {
    "LoRA (UNet linears)": (),
    "LoCon (UNet linears + 3x3 convs)": ("network.algorithm=locon", "network.conv_rank=8",
                                         "network.conv_alpha=8"),
    "LoRA (UNet + text encoder)": ("network.train_text_encoder=true",
                                   "train.text_encoder_lr=5e-4"),
    # Every weight moves, so a tenth of the adapters' rate (the model was pretrained at 5e-4).
    "DreamBooth (whole UNet, lr 5e-5)": ("network.method=dreambooth",
                                         "train.learning_rate=5e-5"),
    "Hypernetwork (1,2,1, relu)": ("network.method=hypernetwork",
                                   "network.hypernetwork_activation=relu"),
}
NOT_YET = ("DreamBooth with prior preservation (class images)", "Textual Inversion")


def run(args) -> dict:
    from tsuika.reference.concepts import HELD_OUT
    from tsuika.reference.quality import (
        Sampling,
        finetune,
        load_reference,
        score,
        score_trained_file,
        vae_ceiling,
    )

    sampling = Sampling(images=args.images_per_prompt, steps=args.sample_steps)
    concepts = args.concepts.split(",")
    for c in concepts:
        if c not in HELD_OUT:
            raise SystemExit(f"--concepts: {c!r} is not held out; choose from "
                             f"{', '.join(HELD_OUT)}.")
    methods = {m: METHODS[m] for m in METHODS if not args.methods or m in args.methods}
    work = Path(args.work or tempfile.mkdtemp(prefix="tsuika-quality-"))
    rows, base, ceiling = [], {}, {}
    for concept in concepts:
        bundle = load_reference(args.model)
        base[concept] = score(bundle, concept, sampling)
        ceiling[concept] = vae_ceiling(bundle.vae, concept)
        logging.info("%s base: %s", concept, base[concept])
        for name, extra in methods.items():
            slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower())
            run_ = finetune(concept, work / concept / slug, steps=args.steps,
                            learning_rate=args.lr, rank=args.rank, seed=args.seed,
                            model=args.model, extra=extra)
            t0 = time.perf_counter()
            after = score_trained_file(run_["file"], concept, sampling, model=args.model)
            rows.append({"method": name, "concept": concept, "before": base[concept],
                         "vae_ceiling": ceiling[concept],
                         "after": after, "train_seconds": run_["seconds"],
                         "score_seconds": round(time.perf_counter() - t0, 1),
                         "bytes": run_["bytes"], "steps": run_["steps"],
                         "last_loss": run_["last_loss"]})
            logging.info("%s / %s: %s", concept, name, after)
    return {"rows": rows, "settings": {
        "steps": args.steps, "learning_rate": args.lr, "rank": args.rank, "seed": args.seed,
        "images_per_prompt": args.images_per_prompt, "sample_steps": args.sample_steps,
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads", "torch": torch.__version__}}


def table(result: dict, command: str) -> str:
    s = result["settings"]
    lines = [
        f"`{command}` — {s['machine']}, torch {s['torch']}; every method: {s['steps']} steps, "
        f"batch 4, lr {s['learning_rate']}, rank {s['rank']}, 24 fine-tuning images, seed "
        f"{s['seed']}; scores over {s['images_per_prompt']} samples per prompt "
        f"({s['sample_steps']} DDIM steps, CFG 7).",
        "",
        "| concept | method | concept fidelity (VAE ceiling) | new context: concept "
        "| new context: all | retention (shape+colour) | file | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['concept']} | {r['method']} | {b['concept_fidelity']:.2f} → "
            f"**{a['concept_fidelity']:.2f}** ({r.get('vae_ceiling', float('nan')):.2f}) | "
            f"{b['new_context_concept']:.2f} → "
            f"{a['new_context_concept']:.2f} | {b['new_context_fidelity']:.2f} → "
            f"{a['new_context_fidelity']:.2f} | {b['retention_subject']:.2f} → "
            f"{a['retention_subject']:.2f} | {r['bytes'] / 1e6:.2f} MB | "
            f"{r['train_seconds']:.0f} s |")
    lines += ["", "VAE ceiling: share of the concept's fine-tuning images still recognised after "
              "a round trip through the model's VAE; no method that trains the UNet or the "
              "text side can exceed it.",
              "", "Not implemented yet, so not in the table: " + "; ".join(NOT_YET) + "."]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    replace_docs_section(DOCS, BEGIN, END, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", default="heart,checkered,zorbit")
    p.add_argument("--methods", nargs="*", help=f"subset of: {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-prompt", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--model", default=None, help="base model (default: reference/model)")
    p.add_argument("--work", default=None, help="keep data and trained files here")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = run(args)
    shown = [a for i, a in enumerate(argv) if a != "--write-docs" and a != "--json"
             and not a.startswith("--json=") and (i == 0 or argv[i - 1] != "--json")]
    text = table(result, "python benchmarks/quality.py " + " ".join(shown))  # the work only
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
