"""``tsuika lint DIR``: the pre-flight check of a dataset folder, as text or JSON.

    tsuika lint DIR [--json] [--trigger WORD] [--config CONFIG.toml] [--set data.resolution=768]
                    [--model PATH] [--estimate] [--strict]

Exit codes: 0 checked (problems or not; ``--strict``: 0 only without problems, 5 with),
2 bad input, 1 an environment problem (as ``tsuika train``).
"""

from __future__ import annotations

import argparse
import json

STRICT_EXIT = 5


def add_parser(sub) -> None:
    """Register ``lint`` on the ``tsuika`` command's sub-parsers."""
    p = sub.add_parser("lint", help="check a dataset folder before training (captions, "
                       "duplicates, sizes, buckets, token lengths; optional time/memory "
                       "estimate)")
    p.add_argument("dir", help="the dataset folder (as data.dir)")
    p.add_argument("config", nargs="?", help="TOML training config whose data/train options "
                   "the check uses (optional)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one option (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trigger", default=None, help="word every caption should hold "
                   "(default: data.trigger_word)")
    p.add_argument("--model", default=None, help="model whose tokenizers measure the captions "
                   "(default: the CLIP tokenizer SD1.x and SDXL read); model.path works too")
    p.add_argument("--max-distance", type=int, default=None, help="perceptual-hash bits two "
                   "images may differ in and count as near-duplicates (default 6; -1 = off)")
    p.add_argument("--estimate", action="store_true", help="also estimate time and peak memory "
                   "of the run on this machine (loads the model and times a few real steps)")
    p.add_argument("--strict", action="store_true",
                   help=f"exit with {STRICT_EXIT} when a problem is found")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> tuple[list[str], int]:
    """Run the check and print it; errors propagate to the CLI's one-line handler."""
    from .config import load_config
    from .data.folder import scan_folder
    from .data.phash import DEFAULT_MAX_DISTANCE
    from .preflight import check_dataset, default_tokenizers, named_tokenizers

    config = load_config(args.config, [*args.overrides, f"data.dir={args.dir}"]
                         + ([f"model.path={args.model}"] if args.model else []))
    scan = scan_folder(config.data.dir, caption_extension=config.data.caption_extension)
    estimate = None
    if args.estimate:  # first, so that its memory peak is the run's alone
        import time

        # A run pays for importing torch and the loop too; this process does it here.
        t, c = time.perf_counter(), time.process_time()
        from .estimate import estimate_run

        imports = (time.perf_counter() - t, time.process_time() - c)
        estimate = estimate_run(config, scan, startup=imports).to_dict()
    bundle = None
    if config.model.path:
        from .families import load_model

        bundle = load_model(config.model.path, config.model.family, config.model.prediction_type)
    tokenizers = named_tokenizers(bundle) if bundle is not None else default_tokenizers()
    distance = DEFAULT_MAX_DISTANCE if args.max_distance is None else args.max_distance
    report = check_dataset(scan, config.data, tokenizers, trigger_word=args.trigger,
                           batch_size=config.train.batch_size, max_distance=distance)
    report.estimate = estimate
    text = (json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json
            else report.to_text())
    return [text], (STRICT_EXIT if args.strict and report.findings else 0)
