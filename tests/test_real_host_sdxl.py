"""SDXL inside a real ComfyUI (../shared/tools/real_host.py), on the ``sdxl-hostable`` fixture:
the smallest random model ComfyUI's own detection loads as SDXL.

Runs when COMFYUI_DIR points at a ComfyUI checkout (and COMFYUI_PYTHON at its venv's python);
skipped, visibly, otherwise. The fixture is large for a test (ComfyUI wants the real CLIP-L and
OpenCLIP-G shapes): the tests share one copy and run one server at a time.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import package_parent
from test_real_host import COMFY, HARNESS, LORAS, NODES, ROOT, _metadata, _run

pytestmark = pytest.mark.skipif(
    not COMFY or not HARNESS.is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout (and have ../shared/tools/real_host.py)")

PREDICT = ROOT / "tests/host_scripts/predict_match.py"
# fixture -> the model-config class ComfyUI must pick for it
HOST_KIND = {"sd15-hostable": "SD15", "sdxl-hostable": "SDXL"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A ComfyUI models folder; ``_checkpoint`` writes a fixture into it when a test needs it."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "checkpoints").mkdir()
    return folder


def _checkpoint(models: Path, name: str) -> Path:
    """``models/checkpoints/<name>.safetensors`` (fp16, as checkpoints are shared), written
    once per module."""
    from tsuika.trainers.fixtures import write_fixture

    link = models / "checkpoints" / f"{name}.safetensors"
    if not link.exists():
        path = write_fixture(name, models / "build" / name, dtype="fp16",
                             single_file_only=True)["single_file"]
        os.symlink(path, link)
    return link


def _comfy_python() -> str:
    return os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))


@pytest.mark.parametrize("fixture", sorted(HOST_KIND))
def test_noise_prediction_matches_comfyuis_own_model(models, fixture, tmp_path):
    """The same checkpoint loaded by ComfyUI: its CLIP, encode_adm (pooled + size/crop ids)
    and apply_model against the host bridge's bundle, the family's encode_text and
    predict (tests/host_scripts/predict_match.py)."""
    report = tmp_path / "match.json"
    r = subprocess.run(
        [_comfy_python(), str(PREDICT), "--comfy", COMFY, "--checkpoint",
         str(_checkpoint(models, fixture)), "--report", str(report)],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": package_parent(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and report.is_file(), r.stdout[-3000:] + r.stderr[-5000:]
    got = json.loads(report.read_text())
    assert got["comfy_model"] == HOST_KIND[fixture], got  # ComfyUI's own detection
    assert got["family"] == fixture.split("-")[0] and got["prediction_type"] == "epsilon"
    # fp32 on both sides over the same fp16-stored weights: float rounding only.
    assert got["denoised_rel_same_cond"] < 1e-4, got
    assert got["text_rel"] < 1e-3 and got["denoised_rel_own_cond"] < 1e-3, got
    if fixture.startswith("sdxl"):
        assert got["pooled_rel"] < 1e-3, got


def test_sdxl_train_apply_sample_and_load_with_zero_unmatched_lora_keys(models, tmp_path):
    """Load Checkpoint -> Train LoRA (UNet and both text encoders) -> KSampler, the saved
    file through LoraLoader, and the shipped SDXL example, with ComfyUI's log showing no
    unmatched LoRA key (--strict-lora)."""
    _checkpoint(models, "sdxl-hostable")
    out = tmp_path / "out"
    saved = LORAS / "tsuika_sdxl_test.safetensors"
    wf = ROOT / "tests/workflows"
    try:
        r = _run(["--models", str(models), "--output-dir", str(out), "--strict-lora",
                  "--timeout", "2400", "--show-log", str(wf / "sdxl_train_then_generate.json"),
                  str(wf / "sdxl_load_saved_lora.json"),
                  str(ROOT / "example_workflows/tsuika_sdxl_lora.json"),
                  "--expect-nodes", *NODES], timeout=7200)
        log = r.stdout + r.stderr
        assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-8000:]
        assert "lora key not loaded" not in log.lower(), log[-8000:]
        for prefix in ("tsuika_sdxl_trained", "tsuika_sdxl_lora_loaded", "tsuika_sdxl_example"):
            assert list(out.glob(f"{prefix}*.png")), prefix + "\n" + log[-3000:]
        from safetensors import safe_open

        with safe_open(str(saved), "pt") as f:
            keys = list(f.keys())
        for prefix in ("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_"):
            assert any(k.startswith(prefix) for k in keys), (prefix, keys[:10])
        meta = _metadata(saved)
        assert meta["ss_base_model_version"].startswith("sdxl"), meta
    finally:
        saved.unlink(missing_ok=True)
        (LORAS / "tsuika_sdxl_example.safetensors").unlink(missing_ok=True)


def test_sdxl_dreambooth_checkpoint_loads_and_samples_in_comfyui(models, tmp_path):
    """A DreamBooth checkpoint trained from the SDXL hostable model, loaded by
    CheckpointLoaderSimple (detected as SDXL, no missing or unexpected keys) and sampled."""
    from tsuika.trainers.config import build_config
    from tsuika.trainers.loop import train

    cfg = build_config(overrides=[
        f"model.path={_checkpoint(models, 'sdxl-hostable')}",
        f"data.dir={ROOT / 'examples/sample_data/heart'}", f"output.dir={tmp_path / 'train'}",
        "output.name=tsuika_sdxl_dreambooth", "network.method=dreambooth", "train.steps=2",
        "data.resolution=64", "train.learning_rate=1e-5", "train.device=cpu"])
    result = train(cfg)
    trained = tmp_path / "models"
    (trained / "checkpoints").mkdir(parents=True)
    os.symlink(result.file_path, trained / "checkpoints" / "tsuika_sdxl_dreambooth.safetensors")
    graph = json.loads((ROOT / "tests/workflows/sdxl_load_saved_lora.json").read_text())
    graph["1"]["inputs"]["ckpt_name"] = "tsuika_sdxl_dreambooth.safetensors"
    del graph["2"]  # no LoRA: the checkpoint itself
    graph["3"]["inputs"]["clip"] = ["1", 1]
    graph["5"]["inputs"]["model"] = ["1", 0]
    graph["7"]["inputs"]["filename_prefix"] = "tsuika_sdxl_dreambooth"
    wf = tmp_path / "sdxl_dreambooth_checkpoint.json"
    wf.write_text(json.dumps(graph))
    out = tmp_path / "out"
    r = _run(["--models", str(trained), "--output-dir", str(out), "--timeout", "2400",
              "--show-log", str(wf)])
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
    assert list(out.glob("tsuika_sdxl_dreambooth*.png")), log[-3000:]
    for complaint in ("unet missing", "unet unexpected", "clip missing", "missing vae keys",
                      "no clip/text encoder weights"):  # ComfyUI's warnings (comfy/sd.py)
        assert complaint not in log.lower(), f"ComfyUI: {complaint}\n" + log[-4000:]


UNTOUCHED = ROOT / "tests/host_scripts/host_untouched.py"


def test_comfyuis_model_gives_the_same_output_after_a_training(models, tmp_path):
    """The train nodes' bundle shares ComfyUI's tensors (nodes/_host_models.py): after a run
    of every method through the bridge (LoRA with text-encoder adapters, DreamBooth, textual
    inversion, hypernetwork), ComfyUI's CLIP, model and VAE compute bit for bit what they did
    before (tests/host_scripts/host_untouched.py). SD1 fixture: a training on the SDXL one
    would hold its fp32 text encoders (3 GiB) beside ComfyUI's on this machine."""
    report = tmp_path / "untouched.json"
    r = subprocess.run(
        [_comfy_python(), str(UNTOUCHED), "--comfy", COMFY, "--checkpoint",
         str(_checkpoint(models, "sd15-hostable")), "--data",
         str(ROOT / "examples/sample_data/heart"), "--report", str(report)],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": package_parent(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and report.is_file(), r.stdout[-3000:] + r.stderr[-5000:]
    got = json.loads(report.read_text())
    assert got["comfy_model"] == "SD15", got
    lora, dreambooth = got["methods"]["lora"], got["methods"]["dreambooth"]
    # LoRA reads every weight from ComfyUI's storage; DreamBooth owns the UNet it trains.
    assert lora["written"] == [] and all(v > 0 for v in lora["shared_mib"].values()), got
    assert dreambooth["written"] == ["unet"] and dreambooth["shared_mib"]["unet"] == 0, got
    assert dreambooth["shared_mib"]["vae"] > 0 and dreambooth["shared_mib"]["text_encoder"] > 0
    others = [got["methods"][m] for m in ("textual_inversion", "hypernetwork")]
    for run in others:  # frozen base weights: all of them read from ComfyUI's storage
        assert run["written"] == [] and all(v > 0 for v in run["shared_mib"].values()), got
    for run in (lora, dreambooth, *others):
        assert len(run["losses"]) == 3, got
        assert run["max_abs_diff"] == {"conditioning": 0.0, "denoised": 0.0, "decoded": 0.0}, got
