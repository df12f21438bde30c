"""The ``tsuika`` command: train from a TOML config plus ``--set section.key=value`` overrides.

    tsuika train [CONFIG.toml] [--set train.steps=200 ...]
    tsuika fixture sd15-tiny OUT_DIR
    tsuika options
    tsuika extract | resize | bake | merge ...   (the model and LoRA tools: cli_tools.py)
    tsuika lint DIR [--json]   (trainers/cli_lint.py)
    tsuika captions DIR [--prefix sks --write]   (trainers/cli_captions.py)

The README's demo has its own entry point (``tsuika-demo`` or ``python -m
tsuika.reference.demo``): the backend never imports ``reference/``.

Works unchanged under ``accelerate launch --num_processes N -m tsuika.trainers.cli train``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from . import cli_captions, cli_lint
from .callbacks import Callbacks, StepInfo, TrainingStopped
from .cli_tools import add_parsers as add_tool_parsers
from .config import SECTIONS, ConfigError, load_config, option_help, option_names

log = logging.getLogger("tsuika")


class TerminalProgress(Callbacks):
    """A tqdm bar with loss, s/step and ETA; messages go to the log."""

    def __init__(self, quiet: bool = False):
        self.bar = None
        self.quiet = quiet

    def on_start(self, info):
        from tqdm import tqdm

        log.info("training on %s (%s): %d images, buckets %s, %d trainable parameters",
                 info["device"], info["dtype"], info["images"], info["buckets"],
                 info["trainable_parameters"])
        self.bar = tqdm(total=info["steps"], initial=info["start_step"], unit="step",
                        disable=self.quiet, dynamic_ncols=True)

    def on_step(self, info: StepInfo):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{info.loss:.4f}", s_per_step=f"{info.seconds_per_step:.2f}")
            self.bar.update(1)

    def on_save(self, info):
        log.info("saved %s", info.file_path)

    def on_message(self, text):
        log.info("%s", text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsuika", description="Train LoRAs for diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a TOML config and/or --set overrides",
                       epilog="options: " + ", ".join(option_names()) +
                       " (see `tsuika options` for help on each)")
    t.add_argument("config", nargs="?", help="TOML file with [model], [data], ... sections")
    t.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one option (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    f = sub.add_parser("fixture", help="write a random-weight model for tests and trials")
    f.add_argument("name", help="sd15-tiny, sd15-hostable, sdxl-tiny or sdxl-hostable")
    f.add_argument("out_dir")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--single-file", action="store_true",
                   help="write only OUT_DIR/NAME.safetensors, no diffusers/ folder (use it when "
                        "OUT_DIR is ComfyUI's models/checkpoints)")
    sub.add_parser("options", help="list every option with its default and help")
    cli_lint.add_parser(sub)
    cli_captions.add_parser(sub)
    # Kept so that `tsuika demo` still points somewhere; the demo lives in reference/.
    d = sub.add_parser("demo", help="moved: run `tsuika-demo` (or `python3 run.py demo`)")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    add_tool_parsers(sub)  # extract | resize | bake | merge ...: trainers/cli_tools.py
    return p


def configure_logging(rank: int = 0) -> None:
    """Log INFO on the main process (WARNING elsewhere) and quiet the libraries' chatter.

    Args:
        rank: this process's rank under ``accelerate launch`` (0 when alone).
    """
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "diffusers", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_options() -> None:
    import dataclasses

    for section, cls in SECTIONS.items():
        print(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"  {section}.{f.name} = {default!r}")
            for line in textwrap.wrap(option_help(f"{section}.{f.name}"), 76):
                print(f"      {line}")


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a multi-line message would read as several errors)."""
    return " ".join(str(error).split()) or type(error).__name__


def _os_error_line(e: OSError) -> str:
    """An OSError that is not one of ours: what failed, on which file, and what to check."""
    if type(e).__name__ == "OutputError" or (e.strerror is None and str(e)):
        return _one_line(e)
    where = f" {e.filename}" if e.filename else ""
    return (f"could not use{where}: {e.strerror or e}; check that the path exists, that you "
            "may write there and that the disk is not full")


def main(argv: list[str] | None = None) -> int:
    """Run the ``tsuika`` command; every error of ours ends as one line on stderr.

    Exit codes: 0 done, 2 bad input (options, files, dataset, model, state), 3 training
    stopped (what was kept is named), 4 the loss or the weights became non-finite, 1 a
    file-system or environment problem (or an unexpected error: its traceback is printed
    with TSUIKA_DEBUG=1), 130 interrupted.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("tsuika: interrupted (Ctrl-C); states saved so far are kept, resume with "
              "--set train.resume=latest", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from .families.base import ModelLoadError
    from .guards import NonFiniteLoss

    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    configure_logging(rank)
    try:
        if getattr(args, "run", None) is not None:  # sub-commands in their own cli_* modules
            # A sub-command returns the lines to show, or (lines, exit code): only this
            # program module writes to stdout.
            out = args.run(args)
            lines, code = out if isinstance(out, tuple) else (out, 0)
            for line in lines:
                print(line)
            return code
        if args.command == "options":
            _print_options()
            return 0
        if args.command == "fixture":
            from .fixtures import write_fixture

            paths = write_fixture(args.name, args.out_dir, seed=args.seed, dtype=args.dtype,
                                  overwrite=args.overwrite, single_file_only=args.single_file)
            for kind, path in paths.items():
                print(f"{kind}: {path}")
            return 0
        if args.command == "demo":
            print("tsuika: the demo has its own command: `tsuika-demo [OUT_DIR] [--steps N]` "
                  "(or `python3 run.py demo`).", file=sys.stderr)
            return 2
        config = load_config(args.config, args.overrides)
        from .loop import train

        progress = TerminalProgress(quiet=args.quiet or rank != 0)
        try:
            result = train(config, progress)
        finally:
            progress.close()
        if result.file_path is not None:
            from .methods import get_method

            kind = ("checkpoint" if get_method(config.network.method).trains_base_weights
                    else "LoRA")
            print(f"{kind}: {result.file_path}")
            for kind, path in result.files.items():
                if kind != "lora":
                    print(f"{kind}: {path}")
        return 0
    except TrainingStopped as e:
        print(f"tsuika: {_one_line(e)}", file=sys.stderr)
        return 3
    except NonFiniteLoss as e:
        print(f"tsuika: error: {_one_line(e)}", file=sys.stderr)
        return 4
    # ConfigError, StateError, DatasetError, ModelLoadError, MethodError, ImageLoadError and
    # the format errors are all ValueErrors that name the input and the fix.
    except (ConfigError, ModelLoadError, ValueError, FileExistsError, FileNotFoundError,
            IsADirectoryError, NotADirectoryError) as e:
        print(f"tsuika: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tsuika: error: {_os_error_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # not ours: one line by default, the traceback on request
        if os.environ.get("TSUIKA_DEBUG"):
            raise
        log.debug("unexpected error", exc_info=True)
        print(f"tsuika: error: unexpected {type(e).__name__}: {_one_line(e)} (a bug or an "
              "environment problem; rerun with TSUIKA_DEBUG=1 for the traceback and report "
              "it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
