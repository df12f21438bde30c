"""Peak memory of merging two checkpoints: Tsuika's streamed merge beside a whole-file merge.

Writes two single-file checkpoints (the ``sd15-hostable`` fixture with two seeds, fp16; or
give ``--a`` / ``--b``), then merges them in a fresh process each way and reads the process's
peak resident memory (``VmHWM``) and its resident memory just before the merge (``VmRSS``,
Python + torch + the modules imported):

* ``tsuika``: ``tools.checkpoint_merge.merge_checkpoints`` (weighted sum 0.5, per-block
  string ``"0.5 te=0.3"``), streamed piece by piece;
* ``whole files``: the usual script: both files loaded whole (``safetensors.torch.load_file``),
  merged tensor by tensor into a third dict, saved with ``safetensors.torch.save_file``.

The target (issue 22): the merge's peak stays within 1.3x of one checkpoint's size. Printed
as the merge's own peak (peak minus the process's memory before it) and the whole process's
peak, each over the checkpoint's file size.

    python benchmarks/merge_memory.py [--a A.safetensors --b B.safetensors] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import replace_docs_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- merge-memory:begin -->", "<!-- merge-memory:end -->"

CHILD = r"""
import json, sys, time

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no " + field)

import torch
from safetensors.torch import load_file, save_file
from tsuika.trainers.tools.checkpoint_merge import merge_checkpoints

way, a, b, out = sys.argv[1:5]
before = status("VmRSS")
t0 = time.perf_counter()
if way == "tsuika":
    merge_checkpoints(a, b, out, ratios="0.5 te=0.3", overwrite=True)
else:
    ta, tb = load_file(a), load_file(b)
    merged = {}
    for k, v in ta.items():
        merged[k] = torch.lerp(v.float(), tb[k].float(), 0.5).to(v.dtype) \
            if v.is_floating_point() and k in tb else v
    save_file(merged, out)
seconds = time.perf_counter() - t0
print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": seconds}))
"""


def _run(way: str, a: Path, b: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, way, str(a), str(b), str(out)],
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{way} merge failed:\n{r.stderr[-3000:]}")
    out.unlink(missing_ok=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", help="checkpoint A (default: the sd15-hostable fixture, seed 0)")
    p.add_argument("--b", help="checkpoint B (default: the fixture, seed 1)")
    p.add_argument("--write-docs", action="store_true",
                   help="put the table into docs/BENCHMARKS.md between the merge-memory markers")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tsuika-merge-") as tmp:
        tmp = Path(tmp)
        if args.a and args.b:
            a, b = Path(args.a), Path(args.b)
        else:
            sys.path.insert(0, str(ROOT.parent))
            from tsuika.trainers.fixtures import write_fixture

            a = write_fixture("sd15-hostable", tmp / "a", seed=0, dtype="fp16",
                              single_file_only=True)["single_file"]
            b = write_fixture("sd15-hostable", tmp / "b", seed=1, dtype="fp16",
                              single_file_only=True)["single_file"]
        size = a.stat().st_size
        rows = []
        for way in ("tsuika", "whole files"):
            got = _run(way, a, b, tmp / "merged.safetensors")
            own = got["peak"] - got["before"]
            rows.append(f"| {way} | {size / 2**20:.0f} | {got['before'] / 2**20:.0f} | "
                        f"{got['peak'] / 2**20:.0f} | {own / 2**20:.0f} | {own / size:.2f}x | "
                        f"{got['peak'] / size:.2f}x | {got['seconds']:.1f} |")
            print(rows[-1], flush=True)
    cpu = platform.processor() or platform.machine()
    text = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} on this {os.cpu_count()}-core CPU ({cpu}), "
        f"checkpoints {a.name if args.a else 'sd15-hostable fixture (fp16), seeds 0 and 1'}; "
        "`python benchmarks/merge_memory.py`. Peak = the merging process's VmHWM; before = its "
        "VmRSS just before merging (Python, torch, the modules); the merge's own peak = peak - "
        "before.",
        "",
        "| merge | checkpoint MiB | before MiB | peak MiB | merge's own peak MiB | own / "
        "checkpoint | peak / checkpoint | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows])
    print(text)
    if args.write_docs:
        replace_docs_section(DOCS, BEGIN, END, text)


if __name__ == "__main__":
    main()
