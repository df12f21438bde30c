"""A real ComfyUI server with this pack, driven through its HTTP API, measured from outside.

What ``server_memory.py`` and ``tests/test_real_host_server.py`` share. It starts the server
through ``../shared/tools/real_host.py`` (stdlib only; CPU, loopback) with a base directory of
its own, so the pack is linked into that directory's ``custom_nodes`` and never into the
checkout other servers on the machine share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CKPT = "sd15-hostable.safetensors"


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


def write_models(folder: Path, fixture: str = "sd15-hostable") -> Path:
    """``folder/checkpoints/<fixture>.safetensors`` (fp16) unless already there; ``folder``
    is a base directory's ``models``; ``fixture`` a ``tsuika fixture`` name.

    Runs in a subprocess of the calling Python (which must import ``tsuika``), so the
    benchmark process itself stays small and stdlib-only."""
    import subprocess

    target = folder / "checkpoints" / f"{fixture}.safetensors"
    if target.is_file():
        return folder
    code = ("import sys, shutil; from pathlib import Path; "
            "from tsuika.trainers.fixtures import write_fixture; "
            "p = write_fixture(sys.argv[3], Path(sys.argv[1]) / 'build', dtype='fp16', "
            "overwrite=True); (Path(sys.argv[1]) / 'checkpoints').mkdir(exist_ok=True); "
            "shutil.move(str(p['single_file']), sys.argv[2]); "
            "shutil.rmtree(Path(sys.argv[1]) / 'build')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    subprocess.run([sys.executable, "-c", code, str(folder), str(target), fixture], check=True,
                   env=env)
    return folder


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
