"""Data-parallel scaling: does a 2-process run keep each process as fast as a 1-process run?

Runs the same LoRA training through Tsuika's loop once as a single process and once under
``accelerate launch --num_processes 2`` (CPU: gloo, one thread per process; CUDA: one GPU per
process), interleaved A B A B, and prints each process's median seconds per step after
warm-up. Each process trains its own micro-batch every step, so per-process throughput kept
= single-process s/step / 2-process s/step (target: >= 0.90).

    python benchmarks/scaling.py --steps 30 --warmup 5 --pairs 2
    python benchmarks/scaling.py --model path/to/sd15 --resolution 256 --batch 1 --steps 8

Default model: the shipped reference model (``reference/model``), 64x64, batch 4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args) -> None:
    """One training process: record seconds per step; rank 0 of N writes ``<out>/times_N.json``."""
    from tsuika.trainers.callbacks import Callbacks
    from tsuika.trainers.config import build_config
    from tsuika.trainers.loop import train

    times: list[float] = []

    class Record(Callbacks):
        def on_step(self, info):
            times.append(info.seconds_per_step)

    config = build_config(overrides=[
        f"model.path={args.model}", f"data.dir={args.data}", f"output.dir={args.out}/run",
        "output.overwrite=true", f"data.resolution={args.resolution}", "data.bucket_step=32",
        f"train.steps={args.steps + args.warmup}", f"train.batch_size={args.batch}",
        "network.rank=16", "network.alpha=16", "train.learning_rate=1e-4",
        f"train.device={args.device}", "sample.prompts="])
    train(config, Record())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    Path(args.out, f"times_{world}_rank{rank}.json").write_text(json.dumps(times))


def _run(args, processes: int, out: Path) -> float:
    base = ["--worker", "--model", str(args.model), "--data", str(args.data), "--out", str(out),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
            "--resolution", str(args.resolution), "--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    script = str(Path(__file__).resolve())
    if processes == 1:
        cmd = [sys.executable, script, *base]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        cmd = [str(accelerate if accelerate.exists() else shutil.which("accelerate")), "launch",
               "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", script, *base]
    subprocess.run(cmd, check=True, env=env, capture_output=not args.verbose)
    medians = []
    for rank in range(processes):
        times = json.loads((out / f"times_{processes}_rank{rank}.json").read_text())
        medians.append(statistics.median(times[args.warmup:]))
    return max(medians)  # the slowest rank sets the pace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the reference model)")
    p.add_argument("--data", default=None, help="image folder (default: 32 rendered hearts)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="measured steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    work = Path(args.out or tempfile.mkdtemp(prefix="tsuika-scaling-"))
    if args.model is None:
        from tsuika.reference.quality import REFERENCE_MODEL

        args.model = REFERENCE_MODEL
    if args.data is None:
        from tsuika.reference.world import make_dataset

        args.data = work / "data"
        if not args.data.is_dir():
            make_dataset(args.data, 32, seed=0, held_out_concept="heart")
    one, two = [], []
    for i in range(args.pairs):
        one.append(_run(args, 1, work / f"one_{i}"))
        two.append(_run(args, 2, work / f"two_{i}"))
        print(f"pair {i + 1}: 1 process {one[-1]:.4f} s/step, 2 processes {two[-1]:.4f} s/step")
    kept = statistics.median(one) / statistics.median(two)
    print(f"median s/step: 1 process {statistics.median(one):.4f}, 2 processes "
          f"{statistics.median(two):.4f} (slowest rank); per-process throughput kept: "
          f"{kept:.2f} ({args.threads} thread(s) per process, batch {args.batch}, "
          f"{args.resolution}px, {args.steps} measured steps after {args.warmup})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
