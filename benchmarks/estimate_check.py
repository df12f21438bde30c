"""How close ``tsuika lint --estimate`` comes to the real run, on this machine.

For each setting (model fixture, resolution, batch size, steps, samples): one fresh process
runs ``tsuika lint DIR --estimate --json`` and another runs ``tsuika train`` with the same
options; the script prints the estimated and real time and peak memory and their errors.
The real run's time is its ``train`` command from start to end (in-process, after Python
starts), its peak the process's VmHWM at exit, like the estimate's.

    python benchmarks/estimate_check.py --work /tmp/estimate_check
    python benchmarks/estimate_check.py --work /tmp/estimate_check --only tiny-64-b1

Fixtures are written once into WORK (sd15-tiny, sd15-hostable: random weights); datasets are
random-noise images of a few sizes with short captions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench_common import make_images  # noqa: E402

# (id, fixture, resolution, batch size, steps, images, extra --set options)
SETTINGS = [
    ("tiny-64-b1", "sd15-tiny", 64, 1, 40, 12, []),
    ("tiny-128-b2", "sd15-tiny", 128, 2, 20, 12, []),
    ("tiny-64-samples", "sd15-tiny", 64, 1, 20, 8,
     ["sample.prompts=a photo of a sks dog", "sample.every=10", "sample.steps=8"]),
    ("tiny-64-gc", "sd15-tiny", 64, 1, 30, 12, ["train.gradient_checkpointing=true"]),
    ("tiny-64-dreambooth", "sd15-tiny", 64, 1, 30, 12, ["network.method=dreambooth"]),
    ("tiny-96-b4", "sd15-tiny", 96, 4, 12, 12, []),
    ("hostable-64-b1", "sd15-hostable", 64, 1, 12, 8, []),
    ("hostable-128-b2", "sd15-hostable", 128, 2, 6, 8, []),
]

RUN_TRAIN = """
import re, sys, time
from tsuika.trainers.cli import main
t, c = time.perf_counter(), time.process_time()
rc = main(sys.argv[1:])
dt, dc = time.perf_counter() - t, time.process_time() - c
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
print("RESULT", rc, dt, dc, hwm, file=sys.stderr)
"""


def _fixture(work: Path, name: str) -> Path:
    out = work / "models" / name
    path = out / f"{name}.safetensors"
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "fixture", name, str(out),
                        "--single-file", "--overwrite"], check=True)
    return path


def _dataset(work: Path, resolution: int, n: int) -> Path:
    folder = work / "data" / f"{resolution}-{n}"
    if not folder.is_dir():
        make_images(resolution + resolution // 4, n, "cpu", folder)
    return folder


def _sets(model: Path, data: Path, out: Path, resolution: int, batch: int, steps: int,
          extra: list[str]) -> list[str]:
    values = [f"model.path={model}", f"data.resolution={resolution}", "data.bucket_step=32",
              f"train.batch_size={batch}", f"train.steps={steps}", "train.device=cpu",
              "network.rank=4", f"output.dir={out}", "output.overwrite=true",
              f"data.cache_dir={out / 'cache'}", *extra]
    return [a for v in values for a in ("--set", v)]


def check(work: Path, setting) -> dict:
    sid, fixture, resolution, batch, steps, n, extra = setting
    model = _fixture(work, fixture)
    data = _dataset(work, resolution, n)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    est = subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "lint", str(data),
                          "--estimate", "--json",
                          *_sets(model, data, work / "out" / f"{sid}-est", resolution, batch,
                                 steps, extra)],
                         capture_output=True, text=True, env=env)
    if est.returncode:
        raise SystemExit(f"{sid}: lint failed:\n{est.stderr[-3000:]}")
    estimate = json.loads(est.stdout)["estimate"]
    out = work / "out" / sid
    real = subprocess.run([sys.executable, "-c", RUN_TRAIN, "train", "--quiet", "--set",
                           f"data.dir={data}",
                           *_sets(model, data, out, resolution, batch, steps, extra)],
                          capture_output=True, text=True, env=env)
    line = [x for x in real.stderr.splitlines() if x.startswith("RESULT ")]
    if real.returncode or not line:
        raise SystemExit(f"{sid}: train failed:\n{real.stderr[-3000:]}")
    _, rc, seconds, cpu, peak = line[-1].split()
    if rc != "0":  # the command's own error: no figure to compare with
        raise SystemExit(f"{sid}: train exited with {rc}:\n{real.stderr[-3000:]}")
    return {"id": sid, "est_s": estimate["seconds"], "real_s": float(seconds),
            "est_cpu": estimate["cpu_seconds"], "real_cpu": float(cpu),
            "est_gib": estimate["peak_bytes"] / 2**30, "real_gib": int(peak) / 2**30,
            "probe_s": estimate["probe_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for fixtures, datasets and outputs")
    p.add_argument("--only", action="append", default=[], help="setting ids to run")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("| setting | CPU s est. / real | CPU error | wall s est. / real | wall error "
          "| peak GiB est. / real | memory error | probe wall s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for setting in SETTINGS:
        if args.only and setting[0] not in args.only:
            continue
        r = check(work, setting)  # each row as soon as it is measured
        ce = (r["est_cpu"] - r["real_cpu"]) / r["real_cpu"] * 100
        te = (r["est_s"] - r["real_s"]) / r["real_s"] * 100
        me = (r["est_gib"] - r["real_gib"]) / r["real_gib"] * 100
        print(f"| {r['id']} | {r['est_cpu']:.1f} / {r['real_cpu']:.1f} | {ce:+.0f} % | "
              f"{r['est_s']:.1f} / {r['real_s']:.1f} | {te:+.0f} % | "
              f"{r['est_gib']:.2f} / {r['real_gib']:.2f} | {me:+.0f} % | {r['probe_s']:.1f} |",
              flush=True)

if __name__ == "__main__":
    main()
