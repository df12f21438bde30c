"""A long-lived ComfyUI server: a failed and a cancelled training leave it as they found it.

Two real servers (``benchmarks/_comfy_server.py``'s session, CPU, loopback, each with a base
directory of its own): a fresh one trains once; the other first runs a training that fails
after the model was copied and the adapters attached, then one cancelled while it trains, then
the same training as the fresh server. The LoRA must be the same tensors, bit for bit, and
nothing of the failed or cancelled run may stay alive in the server (a measuring route sees
no adapter module and no more live tensor memory than after a good run).

Runs when COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON at its venv's python,
default <COMFYUI_DIR>/../comfy-venv/bin/python); skipped, visibly, otherwise.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "tools" / "real_host.py"
COMFY = os.environ.get("COMFYUI_DIR")

pytestmark = pytest.mark.skipif(
    not COMFY or not HARNESS.is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout (and have ../shared/tools/real_host.py)")

SEED = 7
# More than the 20 MiB a rank-4 LoRA and its patched model clone take; far less than the
# ~600 MiB model copy a failed run used to keep alive.
LIVE_TOLERANCE_MIB = 64


def _bench():
    spec = importlib.util.spec_from_file_location(
        "tsuika_server_memory", ROOT / "benchmarks" / "server_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def models(tmp_path_factory, bench):
    return bench.write_models(tmp_path_factory.mktemp("shared_models") / "models")


def _session(bench, models, base: Path):
    base.mkdir(parents=True)
    os.symlink(models, base / "models", target_is_directory=True)
    python = os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))
    return bench.ComfySession(COMFY, python, base, threads=1, probe=True, timeout=900)


def _final_loras(session) -> set[Path]:
    return {p for p in session.output_dir.glob("tsuika/*/run_*/*.safetensors")
            if "-step" not in p.name}


def _train(session, bench, label: str) -> tuple[object, Path]:
    before = _final_loras(session)
    outcome = session.queue(label, bench.train_graph(seed=SEED))
    assert outcome.status == "success", (outcome, session.log_text()[-4000:])
    new = _final_loras(session) - before
    assert len(new) == 1, new
    return outcome, new.pop()


def test_failed_and_cancelled_trainings_leave_the_server_as_found(bench, models, tmp_path):
    from safetensors.torch import load_file

    with _session(bench, models, tmp_path / "fresh") as fresh:
        good, fresh_lora = _train(fresh, bench, "fresh server")
    fresh_tensors = load_file(fresh_lora)

    with _session(bench, models, tmp_path / "used") as used:
        found = used.probe_now()
        failed = used.queue("failed", bench.failing_graphs(used.object_info, SEED)[
            "failed: adamw8bit on CPU"])
        assert failed.status == "error" and "adamw8bit" in failed.message, failed
        cancelled = used.queue("cancelled", bench.train_graph(seed=SEED, steps=100000),
                               interrupt_when="images used")
        assert cancelled.status in ("error", "interrupted"), cancelled
        assert "step" in used.log_text(), "the cancelled run never reached training"
        after, used_lora = _train(used, bench, "after the failure and the cancel")
    used_tensors = load_file(used_lora)

    assert sorted(used_tensors) == sorted(fresh_tensors)
    different = [k for k in fresh_tensors if not fresh_tensors[k].equal(used_tensors[k])]
    assert not different, f"{len(different)} tensors differ from a fresh server's, e.g. " \
                          f"{different[:3]}"
    # Nothing of the failed or cancelled run is alive, before any garbage collection of ours.
    for o in (failed, cancelled):
        assert o.probe, "the measuring route did not answer"
        assert o.probe["peft_modules"] == 0, (o.label, o.probe)
        assert o.probe["tensor_mib"] <= after.probe["tensor_mib"] + LIVE_TOLERANCE_MIB, (
            o.label, o.probe, after.probe)
    assert after.probe["tensor_mib"] <= good.probe["tensor_mib"] + LIVE_TOLERANCE_MIB
    # torch's global RNG (each server process starts from its own) and the thread count are
    # what this server had before the failed and the cancelled run.
    assert after.probe["rng_sha"] == found["rng_sha"]
    assert after.probe["threads"] <= max(found["threads"], good.probe["threads"])
