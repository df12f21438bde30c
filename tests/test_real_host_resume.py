"""Resume on a train node in a real ComfyUI server when the newest saved state is damaged:
the node resumes from the newest sound one, says which it passed over and why, and deletes
nothing. Two server runs on one output folder, the state damaged between them.

Runs when COMFYUI_DIR points at a ComfyUI checkout (see tests/test_real_host.py); skipped,
visibly, otherwise.
"""

import json

import pytest
from test_real_host import COMFY, HARNESS, _run, host_models  # noqa: F401

pytestmark = pytest.mark.skipif(
    not COMFY or not HARNESS.is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout (and have ../shared/tools/real_host.py)")

NAME = "tsuika_resume_test"


def _workflow(steps: int, resume: bool) -> dict:
    """Train LoRA Advanced saving a state every step (Saving Options), its samples previewed
    (an output node, so ComfyUI runs the train node)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "sd15-hostable.safetensors"}},
        "2": {"class_type": "TsuikaLoadDataset",
              "inputs": {"folder": "examples/sample_data/heart", "caption_extension": ".txt"}},
        "3": {"class_type": "TsuikaTrainLoRAAdvanced", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
            "steps": steps, "learning_rate": 1e-4, "rank": 4, "trigger_word": "",
            "training_seed": 0, "resolution": 64, "sample_every": 0, "lr_warmup_steps": 0,
            "resume": resume, "options": ["4", 0]}},
        "4": {"class_type": "TsuikaSavingOptions",
              "inputs": {"name": NAME, "save_every": 1}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 4]}},
    }


def test_resume_passes_over_a_damaged_newest_state_and_says_so(host_models, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    first, second = tmp_path / "train.json", tmp_path / "resume.json"
    first.write_text(json.dumps(_workflow(2, False)))
    second.write_text(json.dumps(_workflow(3, True)))
    r = _run(["--models", str(host_models), "--output-dir", str(out), str(first)])
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, (r.stdout + r.stderr)[-6000:]
    runs = list(out.glob(f"tsuika/{NAME}/run_*"))
    assert len(runs) == 1, runs
    states = runs[0] / "states"
    assert sorted(p.name for p in states.iterdir()) == ["step_00000001", "step_00000002"]
    damaged = states / "step_00000002" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a cut-off copy
    cut = damaged.read_bytes()

    report = tmp_path / "report.json"
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--report", str(report),
              "--show-log", str(second)])
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
    shown = json.loads(report.read_text())["workflows"][0]["raw_outputs"]["3"]
    text = shown["tsuika_report"][0]
    assert text.startswith("trained 3 steps, loss "), text
    run = runs[0].name
    assert f"resumed from {run}/step_00000001" in text, text
    assert (f"skipped state {run}/step_00000002: trainable.safetensors is damaged" in text
            and "(kept as it is)" in text), text
    assert str(out) not in text.split("resumed from", 1)[1], text  # named within the training
    assert shown["tsuika_level"] == ["warning"]
    assert f"resumed from {states / 'step_00000001'} at step 1" in log, log[-4000:]  # the loop
    assert damaged.read_bytes() == cut  # the damaged state is the user's: kept as it was
    assert len(list(out.glob(f"tsuika/{NAME}/run_*"))) == 2  # the resumed run has its own


def _lora_workflow(node: str, steps: int, resume: bool, network: dict | None) -> dict:
    """Train LoRA (Simple, or Advanced with a Network Options node giving ``network``) under
    its default name, its samples previewed."""
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
              "steps": steps, "learning_rate": 1e-4, "rank": 4, "trigger_word": "",
              "training_seed": 0, "resolution": 64, "sample_every": 0, "resume": resume}
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "sd15-hostable.safetensors"}},
        "2": {"class_type": "TsuikaLoadDataset",
              "inputs": {"folder": "examples/sample_data/heart", "caption_extension": ".txt"}},
        "3": {"class_type": node, "inputs": inputs},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 4]}},
    }
    if network is not None:
        inputs.update(lr_warmup_steps=0, options=["4", 0])
        graph["4"] = {"class_type": "TsuikaNetworkOptions", "inputs": network}
    return graph


def test_a_plain_lora_state_resumes_on_the_simple_node_after_the_locon_default(
        host_models, tmp_path):  # noqa: F811
    """A state trained as plain LoRA (what the Simple node trained before its default became
    LoCon; here a Network Options node says algorithm = lora, alpha 0 = auto) resumed by the
    Simple node with no options: the node keeps the trained network and says so, the run
    continues from the state's step with tensors of the same shapes; the Advanced node with
    a Network Options node saying locon is refused, naming that node's widget to change."""
    from tsuika.trainers.formats.safetensors_io import load_safetensors

    out, report = tmp_path / "out", tmp_path / "report.json"
    flows = {"train.json": _lora_workflow("TsuikaTrainLoRAAdvanced", 2, False,
                                          {"algorithm": "lora", "alpha": 0}),
             "resume.json": _lora_workflow("TsuikaTrainLoRA", 3, True, None),
             "refused.json": _lora_workflow("TsuikaTrainLoRAAdvanced", 3, True,
                                            {"algorithm": "locon", "conv_rank": 4})}
    for name, flow in flows.items():
        (tmp_path / name).write_text(json.dumps(flow))
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--report", str(report),
              "--strict-lora", "--show-log", *(str(tmp_path / name) for name in flows),
              "--expect-fail", "refused.json"])  # last: it takes every name after it
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
    assert [w["status"] for w in json.loads(report.read_text())["workflows"]] == [
        "success", "success", "error"], log[-6000:]
    first, second = sorted(out.glob("tsuika/tsuika_lora/run_*"))[:2]
    state = first / "states" / "step_00000002"
    results = json.loads(report.read_text())["workflows"]
    text = results[1]["raw_outputs"]["3"]["tsuika_report"][0]
    assert text.startswith("trained 3 steps, loss "), text
    assert f"resumed from {first.name}/step_00000002" in text, text
    assert ("resuming a LoRA state: network kept as it was trained: algorithm lora, alpha 2, "
            "conv_rank 0, conv_alpha 1 (this node's defaults now: algorithm locon, alpha 4, "
            "conv_rank 4, conv_alpha 4;") in text, text
    assert results[1]["raw_outputs"]["3"]["tsuika_level"] == ["info"]
    assert f"resumed from {state} at step 2" in log, log[-4000:]  # the loop: from its step
    before, _ = load_safetensors(state / "trainable.safetensors")
    after, _ = load_safetensors(second / "states" / "step_00000003" / "trainable.safetensors")
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert not any(v.dim() == 4 and v.shape[-1] == 3 for v in after.values())  # no 3x3 convs
    refused = results[2]
    assert refused["status"] == "error", refused
    # the newest state: the resumed run's, trained as plain LoRA too
    assert f"resume: the state {second.name}/step_00000003" in refused["error"], refused
    assert ("was trained with other network options: algorithm lora (this run locon)"
            in refused["error"]), refused
    assert ("set algorithm to lora on the Network Options (Tsuika) node connected to "
            "'options'") in refused["error"], refused
    assert str(out) not in refused["error"]
