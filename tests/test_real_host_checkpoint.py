"""Train Checkpoint (DreamBooth) in a real ComfyUI server: the shipped example runs as shipped,
its checkpoint lands in models/checkpoints and loads through Load Checkpoint with no missing or
unexpected keys, class images are drawn by the base model for prior preservation.

Runs when COMFYUI_DIR points at a ComfyUI checkout (see tests/test_real_host.py); skipped,
visibly, otherwise.
"""

import json
import os

import pytest
from test_real_host import COMFY, HARNESS, ROOT, _run, host_models  # noqa: F401

pytestmark = pytest.mark.skipif(
    not COMFY or not HARNESS.is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout (and have ../shared/tools/real_host.py)")

CHECKPOINTS = __import__("pathlib").Path(COMFY or ".") / "models" / "checkpoints"
NAME = "tsuika_example_dreambooth"


def _ours() -> set:
    return set(CHECKPOINTS.glob(f"{NAME}*.safetensors"))


def test_example_trains_a_checkpoint_that_load_checkpoint_reads(host_models, tmp_path):  # noqa: F811
    before = _ours()
    load = tmp_path / "load_trained_checkpoint.json"
    load.write_text(json.dumps({
        "1": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": f"{NAME}.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a heart"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
            "latent_image": ["3", 0], "seed": 0, "steps": 2, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0],
                                                    "filename_prefix": "loaded_back"}}}))
    out, report = tmp_path / "out", tmp_path / "report.json"
    assert not before, f"remove {sorted(before)} first: the example's name must be free"
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--report", str(report),
              "--show-log", str(ROOT / "example_workflows/dreambooth.json"), str(load),
              "--expect-nodes", "TsuikaTrainCheckpoint", "TsuikaTrainCheckpointAdvanced"])
    log = r.stdout + r.stderr
    saved = _ours()
    try:
        assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
        assert saved == {CHECKPOINTS / f"{NAME}.safetensors"}, log[-3000:]
        runs = json.loads(report.read_text())["workflows"]
        shown = {k: v for run in runs if run["workflow"].endswith("dreambooth.json")
                 for k, v in (run.get("raw_outputs") or {}).items()}
        text = shown["3"]["tsuika_report"][0]
        assert text.startswith("trained 10 steps, loss "), text
        assert f"saved as {NAME}.safetensors in models/checkpoints" in text, text
        # Prior preservation: the base model drew the 2 class images the example asks for.
        drawn = list(out.glob("tsuika/class_images/a_heart-*/class_*.png"))
        assert len(drawn) == 2, log[-3000:]
        assert "prior preservation: 2 class images" in log, log[-4000:]
        assert list(out.glob("tsuika_dreambooth*.png")) and list(out.glob("loaded_back*.png"))
        for complaint in ("unet missing", "unet unexpected", "clip missing", "missing vae keys",
                          "no clip/text encoder weights"):  # ComfyUI's warnings (comfy/sd.py)
            assert complaint not in log.lower(), f"ComfyUI: {complaint}\n" + log[-4000:]
        # One copy on disk: models/checkpoints links the run folder's file where it can.
        trained = list(out.glob(f"tsuika/{NAME}/run_*/{NAME}.safetensors"))
        assert len(trained) == 1, sorted(p.name for p in out.rglob("*.safetensors"))
        if os.stat(trained[0]).st_dev == os.stat(CHECKPOINTS).st_dev:
            assert os.path.samefile(trained[0], CHECKPOINTS / f"{NAME}.safetensors")
    finally:
        for p in saved - before:
            p.unlink()


def test_advanced_node_with_options_a_class_dataset_and_the_text_encoder(host_models, tmp_path):  # noqa: F811
    """Train Checkpoint Advanced: options nodes reach the run (fp32 file), the node's own
    name widget wins over the Saving Options one, a connected class dataset is used, and the
    trained CLIP (train_text_encoder) comes back from the saved checkpoint."""
    from safetensors import safe_open

    name = "tsuika_checkpoint_advanced_test"
    before = set(CHECKPOINTS.glob(f"{name}*.safetensors"))
    assert not before, f"remove {sorted(before)} first"
    out, report = tmp_path / "out", tmp_path / "report.json"
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--report", str(report),
              "--show-log", str(ROOT / "tests/workflows/train_checkpoint_advanced.json")])
    log = r.stdout + r.stderr
    saved = set(CHECKPOINTS.glob(f"{name}*.safetensors")) | set(
        CHECKPOINTS.glob("not_this_name*.safetensors"))
    try:
        assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
        assert saved == {CHECKPOINTS / f"{name}.safetensors"}, saved
        with safe_open(str(CHECKPOINTS / f"{name}.safetensors"), "pt") as f:
            key = next(k for k in f.keys() if k.startswith("model.diffusion_model."))
            assert str(f.get_tensor(key).dtype) == "torch.float32"  # Saving Options' save_dtype
        assert "prior preservation: 12 class images" in log, log[-4000:]
        assert "DreamBooth: " in log and " in 2 groups" in log, log[-4000:]  # UNet + text encoder
        runs = json.loads(report.read_text())["workflows"]
        text = runs[0]["raw_outputs"]["4"]["tsuika_report"][0]
        assert text.startswith("trained 2 steps, loss ")
        assert f"saved as {name}.safetensors in models/checkpoints" in text, text
        assert list(out.glob("tsuika_checkpoint_advanced*.png"))
        for complaint in ("unet missing", "unet unexpected", "clip missing",
                          "no clip/text encoder weights"):
            assert complaint not in log.lower(), f"ComfyUI: {complaint}\n" + log[-4000:]
    finally:
        for p in saved:
            p.unlink()


def test_cancelled_checkpoint_is_published_whole_where_load_checkpoint_lists_it(host_models,  # noqa: F811
                                                                               tmp_path):
    """Cancel keeps what was trained: a partial checkpoint in models/checkpoints with every
    UNet, VAE and text-encoder tensor of the base model (a file Load Checkpoint reads), and
    the node says where it is and how to resume."""
    from safetensors import safe_open

    pattern = "tsuika_ckpt_cancel_test-partial-step*"
    before = set(CHECKPOINTS.glob(pattern))
    r = _run(["--models", str(host_models), "--output-dir", str(tmp_path / "out"),
              "--timeout", "120", "--show-log",
              str(ROOT / "tests/workflows_negative/train_checkpoint_until_cancelled.json"),
              "--expect-fail", "train_checkpoint_until_cancelled.json"])
    log = r.stdout + r.stderr
    partial = set(CHECKPOINTS.glob(pattern)) - before
    try:
        assert r.returncode == 0 and "interrupt sent and honoured" in log, log[-6000:]
        assert "Processing interrupted" in log and "cancelled at step" in log, log[-6000:]
        assert "turn on 'resume' on this node" in log, log[-6000:]
        assert [p.suffix for p in partial] == [".safetensors"], (partial, log[-3000:])
        with safe_open(next(iter(partial)), "pt") as f:
            saved = set(f.keys())
        with safe_open(host_models / "checkpoints" / "sd15-hostable.safetensors", "pt") as f:
            base = {k for k in f.keys() if k.startswith(("model.diffusion_model.",
                                                         "first_stage_model.",
                                                         "cond_stage_model."))}
        assert base <= saved, sorted(base - saved)[:5]
    finally:
        for p in partial:
            p.unlink()
