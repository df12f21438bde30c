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
         "TsuikaTrainLoRAAdvanced", "TsuikaApplyLoRA", "TsuikaSaveLoRA", "TsuikaDataOptions",
         "TsuikaNetworkOptions", "TsuikaTrainingOptions", "TsuikaSavingOptions",
         "TsuikaSamplingOptions"]
LORAS = Path(COMFY or ".") / "models" / "loras"  # ComfyUI's first loras folder: Save LoRA's

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


def _run(args, timeout=3000, env=None):
    python = os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))
    cmd = [sys.executable, str(HARNESS), "--comfy", COMFY, "--python", python,
           "--plugin", str(ROOT), "--link-name", "tsuika", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture
def example_checkpoints():
    """The DreamBooth example publishes its checkpoint into ComfyUI's models/checkpoints:
    removed again after the test (only files the test made)."""
    folder = Path(COMFY) / "models" / "checkpoints"
    before = set(folder.glob("tsuika_example_dreambooth*.safetensors"))
    yield
    for p in set(folder.glob("tsuika_example_dreambooth*.safetensors")) - before:
        p.unlink()


def test_workflows_and_examples_run_with_zero_unmatched_lora_keys(host_models, tmp_path,
                                                                  example_checkpoints):
    report = tmp_path / "report.json"
    again = tmp_path / "requeued.json"  # the same graph queued twice: served from cache
    again.write_text((ROOT / "tests/workflows/train_then_generate.json").read_text())
    r = _run(["--models", str(host_models), "--output-dir", str(tmp_path / "out"),
              "--strict-lora", "--report", str(report),
              str(ROOT / "tests/workflows/train_then_generate.json"), str(again),
              str(ROOT / "tests/workflows/load_saved_lora.json"),
              str(ROOT / "tests/workflows/dataset_from_generated_images.json"),
              str(ROOT / "tests/workflows/train_advanced_with_options.json"),
              str(ROOT / "example_workflows"), "--expect-nodes", *NODES])  # flags last: nargs
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "RESULT: PASS" in r.stdout and report.is_file()
    import json

    runs = json.loads(report.read_text())["workflows"]
    shown = {k: v for run in runs if run["workflow"].endswith("train_then_generate.json")
             for k, v in (run.get("raw_outputs") or {}).items()}
    texts = {k: v["tsuika_report"][0] for k, v in shown.items() if "tsuika_report" in v}
    # The shared "Node reports" contract: dataset, train and Save LoRA reports on the node.
    assert texts["2"].startswith("12 images used from examples/sample_data/heart"), texts
    assert texts["3"].startswith("trained 20 steps, loss "), texts
    assert texts["10"].startswith("saved tsuika_example_heart.safetensors in models/loras")
    assert shown["3"]["tsuika_level"] == ["info"]
    requeued = r.stdout.split("== " + str(again))[1].split("\n")[1]
    seconds = float(requeued.split(" in ")[1].rstrip("s"))
    assert seconds < 2.0, f"an unchanged graph trained again: {requeued}"
    advanced = LORAS / "tsuika_advanced_test.safetensors"
    try:  # the options nodes' values reached the trained file
        meta = _metadata(advanced)
        assert (meta["ss_network_alpha"], meta["ss_output_name"]) == ("1.0", "tsuika_advanced_run")
        assert meta["ss_lr_scheduler"] == "cosine", meta
    finally:
        advanced.unlink(missing_ok=True)
    saved = LORAS / "tsuika_example_heart.safetensors"
    try:  # Save LoRA declares the hidden inputs, so ComfyUI gave it the editor's workflow
        meta = _metadata(saved)
        workflow = json.loads(meta["workflow"])
        assert any(n["type"] == "TsuikaSaveLoRA" for n in workflow["nodes"]), meta["workflow"]
        assert "TsuikaTrainLoRA" in meta["prompt"] and meta["ss_network_dim"] == "4"
        assert meta["ss_network_alpha"] == "2.0"  # alpha = rank / 2, as before
    finally:
        saved.unlink(missing_ok=True)


def test_cancel_is_an_ordinary_interruption_that_keeps_a_listed_lora(host_models, tmp_path):
    out = tmp_path / "out"
    before = set(LORAS.glob("tsuika_lora-partial-step*.safetensors"))
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--timeout", "60",
              "--show-log", str(ROOT / "tests/workflows_negative/train_until_cancelled.json"),
              "--expect-fail", "train_until_cancelled.json"])
    log = r.stdout + r.stderr
    partial = set(LORAS.glob("tsuika_lora-partial-step*.safetensors")) - before
    try:
        assert r.returncode == 0, log[-6000:]
        assert "interrupt sent and honoured" in log, log[-6000:]
        # ComfyUI's own interruption (execution.py logs this for InterruptProcessingException),
        # not an execution error with a dialog and a failed node.
        assert "Processing interrupted" in log, log[-6000:]
        assert "Exception during processing" not in log, log[-6000:]
        assert "cancelled at step" in log and "turn on 'resume' on this node" in log, log[-6000:]
        states = list(out.glob("tsuika/tsuika_lora/run_*/states/step_*/trainable.safetensors"))
        assert states, log[-3000:]
        assert len(partial) == 1, log[-3000:]  # where Load LoRA lists it
        assert _metadata(next(iter(partial)))["ss_network_dim"] == "4"
    finally:
        for p in partial:
            p.unlink()


def test_bad_inputs_are_refused_when_queued(host_models):
    neg = ROOT / "tests/workflows_negative"
    r = _run(["--models", str(host_models), str(neg / "bad_missing_folder.json"),
              str(neg / "bad_rank.json"), "--expect-fail", "bad_missing_folder.json",
              "bad_rank.json"])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "prompt_outputs_failed_validation" in log
    assert "no_such_folder_tsuika' does not exist" in log
    assert "rank = 100000 is above its maximum 1024" in log


def test_mistakes_are_refused_when_queued_naming_the_widget(host_models, tmp_path):
    import shutil

    inputs = tmp_path / "input"
    (inputs / "unreadable_set").mkdir(parents=True)
    for i in range(3):
        (inputs / "unreadable_set" / f"broken{i}.png").write_bytes(b"not an image" * i)
    allowed = tmp_path / "owner_allowed"
    shutil.copytree(ROOT / "examples/sample_data/heart", allowed / "heart")
    ok = tmp_path / "allowed_absolute_folder.json"
    ok.write_text((ROOT / "tests/workflows/dataset_from_input_subfolder.json").read_text()
                  .replace('"folder": ""', f'"folder": "{allowed / "heart"}"'))
    neg = ROOT / "tests/workflows_negative"
    bad = ["bad_warmup_not_below_steps.json", "bad_resolution_below_bucket_step.json",
           "bad_learning_rate_nan.json", "bad_training_name_is_a_path.json",
           "bad_save_name_is_a_path.json", "bad_save_name_dotdot.json",
           "bad_folder_outside_existing.json", "bad_folder_outside_missing.json",
           "bad_folder_dotdot_escape.json", "bad_unreadable_images.json"]
    r = _run(["--models", str(host_models), "--input-dir", str(inputs), str(ok),
              *[str(neg / b) for b in bad], "--expect-fail", *bad],
             env={"TSUIKA_ALLOWED_DIRS": str(allowed)})
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-8000:]
    assert "12 images used" in log, log[-4000:]  # an owner-allowed absolute folder works
    for expected in ["lr_warmup_steps = 600 must be smaller than steps = 500",
                     "resolution = 32 is below bucket_step = 64",
                     "learning_rate = nan is not a number",
                     "name '../../escape' contains a folder separator",
                     "filename '../../x' contains a folder separator",
                     "filename '..' starts with a dot",
                     "no image in the dataset folder can be read"]:
        assert expected in log, expected + "\n" + log[-8000:]
    assert "train.steps" not in log and "data.resolution" not in log  # widget names only
    # Outside the allowed folders: one answer, existing or not, naming no server path.
    for text in ["/etc", "/no_such_dir_tsuika/x", "../../../../etc"]:
        assert f"folder '{text}' is not inside an allowed folder" in log, text
    assert not list((LORAS).glob("x.safetensors")) and not list(LORAS.glob("_.._x*"))


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


def test_node_schemas_as_comfyui_reads_them():
    """Without a server: the schemas in ComfyUI's own python (V3 API)."""
    import json

    python = os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))
    code = """
import asyncio, json
from tsuika.nodes import extension
from tsuika.nodes.validation import InputRefused
nodes = {n.define_schema().node_id: n for n in
         asyncio.run(extension.TsuikaExtension().get_node_list())}
out = {}
for nid, n in nodes.items():
    s = n.define_schema()
    out[nid] = {"inputs": [i.id for i in s.inputs], "hidden": [h.value for h in s.hidden or []],
                "max": {i.id: getattr(i, "max", None) for i in s.inputs}}
simple = nodes["TsuikaTrainLoRA"]
try:
    simple.validate_inputs(steps=500, lr_warmup_steps=None, rank=16, resolution=32)
    out["refused"] = None
except InputRefused as e:
    out["refused"] = str(e)
print(json.dumps(out))
"""
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/", check=False,
                       env={**os.environ, "PYTHONPATH": f"{COMFY}{os.pathsep}{ROOT.parent}"})
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    simple = info["TsuikaTrainLoRA"]
    assert simple["inputs"][4:] == ["steps", "learning_rate", "rank", "trigger_word",
                                    "training_seed", "resolution", "sample_prompt",
                                    "sample_every", "resume"]  # released order, resume last
    assert simple["max"]["rank"] == 1024  # the config's limit, not a copy
    assert info["TsuikaTrainLoRAAdvanced"]["inputs"][:13] == simple["inputs"]
    assert info["TsuikaTrainLoRAAdvanced"]["inputs"][-1] == "options"
    assert len(info["TsuikaTrainLoRAAdvanced"]["inputs"]) <= len(simple["inputs"]) + 2
    assert set(info["TsuikaSaveLoRA"]["hidden"]) == {"PROMPT", "EXTRA_PNGINFO"}
    assert info["refused"].startswith("resolution = 32 is below bucket_step = 64")
