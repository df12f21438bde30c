"""Speed and memory of LoRA training: Tsuika against kohya's sd-scripts (train_network.py).

Both sides train on the same files, written fresh into a temp folder: an SD1.5-architecture
single-file checkpoint with random weights (Tsuika's own diffusers -> LDM conversion; speed
does not depend on weight values) and a kohya-style dataset folder ``10_sks/`` of random
images with one caption each ("a photo of a sks dog"). Same settings on both sides: fp32,
batch 1, square images at --resolution (no resize, no crop), LoRA rank 16 / alpha 16, AdamW
(lr 1e-4, weight decay 0.01, grad-norm clip 1.0: both sides' defaults), UNet only.

Module sets (kept equal on purpose):
  kohya   networks.lora adapts every Linear (and 1x1 Conv) inside the UNet's
          Transformer2DModel blocks: attn1/attn2 to_q/k/v/out, ff, proj_in/proj_out.
  Tsuika  network.target=transformer: the same layers (kohya's default set).
  (Tsuika's benchmarks/speed.py uses the smaller 'attention' set; not comparable to this.)

Runs (each a fresh process, interleaved A B C A B C for --pairs):
  tsuika        `tsuika train` with its defaults: latents and text embeddings cached first.
  kohya         train_network.py, VAE encode + text encode every step.
  kohya_cache   the same with --cache_latents (kohya still text-encodes every step: SD1.5
                train_network.py has no text-encoder output cache).
kohya runs with --sdpa (torch's scaled_dot_product_attention, what diffusers and Tsuika use;
without it kohya uses its own plain attention) and --max_data_loader_n_workers 0 (its
default of 8 non-persistent workers would be re-forked every epoch; Tsuika loads in-process).
Add kohya flags with --kohya-arg=--flag=value.

How it measures: each run is started through this file's --exec mode, which registers a
global torch optimizer step post-hook (torch.optim.optimizer.register_optimizer_step_post_hook)
and then runs the trainer unchanged (kohya's script via runpy, Tsuika's CLI main). The hook
writes a timestamp after every optimizer step, so step k lasts stamp[k] - stamp[k-1]: forward,
backward, optimizer and data loading, no parsing of progress bars. The first --warmup steps
are dropped (step 1 has no start stamp, so --warmup is at least 1). Peak RSS: the trainer
process's own ru_maxrss, and the peak sum of RSS over its process tree (psutil, polled every
0.2 s; children's shared pages count twice). Thread counts come from the environment (set
OMP_NUM_THREADS the same for both); each run prints torch's thread count.

Setup of kohya, outside this project (tested with sd-scripts 48d368f, Feb 2026):
    git clone https://github.com/kohya-ss/sd-scripts /work/kohya
    python -m venv /work/kohya-venv; echo torch==2.13.0 > /work/kohya-constraints.txt
    /work/kohya-venv/bin/pip install -c /work/kohya-constraints.txt torch==2.13.0
    grep -v '^bitsandbytes' /work/kohya/requirements.txt > /work/kohya-requirements-cpu.txt
    cd /work/kohya && /work/kohya-venv/bin/pip install -c /work/kohya-constraints.txt \
        -r /work/kohya-requirements-cpu.txt torchvision
kohya's pins (diffusers 0.32.1, transformers 4.54.1, accelerate 1.6.0) run on torch 2.13.
kohya imports torchvision (for transforms only) without listing it; PyPI's torchvision 0.28.0
is built against CUDA torch, so with torch+cpu its ops library does not load and importing
torchvision fails ("operator torchvision::nms does not exist"). Workaround, in the kohya venv
only: in torchvision/__init__.py import _autograd_registrations and _meta_registrations only
`if extension._has_ops():` (a CPU torchvision wheel from download.pytorch.org also works).

    OMP_NUM_THREADS=2 python benchmarks/peer_kohya.py --resolution 256 --steps 10 --warmup 2 \\
        --pairs 2
    python benchmarks/peer_kohya.py --resolution 64 --steps 3 --warmup 1 --pairs 1   # smoke test

No network access needed: kohya loads its CLIP tokenizer from --tokenizer_cache_dir, which
this script fills with Tsuika's shipped CLIP vocabulary; HF_HUB_OFFLINE=1 is set for all runs.
After the first round the script checks that both saved LoRA files hold the same modules
(192 and 6,782,976 parameters for SD1.5) and stops if not. Each run needs about 8.5 GiB of
memory at load time (the fp32 checkpoint); runs are sequential.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPTION = "a photo of a sks dog"
KOHYA_TOKENIZER_ID = "openai/clip-vit-large-patch14"  # what kohya asks for; cached offline


# ----------------------------------------------------------------------------- exec mode
def exec_trainer(stamps: str, target: str, argv: list[str]) -> None:
    """Run a trainer in this process with a step-timestamp hook; target is a script path
    (run as __main__) or module:function. Works in any venv: needs only torch."""
    import resource

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    rc = 0
    with open(stamps, "w", buffering=1) as out:  # line-buffered: stamps survive a crash
        out.write(json.dumps({"start": time.perf_counter(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__}) + "\n")
        # Every optimizer (kohya's, wrapped by accelerate; Tsuika's, via GradScaler) ends a
        # step in Optimizer.step, which runs the global post-hooks.
        register_optimizer_step_post_hook(
            lambda *_: out.write(json.dumps({"step": time.perf_counter()}) + "\n"))
        try:
            if target.endswith(".py"):
                import runpy

                sys.argv = [target, *argv]
                sys.path.insert(0, str(Path(target).parent))  # kohya imports networks.lora
                runpy.run_path(target, run_name="__main__")
            else:
                import importlib

                module, fn = target.split(":")
                rc = getattr(importlib.import_module(module), fn)(argv) or 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out.write(json.dumps({"end": time.perf_counter(), "maxrss_gib": kb / 2**20}) + "\n")
    sys.exit(rc)


# ----------------------------------------------------------------------------- inputs
def write_checkpoint(path: Path, dtype: str) -> None:
    """Random-weight SD1.5 in the original single-file layout, via Tsuika's own writer."""
    from tsuika.trainers.fixtures import build_modules, write_single_file

    unet, vae, te, cfg = build_modules("sd15", seed=0)
    write_single_file(path, unet, vae, te, cfg, dtype=dtype)


def write_inputs(work: Path, args) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    from _bench_common import make_images

    from tsuika.trainers.families.sd15 import TOKENIZER_DIR

    paths = {"model": work / f"sd15_random_{args.checkpoint_dtype}.safetensors",
             "data": work / "data", "tokenizers": work / "tokenizers"}
    write_checkpoint(paths["model"], args.checkpoint_dtype)
    # kohya repeats a folder N times per epoch ("10_sks"); Tsuika reads the same convention.
    # Many repeats: no epoch boundary (kohya re-shuffles, may re-cache) inside short runs.
    make_images(args.resolution, args.images, None, folder=paths["data"] / "10_sks")
    for f in (paths["data"] / "10_sks").glob("*.txt"):
        assert f.read_text() == CAPTION
    tok = paths["tokenizers"] / KOHYA_TOKENIZER_ID.replace("/", "_")  # kohya's cache naming
    tok.mkdir(parents=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / f, tok / f)
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    return paths


# ----------------------------------------------------------------------------- commands
def kohya_command(args, paths, out: Path, cache_latents: bool) -> list[str]:
    total = args.steps + args.warmup
    cmd = [
        "--pretrained_model_name_or_path", str(paths["model"]),
        "--train_data_dir", str(paths["data"]), "--caption_extension", ".txt",
        "--resolution", str(args.resolution), "--train_batch_size", "1",
        "--max_train_steps", str(total), "--seed", "0",
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
        "--network_train_unet_only",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
        "--mixed_precision", "no", "--save_precision", "fp16",
        "--save_model_as", "safetensors", "--output_dir", str(out), "--output_name", "lora",
        "--tokenizer_cache_dir", str(paths["tokenizers"]),
        "--sdpa", "--max_data_loader_n_workers", "0",
    ]
    if cache_latents:
        cmd.append("--cache_latents")
    cmd += args.kohya_arg
    return [args.kohya_python, __file__, "--exec", str(args.kohya / "train_network.py"),
            "--", *cmd]


def tsuika_command(args, paths, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [f"model.path={paths['model']}", f"data.dir={paths['data']}",
            f"data.resolution={args.resolution}", f"train.steps={args.steps + args.warmup}",
            "network.rank=16", "network.alpha=16", "network.target=transformer",
            "train.optimizer=adamw", "train.learning_rate=1e-4", "train.batch_size=1",
            "train.mixed_precision=no", "train.device=cpu", "train.seed=0",
            f"output.dir={out}", "output.save_dtype=fp16", *args.tsuika_set, *extra]
    argv = ["train"] + [x for s in sets for x in ("--set", s)]
    return [args.tsuika_python, __file__, "--exec", "tsuika.trainers.cli:main", "--", *argv]


# ----------------------------------------------------------------------------- one run
def run_one(name: str, cmd: list[str], stamps: Path, log: Path, args) -> dict:
    """Start ``cmd``, poll its process tree's RSS, and turn its stamps into step times."""
    import psutil

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    cmd = cmd[:2] + ["--stamps", str(stamps)] + cmd[2:]  # python, this file, --stamps F
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                cwd=str(args.kohya) if name.startswith("kohya") else None)
        samples: list[tuple[float, int]] = []  # (perf_counter, tree RSS)

        def poll():
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    tree = [root, *root.children(recursive=True)]
                    samples.append((time.perf_counter(), sum(p.memory_info().rss for p in tree)))
                except psutil.Error:
                    pass
                time.sleep(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in stamps.read_text().splitlines()] if stamps.exists() else []
    steps = [r["step"] for r in recs if "step" in r]
    if rc or len(steps) != args.steps + args.warmup:
        tail = log.read_text()[-4000:]
        sys.exit(f"{name} run failed (exit {rc}, {len(steps)} of {args.steps + args.warmup} "
                 f"optimizer steps); log {log}:\n{tail}")
    head = next(r for r in recs if "start" in r)
    end = next(r for r in recs if "end" in r)
    # steps[k] - steps[k-1] is step k+1 (1-based); keep steps after the warm-up.
    times = [b - a for a, b in itertools.pairwise(steps)][args.warmup - 1:]
    # perf_counter is CLOCK_MONOTONIC on Linux: the child's stamps and our samples share it.
    # Loading the fp32 checkpoint sets both sides' overall peak; the training phase (from
    # the first optimizer step on) shows what the training itself holds.
    train = [r for t, r in samples if t >= steps[0]] or [0]
    return {"times": times, "rss_gib": end["maxrss_gib"],
            "tree_rss_gib": max((r for _, r in samples), default=0) / 2**30,
            "train_rss_gib": max(train) / 2**30,
            "wall_s": wall, "to_first_step_s": steps[0] - head["start"],
            "threads": head["threads"], "torch": head["torch"]}


def check_same_modules(files: dict[str, Path | None]) -> None:
    """Both sides save kohya-named LoRA files (lora_unet_..._attn1_to_q ...): equal module
    names and parameter counts mean equal work. Stops if they differ."""
    import math

    from safetensors import safe_open

    seen = {}
    for name, f in files.items():
        if f is None:
            sys.exit(f"{name} saved no LoRA file; cannot check its module set")
        with safe_open(str(f), "pt") as st:
            keys = [k for k in st.keys() if not k.endswith(".alpha")]  # noqa: SIM118
            seen[name] = ({k.split(".")[0] for k in keys},
                          sum(math.prod(st.get_slice(k).get_shape()) for k in keys))
    (mods, n), *others = seen.values()
    if any(o != (mods, n) for o in others):
        sys.exit("the sides adapt different modules: " + "; ".join(
            f"{k}: {len(m)} modules, {p} params" for k, (m, p) in seen.items()))
    print(f"module sets match: {len(mods)} modules, {n} LoRA parameters on every side",
          flush=True)


# ----------------------------------------------------------------------------- report
def report(runs: dict[str, list[dict]], args) -> None:
    print(f"\nSD1.5 random weights, {args.resolution}x{args.resolution}, batch 1, fp32, LoRA "
          f"16/16 (transformer blocks), AdamW 1e-4; {args.steps} measured steps after "
          f"{args.warmup} warm-up, {args.pairs} run(s) each; CPU threads "
          f"{ {k: v[0]['threads'] for k, v in runs.items()} }")
    print(f"{'':12s}{'median':>9s}{'min':>9s}{'max':>9s}  s/step   {'peak RSS':>9s}"
          f"{'tree RSS':>10s}{'in steps':>10s}{'to 1st step':>13s}")
    summary = {}
    for name, rs in runs.items():
        t = [x for r in rs for x in r["times"]]  # every measured step of every run
        s = summary[name] = {"median": statistics.median(t), "min": min(t), "max": max(t),
                             "rss": max(r["rss_gib"] for r in rs),
                             "tree": max(r["tree_rss_gib"] for r in rs),
                             "train": max(r["train_rss_gib"] for r in rs),
                             "first": statistics.median(r["to_first_step_s"] for r in rs)}
        print(f"{name:12s}{s['median']:9.3f}{s['min']:9.3f}{s['max']:9.3f}{'':9s}"
              f"{s['rss']:7.2f} GiB{s['tree']:6.2f} GiB{s['train']:6.2f} GiB{s['first']:11.1f} s")
    t = summary["tsuika"]
    for name in runs:
        if name.startswith("tsuika") and name != "tsuika":
            v = summary[name]
            print(f"{name}/tsuika: s/step {v['median'] / t['median']:.2f}, "
                  f"RSS in steps {v['train'] / t['train']:.2f}")
        if name.startswith("kohya"):
            k = summary[name]
            print(f"tsuika/{name}: s/step {t['median'] / k['median']:.2f}, "
                  f"peak RSS {t['rss'] / k['rss']:.2f}, tree RSS {t['tree'] / k['tree']:.2f}, "
                  f"RSS in steps {t['train'] / k['train']:.2f}")
    per_run = {n: ", ".join(f"{statistics.median(r['times']):.3f}" for r in rs)
               for n, rs in runs.items()}
    print("per-run median s/step: " + "; ".join(f"{n} [{v}]" for n, v in per_run.items()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stamps":  # exec mode (inside a child)
        stamps, _, target, _, *argv = sys.argv[2:]
        exec_trainer(stamps, target, argv)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kohya", type=Path, default=Path("/work/kohya"),
                   help="sd-scripts checkout (holds train_network.py)")
    p.add_argument("--kohya-python", default="/work/kohya-venv/bin/python",
                   help="python of a venv with kohya's requirements")
    p.add_argument("--tsuika-python", default=sys.executable,
                   help="python of a venv with Tsuika installed (default: this one)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped first (at least 1)")
    p.add_argument("--pairs", type=int, default=2, help="rounds of tsuika, kohya, kohya_cache")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--checkpoint-dtype", choices=("fp32", "fp16"), default="fp32",
                   help="dtype stored in the random checkpoint (both sides train in fp32)")
    p.add_argument("--no-kohya-uncached", action="store_true",
                   help="skip the kohya run without --cache_latents")
    p.add_argument("--kohya-arg", action="append", default=[], metavar="--FLAG[=VALUE]",
                   help="extra train_network.py argument (repeatable)")
    p.add_argument("--tsuika-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra Tsuika option (repeatable)")
    p.add_argument("--tsuika-variant", action="append", default=[],
                   metavar="NAME:SECTION.KEY=VALUE[,SECTION.KEY=VALUE]",
                   help="one more Tsuika run with these options, e.g. a memory preset "
                        "'tsuika_gc:train.gradient_checkpointing=true' (repeatable)")
    p.add_argument("--no-kohya", action="store_true",
                   help="run only the Tsuika variants (memory presets; no checkout needed)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, files)")
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be at least 1: step 1 has no start timestamp")
    variants_extra = {}
    for spec in args.tsuika_variant:
        name, _, sets = spec.partition(":")
        if not name.startswith("tsuika") or not sets:
            p.error(f"--tsuika-variant {spec!r}: write NAME:SECTION.KEY=VALUE[,...] with a "
                    "name starting 'tsuika', e.g. tsuika_gc:train.gradient_checkpointing=true")
        variants_extra[name] = tuple(sets.split(","))
    if args.no_kohya:
        pass
    elif not (args.kohya / "train_network.py").is_file():
        sys.exit(f"no kohya sd-scripts checkout at {args.kohya} (train_network.py missing); "
                 "clone https://github.com/kohya-ss/sd-scripts there or pass --kohya DIR.")
    elif not (Path(args.kohya_python).is_file() and os.access(args.kohya_python, os.X_OK)):
        sys.exit(f"no kohya python at {args.kohya_python}; make a venv with kohya's "
                 "requirements (see this file's docstring) or pass --kohya-python PATH.")
    args.kohya = args.kohya.resolve()

    work = Path(tempfile.mkdtemp(prefix="tsuika_peer_kohya_"))
    try:
        print(f"writing the random SD1.5 checkpoint and dataset into {work}", flush=True)
        paths = write_inputs(work, args)
        variants = {"tsuika": lambda out: tsuika_command(args, paths, out),
                    "kohya": lambda out: kohya_command(args, paths, out, False),
                    "kohya_cache": lambda out: kohya_command(args, paths, out, True)}
        for name, extra in variants_extra.items():
            variants[name] = lambda out, extra=extra: tsuika_command(args, paths, out, extra)
        if args.no_kohya_uncached or args.no_kohya:
            del variants["kohya"]
        if args.no_kohya:
            del variants["kohya_cache"]
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        for i in range(args.pairs):
            for name, make in variants.items():
                out = work / f"out_{name}_{i}"
                r = run_one(name, make(out), work / f"{name}_{i}.stamps",
                            work / f"{name}_{i}.log", args)
                runs[name].append(r)
                r["lora"] = next(out.glob("*.safetensors"), None)
                print(f"{name} run {i}: median {statistics.median(r['times']):.3f} s/step, "
                      f"peak RSS {r['rss_gib']:.2f} GiB (tree {r['tree_rss_gib']:.2f}), "
                      f"wall {r['wall_s']:.0f} s", flush=True)
            if i == 0:
                check_same_modules({n: rs[0]["lora"] for n, rs in runs.items()})
        report(runs, args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
