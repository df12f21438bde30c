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
in ComfyUI's own venv); the test ``tests/test_real_host_server.py`` drives the same class.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- server-memory:begin -->", "<!-- server-memory:end -->"
CKPT = "sd15-hostable.safetensors"
DATASET = "examples/sample_data/heart"  # resolved inside the pack by the dataset node


def _harness(path: str | Path | None = None):
    """The shared real-host harness module (stdlib only; it lives beside the project)."""
    import importlib.util

    path = Path(path or ROOT.parent / "shared" / "tools" / "real_host.py")
    if not path.is_file():
        raise SystemExit(f"real_host.py not found at {path}; pass --harness PATH.")
    spec = importlib.util.spec_from_file_location("tsuika_real_host", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_models(folder: Path) -> Path:
    """``folder/checkpoints/sd15-hostable.safetensors`` (fp16) unless already there; ``folder``
    is a base directory's ``models``.

    Runs in a subprocess of the calling Python (which must import ``tsuika``), so the
    benchmark process itself stays small and stdlib-only."""
    import subprocess

    target = folder / "checkpoints" / CKPT
    if target.is_file():
        return folder
    code = ("import sys, shutil; from pathlib import Path; "
            "from tsuika.trainers.fixtures import write_fixture; "
            "p = write_fixture('sd15-hostable', Path(sys.argv[1]) / 'build', dtype='fp16', "
            "overwrite=True); (Path(sys.argv[1]) / 'checkpoints').mkdir(exist_ok=True); "
            "shutil.move(str(p['single_file']), sys.argv[2]); "
            "shutil.rmtree(Path(sys.argv[1]) / 'build')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    subprocess.run([sys.executable, "-c", code, str(folder), str(target)], check=True, env=env)
    return folder


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


def advanced_graph(object_info: dict, overrides: dict) -> dict:
    """Train LoRA (Advanced) with every widget at the default the server advertises, then
    ``overrides`` (input id -> value; ids this server's node does not have are ignored)."""
    info = object_info["TsuikaTrainLoRAAdvanced"]
    inputs: dict = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0]}
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            if name in inputs:
                continue
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if "default" in opts:
                inputs[name] = opts["default"]
            elif isinstance(kind, list) and kind:
                inputs[name] = kind[0]
            elif kind == "COMBO" and opts.get("options"):
                inputs[name] = opts["options"][0]
    inputs.update({k: v for k, v in overrides.items() if k in inputs})
    graph = train_graph(0)
    graph["3"] = {"class_type": "TsuikaTrainLoRAAdvanced", "inputs": inputs}
    return graph


def failing_graphs(object_info: dict, seed: int) -> dict[str, dict]:
    """Trainings that pass /prompt validation and fail once they run.

    ``adamw8bit`` on a CPU server fails when the optimizer is built: after the model was
    copied, the adapters attached to the copy and the latents cached — the deepest point a
    bad input reaches. ``resume`` with a name that has no saved state fails before any work."""
    small = {"steps": 2, "train_steps": 2, "rank": 4, "resolution": 64, "train_seed": seed,
             "seed": seed, "save_every": 0, "every": 0, "prompts": ""}
    return {
        "failed: adamw8bit on CPU": advanced_graph(object_info, {
            **small, "optimizer": "adamw8bit", "name": f"mem_fail_{seed}"}),
        "failed: resume, no state": advanced_graph(object_info, {
            **small, "resume": True, "name": f"mem_never_trained_{seed}"}),
    }


# ------------------------------------------------------------------------------- server

@dataclass
class Outcome:
    label: str
    status: str  # success | error | interrupted | rejected | timeout
    seconds: float
    rss_mib: float
    ram_free_mib: float | None
    message: str = ""
    outputs: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    peak_mib: float = 0.0


class ComfySession:
    """A real ComfyUI server with the pack linked in, driven through its HTTP API."""

    def __init__(self, comfy: str, python: str, base: Path, threads: int = 1,
                 harness: str | None = None, timeout: float = 600, probe: bool = False):
        self.rh = _harness(harness)
        self.comfy, self.timeout, self.threads = os.path.abspath(comfy), timeout, threads
        # A base directory of its own (custom_nodes, models, output): the pack is linked
        # there, never into the checkout other servers on this machine share.
        self.base = Path(base).resolve()
        link = self.base / "custom_nodes" / "tsuika"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(ROOT, link, target_is_directory=True)
        if probe:  # the measuring route, a custom node of this base directory only
            shutil.copyfile(ROOT / "benchmarks" / "_server_probe.py",
                            link.parent / "tsuika_probe.py")
        self.output_dir = self.base / "output"
        self.args = argparse.Namespace(
            comfy=self.comfy, python=python, port=0, output_dir=str(self.output_dir),
            input_dir=None, models=None, comfy_arg=[f"--base-directory={self.base}"],
            allow_network=False, startup_timeout=300)
        self.server = None
        self.object_info: dict = {}

    def __enter__(self):
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        os.environ.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        try:
            self.server = self.rh.Server(self.args)
            if not self.server.start():
                tail = self.rh.read_from(self.server.log_path, 0)[-4000:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"ComfyUI did not start:\n{tail}")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        st, self.object_info = self.rh.http("GET", self.server.base + "/object_info", timeout=120)
        missing = {"TsuikaTrainLoRA", "TsuikaTrainLoRAAdvanced", "TsuikaLoadDataset"} - set(
            self.object_info if st == 200 else {})
        if missing:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the pack did not register {sorted(missing)}:\n"
                               + self.rh.read_from(self.server.log_path, 0)[-4000:])
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()
            shutil.rmtree(self.server.tmp, ignore_errors=True)
            self.server = None

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def log_text(self, offset: int = 0) -> str:
        return self.rh.read_from(self.server.log_path, offset)

    def rss_mib(self) -> float:
        """Resident memory of the server process now (VmRSS), in MiB."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def ram_free_mib(self) -> float | None:
        st, stats = self.rh.http("GET", self.server.base + "/system_stats")
        if st != 200 or not isinstance(stats, dict):
            return None
        free = (stats.get("system") or {}).get("ram_free")
        return None if free is None else free / 2**20

    def peak_mib(self) -> float:
        """Highest resident memory of the server process so far (VmHWM), in MiB."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM line")

    def probe_now(self) -> dict:
        """What the probe custom node sees now (no collection first); empty without it."""
        st, body = self.rh.http("GET", self.server.base + "/tsuika_probe?collect=0",
                                timeout=120)
        return body["now"] if st == 200 and isinstance(body, dict) else {}

    def probe(self, after_ms: float = 0, wait: float = 15.0) -> dict:
        """What the probe custom node saw when ComfyUI's worker collected garbage after the
        prompt that ended at ``after_ms`` (what that prompt left behind); the state now when
        the worker has not collected within ``wait`` seconds. Empty without the probe."""
        t0 = time.time()
        while True:
            st, body = self.rh.http("GET", self.server.base + "/tsuika_probe?collect=0",
                                    timeout=120)
            if st != 200 or not isinstance(body, dict):
                return {}
            before = body.get("before_host_gc") or {}
            if before.get("time", 0) * 1000 >= after_ms:
                return dict(before, when="before ComfyUI's collection")
            if time.time() - t0 > wait:
                return dict(body["now"], when="now (no collection by ComfyUI yet)")
            time.sleep(0.5)

    def queue(self, label: str, graph: dict, interrupt_when: str | None = None,
              interrupt_after: float = 2.0) -> Outcome:
        """Post ``graph``, wait for its history entry, measure. With ``interrupt_when``, POST
        /interrupt ``interrupt_after`` seconds after that text appears in the server log."""
        base, offset, t0 = self.server.base, self.rh.file_size(self.server.log_path), time.time()
        st, body = self.rh.http("POST", base + "/prompt", {"prompt": graph,
                                                           "client_id": "server-memory"})
        if st != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            return Outcome(label, "rejected", time.time() - t0, self.rss_mib(),
                           self.ram_free_mib(), json.dumps(body)[:600], peak_mib=self.peak_mib())
        pid, sent = body["prompt_id"], None
        entry = None
        while time.time() - t0 < self.timeout:
            if self.server.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died (exit {self.server.proc.returncode}) during "
                                   f"{label}:\n{self.log_text()[-4000:]}")
            if interrupt_when and sent is None and (interrupt_when in self.log_text(offset)
                                                    or time.time() - t0 > 300):
                sent = time.time() + interrupt_after
            if sent is not None and time.time() >= sent:
                self.rh.http("POST", base + "/interrupt", {"prompt_id": pid})
                sent, interrupt_when = float("inf"), None
            st, hist = self.rh.http("GET", base + "/history/" + pid)
            if st == 200 and isinstance(hist, dict) and pid in hist:
                entry = hist[pid]
                break
            time.sleep(0.25)
        seconds = time.time() - t0
        if entry is None:
            self.rh.http("POST", base + "/interrupt", {"prompt_id": pid})
            return Outcome(label, "timeout", seconds, self.rss_mib(), self.ram_free_mib(),
                           peak_mib=self.peak_mib())
        status, message, end_ms = "error", "", 0
        st = entry.get("status") or {}
        if st.get("status_str") == "success":
            status = "success"
        for ev, data in st.get("messages") or []:
            end_ms = max(end_ms, data.get("timestamp", 0))
            if ev == "execution_error":
                message = f"{data.get('exception_type')}: {data.get('exception_message')}"
            elif ev == "execution_interrupted":
                status = "interrupted"
        probe = self.probe(end_ms)  # first: it waits for ComfyUI's own collection
        return Outcome(label, status, seconds, self.rss_mib(), self.ram_free_mib(),
                       message.strip(), entry.get("outputs") or {}, probe, self.peak_mib())


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
        fig.update(rng_states=len(rngs), threads=threads)
        lines += ["", ("Server RSS is read once ComfyUI has collected garbage after the prompt; "
                       "\"left behind\" is what was alive just before that collection (the "
                       "probe in `benchmarks/_server_probe.py`): live tensor memory "
                       f"{min(left):.0f}-{max(left):.0f} MiB (the checkpoint ComfyUI caches), "
                       f"at most {fig['left_peft_modules_max']} adapter (peft) modules; "
                       f"torch's global RNG state after every prompt: {rng}; server threads "
                       f"{'-'.join(str(t) for t in threads)}.")]
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
    doc = DOCS.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOCS} has no {BEGIN} ... {END} section to replace.")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = DOCS.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")
    tmp.replace(DOCS)


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
