"""The pack inside a real ComfyUI server (../shared/tools/real_host.py).

Runs when COMFYUI_DIR points at a ComfyUI checkout (and COMFYUI_PYTHON at its venv's python,
default <COMFYUI_DIR>/../comfy-venv/bin/python); skipped, visibly, otherwise.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "tools" / "real_host.py"
COMFY = os.environ.get("COMFYUI_DIR")
NODES = ["TsuikaLoadDataset", "TsuikaDatasetFromImages", "TsuikaTrainLoRA",
         "TsuikaTrainLoRAAdvanced", "TsuikaApplyLoRA", "TsuikaSaveLoRA"]

pytestmark = pytest.mark.skipif(
    not COMFY or not HARNESS.is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout (and have ../shared/tools/real_host.py)")


@pytest.fixture(scope="module")
def host_models(tmp_path_factory):
    from tsuika.trainers.fixtures import write_fixture

    models = tmp_path_factory.mktemp("models")
    paths = write_fixture("sd15-hostable", models / "build", dtype="fp16")
    (models / "checkpoints").mkdir()
    os.symlink(paths["single_file"], models / "checkpoints" / "sd15-hostable.safetensors")
    return models


def _run(args, timeout=3000):
    python = os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))
    cmd = [sys.executable, str(HARNESS), "--comfy", COMFY, "--python", python,
           "--plugin", str(ROOT), "--link-name", "tsuika", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_workflows_and_examples_run_with_zero_unmatched_lora_keys(host_models, tmp_path):
    report = tmp_path / "report.json"
    again = tmp_path / "requeued.json"  # the same graph queued twice: served from cache
    again.write_text((ROOT / "tests/workflows/train_then_generate.json").read_text())
    r = _run(["--models", str(host_models), "--output-dir", str(tmp_path / "out"),
              "--strict-lora", "--report", str(report),
              str(ROOT / "tests/workflows/train_then_generate.json"), str(again),
              str(ROOT / "tests/workflows/load_saved_lora.json"),
              str(ROOT / "tests/workflows/dataset_from_generated_images.json"),
              str(ROOT / "example_workflows"), "--expect-nodes", *NODES])  # flags last: nargs
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "RESULT: PASS" in r.stdout and report.is_file()
    requeued = r.stdout.split("== " + str(again))[1].split("\n")[1]
    seconds = float(requeued.split(" in ")[1].rstrip("s"))
    assert seconds < 2.0, f"an unchanged graph trained again: {requeued}"
    saved = Path(COMFY) / "models" / "loras" / "tsuika_example_heart.safetensors"
    saved.unlink(missing_ok=True)


def test_cancel_saves_weights_and_a_resumable_state(host_models, tmp_path):
    out = tmp_path / "out"
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--timeout", "60",
              str(ROOT / "tests/workflows_negative/train_until_cancelled.json"),
              "--expect-fail", "train_until_cancelled.json"])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "interrupt sent and honoured" in log, log[-6000:]
    states = list(out.glob("tsuika/tsuika_lora/run_*/states/step_*/trainable.safetensors"))
    loras = list(out.glob("tsuika/tsuika_lora/run_*/tsuika_lora-step*.safetensors"))
    assert states and loras, log[-3000:]


def test_bad_inputs_are_refused_when_queued(host_models):
    neg = ROOT / "tests/workflows_negative"
    r = _run(["--models", str(host_models), str(neg / "bad_missing_folder.json"),
              str(neg / "bad_rank.json"), "--expect-fail", "bad_missing_folder.json",
              "bad_rank.json"])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "prompt_outputs_failed_validation" in log
    assert "no_such_folder_tsuika' does not exist" in log and "(rank)" in log


def test_dataset_folder_picked_from_the_input_folder_list(host_models, tmp_path):
    import shutil

    inputs = tmp_path / "input"
    shutil.copytree(ROOT / "examples/sample_data/heart", inputs / "heart_set")
    (inputs / "empty_set").mkdir()
    (inputs / "empty_set" / "caption_only.txt").write_text("no image here")
    wf, neg = ROOT / "tests/workflows", ROOT / "tests/workflows_negative"
    r = _run(["--input-dir", str(inputs), str(wf / "dataset_from_input_subfolder.json"),
              str(neg / "bad_input_subfolder.json"), str(neg / "bad_no_folder_given.json"),
              str(neg / "bad_empty_dataset.json"), "--expect-fail", "bad_input_subfolder.json",
              "bad_no_folder_given.json", "bad_empty_dataset.json"])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "12 images used" in log, log[-4000:]
    assert "not_in_the_input_folder" in log  # ComfyUI: value not in list
    assert "pick a sub-folder of ComfyUI's input folder" in log
    assert "no usable images in dataset folder" in log  # refused when queued, not when run


def test_dreambooth_checkpoint_loads_and_samples_in_comfyui(host_models, tmp_path):
    """A DreamBooth checkpoint trained from the hostable model, loaded by
    CheckpointLoaderSimple and sampled, with no missing or unexpected keys in ComfyUI's log."""
    import json

    from tsuika.trainers.config import build_config
    from tsuika.trainers.loop import train

    base = host_models / "checkpoints" / "sd15-hostable.safetensors"
    cfg = build_config(overrides=[
        f"model.path={base}", f"data.dir={ROOT / 'examples/sample_data/heart'}",
        f"output.dir={tmp_path / 'train'}", "output.name=tsuika_dreambooth",
        "network.method=dreambooth", "train.steps=2", "data.resolution=64",
        "train.learning_rate=1e-5", "train.device=cpu"])
    result = train(cfg)
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    os.symlink(result.file_path, models / "checkpoints" / "tsuika_dreambooth.safetensors")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "tsuika_dreambooth.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a heart"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
            "latent_image": ["3", 0], "seed": 0, "steps": 2, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0],
                                                    "filename_prefix": "tsuika_dreambooth"}}}
    wf = tmp_path / "dreambooth_checkpoint.json"
    wf.write_text(json.dumps(graph))
    out = tmp_path / "out"
    r = _run(["--models", str(models), "--output-dir", str(out), "--show-log", str(wf)])
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
    assert list(out.glob("tsuika_dreambooth*.png")), log[-3000:]
    for complaint in ("unet missing", "unet unexpected", "clip missing", "missing vae keys",
                      "no clip/text encoder weights"):  # ComfyUI's warnings (comfy/sd.py)
        assert complaint not in log.lower(), f"ComfyUI: {complaint}\n" + log[-4000:]
