"""Training quality: does each method teach a held-out concept, and what does it cost?

Trains every method Tsuika has on every held-out concept of the reference world with the
same budget (steps, learning rate, rank, data), through the real training loop, then scores
the result with the shipped evaluator (``reference.quality``): concept fidelity, the concept
in new contexts, retention of what the base model knew, file size and time.

    python benchmarks/quality.py --steps 300 --images-per-prompt 8 --write-docs

``--write-docs`` replaces the table between the ``quality`` markers in docs/BENCHMARKS.md.
Methods no row measures yet are listed as such, not silently left out. Rows can be run in
groups (``--concepts``, ``--methods``, a shared ``--work`` keeps the untrained model's scores,
``--json`` per group) and put together with ``--from-json A.json B.json --write-docs
--merge-docs``, which keeps the docs table's rows that were not re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
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

# name -> config overrides on top of the shared budget ("{init}" is the row's initial word
# for the concept, below). Add a row when a method lands.
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
    # LyCORIS's usual LoHa / LoKr / DoRA runs adapt the same linears as LoRA; same rank.
    "LoHa (UNet linears)": ("network.algorithm=loha",),
    "LoKr (UNet linears, factor auto)": ("network.algorithm=lokr",),
    "DoRA (UNet linears)": ("network.algorithm=dora",),
    # One new word at ten times the adapters' rate (the textual-inversion paper trains its
    # embedding at 5e-3; one vector gets a weak gradient), started from the nearest value of
    # the same attribute the model knows, as a user starts from the class word.
    "Textual Inversion (1 vector, lr 5e-3)": ("network.method=textual_inversion",
                                              "train.learning_rate=5e-3",
                                              "network.init_word={init}"),
}
# Rows that learn a new word: their captions and prompts say "<heart>" where the others say
# "heart" (a word the reference model never saw in pretraining, either way).
NEW_WORD = {"Textual Inversion (1 vector, lr 5e-3)"}
INIT_WORD = {"heart": "circle", "checkered": "striped", "zorbit": "square"}
# Methods Tsuika has that no row measures yet (with why), so none is silently left out.
NOT_MEASURED = ("DreamBooth with prior preservation (`data.class_dir`; the prior-preservation "
                "recipe is in the defaults sweep below)",)


def run(args) -> dict:
    from tsuika.reference.concepts import HELD_OUT
    from tsuika.reference.quality import Sampling, finetune, score_trained_file

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
        base[concept], ceiling[concept] = base_scores(work / concept, concept, sampling, args.model)
        logging.info("%s base: %s", concept, base[concept])
        for name, extra in methods.items():
            slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower())
            words = {concept: f"<{concept}>"} if name in NEW_WORD else None
            extra = tuple(e.format(init=INIT_WORD[concept]) for e in extra)
            if words:
                extra += (f"network.token={words[concept]}",)
            run_ = finetune(concept, work / concept / slug, steps=args.steps,
                            learning_rate=args.lr, rank=args.rank, seed=args.seed,
                            model=args.model, extra=extra, words=words)
            t0 = time.perf_counter()
            after = score_trained_file(run_["file"], concept, sampling, model=args.model,
                                       words=words)
            rows.append({"method": name, "concept": concept, "before": base[concept],
                         "vae_ceiling": ceiling[concept],
                         "after": after, "train_seconds": run_["seconds"],
                         "score_seconds": round(time.perf_counter() - t0, 1),
                         "bytes": run_["bytes"], "steps": run_["steps"],
                         "last_loss": run_["last_loss"]})
            logging.info("%s / %s: %s", concept, name, after)
            if args.json:  # each row as it comes: a later row's failure keeps the earlier
                Path(args.json).write_text(json.dumps(
                    {"rows": rows, "settings": settings(args)}, indent=2, default=str))
    return {"rows": rows, "settings": settings(args)}


def settings(args) -> dict:
    return {
        "steps": args.steps, "learning_rate": args.lr, "rank": args.rank, "seed": args.seed,
        "images_per_prompt": args.images_per_prompt, "sample_steps": args.sample_steps,
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads", "torch": torch.__version__}


def base_scores(folder: Path, concept: str, sampling, model) -> tuple[dict, float]:
    """The untrained model's scores and the VAE ceiling of ``concept``, kept in ``folder``
    (``--work``) and reused by later runs with the same sampling and model: they take as
    long as scoring a row, and several invocations (``--methods``) share them."""
    from tsuika.reference.quality import load_reference, score, vae_ceiling

    key = {"sampling": vars(sampling), "model": str(model)}
    cached = folder / f"base-{sampling.images}x{sampling.steps}.json"
    if cached.is_file():
        found = json.loads(cached.read_text())
        if found.get("key") == key:
            return found["base"], found["ceiling"]
    bundle = load_reference(model)
    found = {"key": key, "base": score(bundle, concept, sampling),
             "ceiling": vae_ceiling(bundle.vae, concept)}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(found))
    tmp.replace(cached)
    return found["base"], found["ceiling"]


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
            f"{a['retention_subject']:.2f} | {_size(r['bytes'])} | "
            f"{r['train_seconds']:.0f} s |")
    lines += ["", "VAE ceiling: share of the concept's fine-tuning images still recognised after "
              "a round trip through the model's VAE; no method that trains the UNet or the "
              "text side can exceed it.",
              "", "Not in the table: " + "; ".join(NOT_MEASURED) + "."]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"  # an embedding: bytes


def write_docs(text: str) -> None:
    replace_docs_section(DOCS, BEGIN, END, text)


def _row_key(line: str) -> tuple[str, str]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    return cells[0], cells[1]


def merged(old: str, new: str, command: str) -> str:
    """``new``'s table with the rows of ``old`` (the docs section) it did not re-run kept, in
    concept then ``METHODS`` order, under one header naming the whole table's command: rows
    of one table run in groups (``--concepts`` / ``--methods``) with the same settings."""
    from tsuika.reference.concepts import HELD_OUT

    def rows(text: str) -> dict[tuple[str, str], str]:
        found = {}
        for line in text.splitlines():
            if line.startswith("| ") and not line.startswith("| concept |"):
                found[_row_key(line)] = line
        return found

    table_rows = {**rows(old), **rows(new)}
    order = list(METHODS)
    keys = sorted(table_rows, key=lambda k: (
        list(HELD_OUT).index(k[0]) if k[0] in HELD_OUT else len(HELD_OUT),
        order.index(k[1]) if k[1] in order else len(order)))
    lines = new.splitlines()
    head = lines.index(next(x for x in lines if x.startswith("| concept |")))
    first = lines[0].split("` — ", 1)[1]
    return "\n".join([f"`{command}` (run in groups with `--concepts` / `--methods`, same "
                      f"settings) — {first}", *lines[1:head + 2],
                      *[table_rows[k] for k in keys], *lines[head + 2 + len(rows(new)):]])


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less ``options`` and their values (an option's values run to the next
    ``--``)."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=", 1)[0] in options
            if skipping:
                continue
        if not skipping:
            out.append(a)
    return out


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
    p.add_argument("--from-json", nargs="*", default=None,
                   help="build the table from earlier --json results instead of training")
    p.add_argument("--merge-docs", action="store_true",
                   help="with --write-docs: keep the docs table's rows this run did not redo")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.from_json:
        parts = [json.loads(Path(f).read_text()) for f in args.from_json]
        same = {json.dumps({k: v for k, v in r["settings"].items() if k != "machine"},
                           sort_keys=True) for r in parts}
        if len(same) > 1:
            raise SystemExit(f"--from-json: the results' settings differ: {sorted(same)}.")
        result = {"rows": [row for r in parts for row in r["rows"]],
                  "settings": parts[0]["settings"]}
        s = result["settings"]
        argv = ["--steps", str(s["steps"]), "--lr", f"{s['learning_rate']:g}",
                "--images-per-prompt", str(s["images_per_prompt"])]
    else:
        result = run(args)
    shown = [a for i, a in enumerate(argv) if a not in ("--write-docs", "--merge-docs", "--json")
             and not a.startswith("--json=") and (i == 0 or argv[i - 1] != "--json")]
    text = table(result, "python benchmarks/quality.py " + shlex.join(shown))  # the work only
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.write_docs and args.merge_docs:
        doc = DOCS.read_text(encoding="utf-8")
        old = doc.split(BEGIN, 1)[1].split(END, 1)[0] if BEGIN in doc else ""
        full = [a for a in shown if a not in ("--merge-docs",)]
        full = _without(full, ("--methods", "--concepts", "--work"))
        text = merged(old, text, "python benchmarks/quality.py " + shlex.join(full))
        write_docs(text)
    elif args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
