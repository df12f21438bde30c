"""Memory of the train-then-generate graph in ComfyUI against the same graph without training.

Two fresh ComfyUI servers (CPU, loopback, through ``_comfy_server.ComfySession``), one graph
each, on a hostable fixture checkpoint (``sd15-hostable`` or ``sdxl-hostable``, fp16 on disk):

- generate: Load Checkpoint -> CLIP Text Encode -> KSampler -> VAE Decode -> Save Image;
- train then generate: the same, with Train LoRA (Simple) between Load Checkpoint and the
  encode / sampler (its MODEL and CLIP outputs are used).

The figure is each server process's peak resident memory (``/proc/PID/status`` VmHWM) and
their ratio (target: at most 1.2x). ``--cli`` adds the same training run by ``tsuika train``
alone (the calling Python, which must import ``tsuika``; its peak from ``wait4``).

    python benchmarks/graph_memory.py --comfy /work/comfy --python /work/comfy-venv/bin/python \\
        --fixture sdxl-hostable --steps 20 --resolution 64

``--write-docs`` replaces the section between the ``graph-memory-<fixture>`` markers in
docs/BENCHMARKS.md. Stdlib only on this side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import replace_docs_section  # noqa: E402
from _comfy_server import ROOT, ComfySession, write_models  # noqa: E402

DOCS = ROOT / "docs" / "BENCHMARKS.md"
DATASET = "examples/sample_data/heart"  # resolved inside the pack by the dataset node


def graph(ckpt: str, train: bool, steps: int, resolution: int) -> dict:
    """The generate graph, with Train LoRA feeding the sampler and the encoder if ``train``."""
    model, clip = ["1", 0], ["1", 1]
    g: dict = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if train:
        g["2"] = {"class_type": "TsuikaLoadDataset",
                  "inputs": {"folder": DATASET, "caption_extension": ".txt"}}
        inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
                  "steps": steps, "learning_rate": 1e-4, "rank": 4, "trigger_word": "",
                  "training_seed": 0, "resolution": resolution, "sample_every": 0}
        g["3"] = {"class_type": "TsuikaTrainLoRA", "inputs": inputs}
        model, clip = ["3", 0], ["3", 1]
    g.update({
        "4": {"class_type": "CLIPTextEncode",
              "inputs": {"clip": clip, "text": "a red heart on a gray background"}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": resolution, "height": resolution, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 0, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage",
              "inputs": {"images": ["7", 0], "filename_prefix": "graph_memory"}},
    })
    return g


def cli_peak_mib(checkpoint: Path, out: Path, steps: int, resolution: int,
                 threads: int) -> float:
    """Peak resident MiB of ``tsuika train`` doing what the train graph's node does (Train
    LoRA (Simple): its widgets as ``graph`` sets them, every other option at its default)."""
    import subprocess

    sets = {"model.path": checkpoint, "data.dir": ROOT / DATASET, "output.dir": out,
            "train.steps": steps, "train.learning_rate": 1e-4, "network.rank": 4,
            "train.seed": 0, "data.resolution": resolution, "sample.every": 0}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]
                                          ).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "tsuika.trainers.cli", "train",
           *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4: this child's own high-water mark (RUSAGE_CHILDREN would fold in the fixture
    # writer's); ru_maxrss is in KiB on Linux.
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if status != 0:
        raise SystemExit(f"tsuika train failed ({status}):\n{err[-3000:]}")
    return usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout")
    p.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON"),
                   help="python of ComfyUI's venv (default: <comfy>/../comfy-venv/bin/python)")
    p.add_argument("--fixture", default="sdxl-hostable", help="sd15-hostable or sdxl-hostable")
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the server")
    p.add_argument("--work", help="keep models and outputs here (default: a temp folder)")
    p.add_argument("--harness", help="path of real_host.py (default: ../shared/tools)")
    p.add_argument("--cli", action="store_true",
                   help="also measure the same training by `tsuika train` alone")
    p.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if not a.comfy:
        p.error("--comfy (or COMFYUI_DIR) is required")
    a.python = a.python or str(Path(a.comfy).resolve().parent / "comfy-venv" / "bin" / "python")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="tsuika_graph_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    peaks: dict[str, float] = {}
    try:
        models = write_models(work / "models", a.fixture)
        for label, train in (("generate", False), ("train then generate", True)):
            base = work / ("base_train" if train else "base_generate")
            shutil.rmtree(base, ignore_errors=True)
            (base / "models").mkdir(parents=True)
            os.symlink(models / "checkpoints", base / "models" / "checkpoints")
            with ComfySession(a.comfy, a.python, base, a.threads, a.harness, timeout=3600) as s:
                start = s.rss_mib()
                o = s.queue(label, graph(f"{a.fixture}.safetensors", train, a.steps,
                                         a.resolution))
                if o.status != "success":
                    raise SystemExit(f"{label}: {o.status} {o.message}\n{s.log_text()[-3000:]}")
                peaks[label] = o.peak_mib
                print(f"{label:22s} {o.seconds:7.1f}s  server RSS at start {start:6.0f} MiB, "
                      f"peak {o.peak_mib:6.0f} MiB", flush=True)
        if a.cli:
            shutil.rmtree(work / "cli_out", ignore_errors=True)  # a fresh run, not a resume
            peaks["cli"] = cli_peak_mib(models / "checkpoints" / f"{a.fixture}.safetensors",
                                        work / "cli_out", a.steps, a.resolution, a.threads)
            print(f"{'tsuika train alone':22s} peak {peaks['cli']:6.0f} MiB", flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    ratio = peaks["train then generate"] / peaks["generate"]
    shown = " ".join(x for x in argv if x != "--write-docs")
    text = (f"Command: `python benchmarks/graph_memory.py {shown}`\n\n"
            "| graph | server peak RSS MiB |\n| --- | ---: |\n"
            f"| generate | {peaks['generate']:.0f} |\n"
            f"| train then generate ({a.steps} steps, {a.resolution} px) | "
            f"{peaks['train then generate']:.0f} |\n"
            + (f"| `tsuika train` alone, the same run (process peak) | {peaks['cli']:.0f} |\n"
               if "cli" in peaks else "") + "\n"
            f"Ratio: **{ratio:.2f}x** (target: at most 1.2x).")
    print(text)
    if a.write_docs:
        tag = f"graph-memory-{a.fixture}"
        replace_docs_section(DOCS, f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
