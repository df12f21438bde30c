"""One ComfyUI server, many trainings: does its memory grow? (issue 17, long-lived servers)

Starts a real ComfyUI (CPU, loopback only, through ``../shared/tools/real_host.py``'s server
class) with this pack linked into ``custom_nodes``, writes the hostable SD1.5 fixture
checkpoint, and queues short trainings one after another through ``/prompt`` — each with its
own training seed, so none is served from ComfyUI's cache — with failed trainings (a bad input
that only fails once the run has started) and a cancelled one (``/interrupt`` while it trains)
in the sequence. After every prompt it reads the server process's resident memory
(``/proc/PID/status`` VmRSS) and ComfyUI's own ``/system_stats``, prints a table and the growth
of the successful trainings (last minus after-first, and a least-squares slope per run), and
checks that every training after a failure or a cancel still succeeds.

    python benchmarks/server_memory.py --comfy /work/comfy --python /work/comfy-venv/bin/python

``--write-docs`` replaces the section between the ``server-memory`` markers in
docs/BENCHMARKS.md with the table and the command. Stdlib only on this side (the server runs
in ComfyUI's own venv); the test ``tests/test_real_host_server.py`` drives the same session
(``_comfy_server.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import replace_docs_section  # noqa: E402
from _comfy_server import CKPT, ROOT, ComfySession, Outcome, write_models  # noqa: E402

DOCS = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- server-memory:begin -->", "<!-- server-memory:end -->"
DATASET = "examples/sample_data/heart"  # resolved inside the pack by the dataset node


# ------------------------------------------------------------------------------- graphs

def train_graph(seed: int, steps: int = 2, resolution: int = 64, rank: int = 4) -> dict:
    """Load Checkpoint -> Load Dataset -> Train LoRA (Simple) -> Preview of its samples."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "TsuikaLoadDataset",
              "inputs": {"folder": DATASET, "caption_extension": ".txt"}},
        "3": {"class_type": "TsuikaTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
            "steps": steps, "learning_rate": 1e-3, "rank": rank, "trigger_word": "",
            "training_seed": seed, "resolution": resolution, "sample_every": 0}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 4]}},
    }


def _defaults(object_info: dict, node: str, skip: set) -> dict:
    """Every widget of ``node`` at the default the server advertises (linked inputs skipped)."""
    inputs: dict = {}
    for section in ("required", "optional"):
        for name, spec in (object_info[node].get("input", {}).get(section) or {}).items():
            if name in skip:
                continue
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if "default" in opts:
                inputs[name] = opts["default"]
            elif isinstance(kind, list) and kind:
                inputs[name] = kind[0]
            elif kind == "COMBO" and opts.get("options"):
                inputs[name] = opts["options"][0]
    return inputs


def advanced_graph(object_info: dict, overrides: dict, options: dict | None = None) -> dict:
    """Train LoRA (Advanced) with every widget at the default the server advertises, then
    ``overrides`` (input id -> value; ids this server's node does not have are ignored);
    ``options`` (a Tsuika options node id -> its widget overrides) are chained into it."""
    linked = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0]}
    inputs = dict(linked, **_defaults(object_info, "TsuikaTrainLoRAAdvanced",
                                      set(linked) | {"options"}))
    inputs.update({k: v for k, v in overrides.items() if k in inputs})
    graph = train_graph(0)
    previous = None
    for i, (node, values) in enumerate((options or {}).items()):
        widgets = _defaults(object_info, node, {"options"})
        widgets.update({k: v for k, v in values.items() if k in widgets})
        if previous is not None:
            widgets["options"] = [previous, 0]
        previous = f"o{i}"
        graph[previous] = {"class_type": node, "inputs": widgets}
    if previous is not None:
        inputs["options"] = [previous, 0]
    graph["3"] = {"class_type": "TsuikaTrainLoRAAdvanced", "inputs": inputs}
    return graph


def failing_graphs(object_info: dict, seed: int) -> dict[str, dict]:
    """Trainings that pass /prompt validation and fail once they run.

    ``adamw8bit`` on a CPU server fails when the optimizer is built: after the model was
    copied, the adapters attached to the copy and the latents cached — the deepest point a
    bad input reaches. ``resume`` with a name that has no saved state is refused when queued
    (so it is no run-time failure any more)."""
    small = {"steps": 2, "train_steps": 2, "rank": 4, "resolution": 64, "training_seed": seed,
             "sample_every": 0}
    return {
        "failed: adamw8bit on CPU": advanced_graph(
            object_info, {**small, "name": f"mem_fail_{seed}"},
            {"TsuikaTrainingOptions": {"optimizer": "adamw8bit"},
             "TsuikaSavingOptions": {"name": f"mem_fail_{seed}", "save_every": 0}}),
    }


# ------------------------------------------------------------------------------ the run

def plan(n: int, object_info: dict) -> list[tuple[str, dict, str | None]]:
    """(label, graph, interrupt marker): N trainings, failures after the first quarter, the
    cancel after the half, every later training checking the server still trains."""
    fail_at, cancel_at = max(1, n // 4), max(1, n // 2)
    steps = []
    for i in range(n):
        steps.append((f"train seed {i}", train_graph(seed=1000 + i), None))
        if i + 1 == fail_at:
            steps += [(label, g, None) for label, g in failing_graphs(object_info, i).items()]
        if i + 1 == cancel_at:
            # "images used" is the loop's own message once data is ready, just before step 1.
            steps.append(("cancelled while training", train_graph(seed=5000 + i,
                                                                  steps=100000), "images used"))
    return steps


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0, 1, 2, ... (per run)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum(
        (i - mx) ** 2 for i in range(n))


def summarize(outcomes: list[Outcome], command: str, startup_rss: float) -> tuple[str, dict]:
    trains = [o for o in outcomes if o.label.startswith("train seed")]
    rss = [o.rss_mib for o in trains]
    left = [o.probe.get("tensor_mib") for o in outcomes if o.probe]
    fig = {"runs": len(trains), "startup_mib": startup_rss, "after_first_mib": rss[0],
           "last_mib": rss[-1], "growth_mib": rss[-1] - rss[0], "max_mib": max(rss),
           "slope_mib_per_run": slope(rss[1:]), "peak_mib": max(o.peak_mib for o in outcomes),
           "left_tensor_mib_range": [min(left), max(left)] if left else None,
           "left_peft_modules_max": max((o.probe.get("peft_modules", 0) for o in outcomes
                                         if o.probe), default=None)}
    lines = [f"Command: `{command}`", "",
             ("| # | prompt | outcome | seconds | server RSS MiB | peak RSS so far MiB | "
              "left behind: live tensors MiB | torch modules (peft) | threads |"),
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             (f"| 0 | (server started, nothing queued) | - | - | {startup_rss:.0f} | - | - | - "
              "| - |")]
    for i, o in enumerate(outcomes, 1):
        pr = o.probe
        live = f"{pr['tensor_mib']:.0f}" if pr else "-"
        mods = f"{pr['modules']} ({pr['peft_modules']})" if pr else "-"
        lines.append(f"| {i} | {o.label} | {o.status} | {o.seconds:.1f} | {o.rss_mib:.0f} | "
                     f"{o.peak_mib:.0f} | {live} | {mods} | {pr.get('threads', '-')} |")
    lines += ["", (f"Successful trainings: {fig['runs']}; server RSS after the first "
                   f"{fig['after_first_mib']:.0f} MiB, after the last {fig['last_mib']:.0f} "
                   f"MiB: growth **{fig['growth_mib']:+.0f} MiB**, least-squares slope "
                   f"**{fig['slope_mib_per_run']:+.1f} MiB per training** (runs "
                   f"2..{fig['runs']}), highest after a prompt {fig['max_mib']:.0f} MiB, peak "
                   f"while training {fig['peak_mib']:.0f} MiB.")]
    if left:
        rngs = {o.probe.get("rng_sha") for o in outcomes if o.probe}
        rng = "the same" if len(rngs) == 1 else f"{len(rngs)} different states"
        threads = sorted({o.probe.get("threads") for o in outcomes if o.probe})
        objs = [o.probe["gc_objects"] for o in outcomes if o.probe]
        fig.update(rng_states=len(rngs), threads=threads, gc_objects=[objs[0], objs[-1]])
        lines += ["", ("Server RSS is read once ComfyUI has collected garbage after the prompt; "
                       "\"left behind\" is what was alive just before that collection (the "
                       "probe in `benchmarks/_server_probe.py`): live tensor memory "
                       f"{min(left):.0f}-{max(left):.0f} MiB (the checkpoint ComfyUI caches), "
                       f"at most {fig['left_peft_modules_max']} adapter (peft) modules; "
                       f"torch's global RNG state after every prompt: {rng}; server threads "
                       f"{'-'.join(str(t) for t in threads)}; objects the Python collector "
                       f"tracks {objs[0]} after the first prompt, {objs[-1]} after the last "
                       f"({(objs[-1] - objs[0]) / max(1, len(objs) - 1):+.0f} per prompt).")]
    return "\n".join(lines), fig


def check(outcomes: list[Outcome]) -> list[str]:
    """What went wrong beyond memory: a training that failed, a failure that did not fail."""
    problems = []
    for o in outcomes:
        if o.label.startswith("train seed") and o.status != "success":
            problems.append(f"{o.label}: {o.status} {o.message}")
        elif o.label.startswith("failed") and o.status not in ("error", "rejected"):
            problems.append(f"{o.label}: expected a failure, got {o.status}")
        elif o.label.startswith("cancelled") and o.status == "success":
            problems.append(f"{o.label}: the interrupt was not honoured")
    return problems


def write_docs(text: str) -> None:
    replace_docs_section(DOCS, BEGIN, END, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout")
    p.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON"),
                   help="python of ComfyUI's venv (default: <comfy>/../comfy-venv/bin/python)")
    p.add_argument("--runs", type=int, default=20, help="successful trainings to queue")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the server")
    p.add_argument("--work", help="keep models and outputs here (default: a temp folder)")
    p.add_argument("--harness", help="path of real_host.py (default: ../shared/tools)")
    p.add_argument("--no-probe", action="store_true",
                   help="do not install the measuring route (RSS only)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if not a.comfy:
        p.error("--comfy (or COMFYUI_DIR) is required")
    a.python = a.python or str(Path(a.comfy).resolve().parent / "comfy-venv" / "bin" / "python")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="tsuika_server_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    try:
        write_models(work / "base" / "models")
        with ComfySession(a.comfy, a.python, work / "base", a.threads, a.harness,
                          probe=not a.no_probe) as s:
            startup = s.rss_mib()
            print(f"server pid {s.pid}, RSS at start {startup:.0f} MiB", flush=True)
            for label, graph, marker in plan(a.runs, s.object_info):
                o = s.queue(label, graph, interrupt_when=marker)
                pr = o.probe
                print(f"{len(outcomes) + 1:3d} {label:28s} {o.status:11s} {o.seconds:6.1f}s "
                      f"RSS {o.rss_mib:5.0f} peak {o.peak_mib:5.0f} MiB; left: tensors "
                      f"{pr.get('tensor_mib', 0):4.0f} MiB, modules {pr.get('modules')} peft "
                      f"{pr.get('peft_modules')} threads {pr.get('threads')} "
                      f"({pr.get('when')}) {o.message[:70]}", flush=True)
                outcomes.append(o)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    shown = [x for i, x in enumerate(argv) if x != "--write-docs" and x != "--json"
             and not x.startswith("--json=") and (i == 0 or argv[i - 1] != "--json")]
    text, fig = summarize(outcomes, "python benchmarks/server_memory.py " + " ".join(shown),
                          startup)
    print(text)
    problems = check(outcomes)
    for line in problems:
        print("PROBLEM:", line)
    if a.json:
        Path(a.json).write_text(json.dumps({"figure": fig, "outcomes": [
            {k: v for k, v in vars(o).items() if k != "outputs"} for o in outcomes]},
            indent=2))
    if a.write_docs:
        write_docs(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
