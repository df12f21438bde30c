"""The pack inside a real ComfyUI server (../shared/tools/real_host.py).

Runs when COMFYUI_DIR points at a ComfyUI checkout (and COMFYUI_PYTHON at its venv's python,
default <COMFYUI_DIR>/../comfy-venv/bin/python); skipped, visibly, otherwise.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import package_parent

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "tools" / "real_host.py"
COMFY = os.environ.get("COMFYUI_DIR")
NODES = ["TsuikaLoadDataset", "TsuikaDatasetFromImages", "TsuikaTrainLoRA",
         "TsuikaTrainLoRAAdvanced", "TsuikaApplyLoRA", "TsuikaSaveLoRA", "TsuikaDataOptions",
         "TsuikaNetworkOptions", "TsuikaTrainingOptions", "TsuikaSavingOptions",
         "TsuikaSamplingOptions", "TsuikaCheckDataset", "TsuikaEditCaptions",
         "TsuikaEditCaptionText", "TsuikaCaptionDataset"]
LORAS = Path(COMFY or ".") / "models" / "loras"  # ComfyUI's first loras folder: Save LoRA's
# The examples on the SD1 fixture; the SDXL ones run in test_real_host_sdxl.py.
SD1_EXAMPLES = [str(p) for p in sorted((ROOT / "example_workflows").glob("*.json"))
                if "sdxl" not in p.name]

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
    from test_captioning_tagger import _tagger

    # the tagger the tag -> check -> train example names, as a tiny ONNX model
    _tagger(models / "captioners" / TAGGER_NAME, tags=HOST_TAGS)
    return models


TAGGER_NAME = "wd-swinv2-tagger-v3"  # what example_workflows/tsuika_tag_check_train.json names
TAG_EXAMPLE = "tsuika_tag_example"  # its dataset: a sub-folder of ComfyUI's input folder


def _tag_example_input(base: Path) -> Path:
    """An input folder holding the tag example's dataset: the sample images, uncaptioned."""
    import shutil

    shutil.copytree(ROOT / "examples" / "sample_data" / "heart", base / TAG_EXAMPLE)
    for caption in (base / TAG_EXAMPLE).glob("*.txt"):
        caption.unlink()
    return base


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
def example_outputs():
    """The examples publish checkpoints (DreamBooth, the extract example's fine-tune), an
    embedding, the extracted LoRA and the tag example's LoRA into ComfyUI's models folders:
    removed again after the test (only files the test made)."""
    made = [(Path(COMFY) / "models" / "checkpoints", "tsuika_example_*.safetensors"),
            (Path(COMFY) / "models" / "embeddings", "tsuika_example_embedding*"),
            (LORAS, "tsuika_example_extracted*"),
            (LORAS, "tsuika_example_tagged*.safetensors")]
    before = [set(folder.glob(pattern)) for folder, pattern in made]
    yield
    for (folder, pattern), old in zip(made, before):
        for p in set(folder.glob(pattern)) - old:
            p.unlink()


def test_workflows_and_examples_run_with_zero_unmatched_lora_keys(host_models, tmp_path,
                                                                  example_outputs):
    report = tmp_path / "report.json"
    again = tmp_path / "requeued.json"  # the same graph queued twice: served from cache
    again.write_text((ROOT / "tests/workflows/train_then_generate.json").read_text())
    r = _run(["--models", str(host_models), "--output-dir", str(tmp_path / "out"),
              "--input-dir", str(_tag_example_input(tmp_path / "input")),
              "--strict-lora", "--report", str(report),
              str(ROOT / "tests/workflows/train_then_generate.json"), str(again),
              str(ROOT / "tests/workflows/load_saved_lora.json"),
              str(ROOT / "tests/workflows/dataset_from_generated_images.json"),
              str(ROOT / "tests/workflows/train_advanced_with_options.json"),
              *SD1_EXAMPLES, "--expect-nodes", *NODES])  # flags last: nargs
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
        assert meta["ss_shuffle_caption"] == "True", meta
        assert json.loads(meta["tsuika.config"])["data"]["caption_variants"] == 4, meta
    finally:
        advanced.unlink(missing_ok=True)
    saved = LORAS / "tsuika_example_heart.safetensors"
    try:  # Save LoRA declares the hidden inputs, so ComfyUI gave it the editor's workflow
        meta = _metadata(saved)
        workflow = json.loads(meta["workflow"])
        assert any(n["type"] == "TsuikaSaveLoRA" for n in workflow["nodes"]), meta["workflow"]
        assert "TsuikaTrainLoRA" in meta["prompt"] and meta["ss_network_dim"] == "4"
        assert meta["ss_network_alpha"] == "4.0"  # alpha = rank: the swept node default
        # LoCon (3x3 convolutions too) is the node's default algorithm; --strict-lora above
        # proved ComfyUI's LoraLoader matched every key, the conv ones included
        assert meta["ss_conv_dim"] == "4", meta
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
from comfy.cli_args import args
args.cpu = True  # as the server is started here (main.py --cpu): schemas may list samplers
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
                       env={**os.environ, "PYTHONPATH": f"{COMFY}{os.pathsep}{package_parent()}"})
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    simple = info["TsuikaTrainLoRA"]
    assert simple["inputs"][4:] == ["steps", "learning_rate", "rank", "trigger_word",
                                    "training_seed", "resolution", "sample_prompt",
                                    "sample_every", "resume"]  # released order, resume last
    assert simple["max"]["rank"] == 1024  # the config's limit, not a copy
    # Advanced: Simple's inputs, its one own widget and the options chain, then what came
    # later (prior preservation), appended so that saved workflows keep their widget order.
    for advanced in ("TsuikaTrainLoRAAdvanced", "TsuikaTrainHypernetworkAdvanced"):
        base = info[advanced.removesuffix("Advanced")]["inputs"]
        assert info[advanced]["inputs"] == base + [
            "lr_warmup_steps", "options", "class_prompt", "class_images", "prior_loss_weight",
            "class_dataset"], info[advanced]["inputs"]
    assert set(info["TsuikaSaveLoRA"]["hidden"]) == {"PROMPT", "EXTRA_PNGINFO"}
    assert info["refused"].startswith("resolution = 32 is below bucket_step = 64")


def _dora_as_comfyui_0_3(weight, delta, dora_scale):
    """ComfyUI 0.3.x's reading of an ``(out, 1)`` dora_scale: ``m * (W + dW) / ||W||`` (the
    norm of the base weight, not of ``W + dW``; open upstream as Comfy-Org/ComfyUI#15458)."""
    import torch

    norm = weight.float().flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    norm = norm + torch.finfo(weight.dtype).eps
    return (weight.float() + delta) * (dora_scale.float().reshape(norm.shape) / norm)


def test_loha_lokr_dora_files_load_through_loraloader_as_we_merge_them(host_models, tmp_path):
    """A LoHa, a LoKr and a DoRA file from a tiny training (UNet with 3x3 convolutions and the
    text encoder) load through ComfyUI's LoraLoader with zero unmatched keys, patch every
    module they hold, change the UNet's output, and ComfyUI's patched weights equal
    Tsuika's merge (ops.merge) of the same file."""
    import json
    import shutil
    import warnings

    from tsuika.trainers.config import build_config
    from tsuika.trainers.families import load_model
    from tsuika.trainers.formats.lora_keys import ModuleIndex, kohya_name
    from tsuika.trainers.formats.lora_layouts import read_lora
    from tsuika.trainers.formats.safetensors_io import load_safetensors
    from tsuika.trainers.loop import train
    from tsuika.trainers.ops.merge import lora_delta, module_change

    base = host_models / "checkpoints" / "sd15-hostable.safetensors"
    loras = tmp_path / "loras"
    loras.mkdir()
    runs = {"loha": ["network.conv_rank=2", "network.conv_alpha=1"], "lokr": [],
            "dora": ["network.conv_rank=2", "network.conv_alpha=1"]}
    for algo, extra in runs.items():
        cfg = build_config(overrides=[
            f"model.path={base}", f"data.dir={ROOT / 'examples/sample_data/heart'}",
            f"output.dir={tmp_path / algo}", f"output.name=tsuika_{algo}",
            f"network.algorithm={algo}", "network.rank=4", "network.train_text_encoder=true",
            "train.steps=2", "data.resolution=64", "train.learning_rate=1e-2",
            "train.text_encoder_lr=1e-2", "train.device=cpu", *extra])
        shutil.copy(train(cfg).file_path, loras / f"tsuika_{algo}.safetensors")
    out = tmp_path / "changes"
    out.mkdir()
    python = os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))
    r = subprocess.run([python, str(ROOT / "tests/comfy_lora_patch.py"), COMFY, str(base),
                        str(loras), str(out), *(f"tsuika_{a}.safetensors" for a in runs)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])
    bundle = load_model(base)
    index = ModuleIndex.from_models(bundle.components)
    for algo in runs:
        name = f"tsuika_{algo}.safetensors"
        got = report[name]
        lsd = read_lora(loras / name, index)
        assert got["complaints"] == [], got["complaints"][:5]
        assert got["unet_patched"] + got["clip_patched"] == len(lsd.modules), got
        assert got["named"] == len(lsd.modules) and got["clip_patched"] > 0, got
        assert got["output_change"] > 0, got
        comfy, _ = load_safetensors(out / f"{name}.changes.safetensors")
        dora_reading = set()
        for (comp, path), weights in lsd.modules.items():
            weight = bundle.components[comp].get_submodule(path).weight.detach()
            ours = module_change(weights, weight)
            theirs = comfy[kohya_name(comp, path)]
            tol = 1e-4 * float(weight.abs().max()) + 1e-6
            err = float((theirs - ours).abs().max())
            if weights.dora_scale is not None and err > tol:
                known = _dora_as_comfyui_0_3(weight, lora_delta(weights, weight.shape),
                                             weights.dora_scale) - weight.float()
                err = float((theirs - known).abs().max())
                dora_reading.add("ComfyUI 0.3 (norm of W)")
            assert err <= tol, (algo, comp, path, err, tol)
        if dora_reading:
            warnings.warn(f"{algo}: ComfyUI normalises by ||W||, not ||W + dW|| (Comfy-Org/"
                          "ComfyUI#15458): its weights match that reading, not DoRA's",
                          stacklevel=1)
COMFY_HYPERNETWORK = """
import json, sys, torch
folder, ckpt, io_path = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu"]  # as the server runs here: no CUDA
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths, comfy.sd
from comfy_extras.nodes_hypernetwork import HypernetworkLoader
from safetensors.torch import load_file
folder_paths.add_model_folder_path("hypernetworks", folder)
io = load_file(io_path)
model = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]
unet = model.model.diffusion_model
def predict(patcher):
    opts = patcher.model_options.get("transformer_options", {})
    with torch.no_grad():
        return unet(io["x"].to(next(unet.parameters()).dtype), timesteps=io["t"],
                    context=io["context"], transformer_options=opts).float()
out = {"plain": predict(model)}
for name, strength in (("tsuika_hn.pt", 1.0), ("tsuika_hn.pt", 0.5),
                       ("tsuika_hn.safetensors", 1.0)):
    patched = HypernetworkLoader().load_hypernetwork(model, name, strength)[0]
    out[f"{name}@{strength}"] = predict(patched)
print(json.dumps({k: v.tolist() for k, v in out.items()}))
"""


def test_hypernetwork_loads_through_hypernetworkloader_and_acts_as_ours(host_models, tmp_path):
    """Our .pt through ComfyUI's own HypernetworkLoader (in ComfyUI's python) changes the UNet's
    noise prediction exactly as our module does, at two strengths; the same tensors as a
    .safetensors file load there without error and change nothing (why we write the .pt)."""
    import gc
    import json

    import torch

    from tsuika.trainers.config import build_config
    from tsuika.trainers.families import load_model
    from tsuika.trainers.formats.hypernetwork import write_comfy_pt, write_hypernetwork
    from tsuika.trainers.formats.safetensors_io import save_safetensors
    from tsuika.trainers.methods import get_method
    from tsuika.trainers.methods.hypernetwork import ATTR

    ckpt = host_models / "checkpoints" / "sd15-hostable.safetensors"
    bundle = load_model(ckpt, dtype=torch.float32)
    config = build_config(overrides=["network.method=hypernetwork",
                                     "network.hypernetwork_activation=relu"])
    method = get_method("hypernetwork")
    torch.manual_seed(0)
    method.prepare(config, bundle)
    hn = getattr(bundle.unet, ATTR)
    for p in hn.parameters():  # trained-looking weights: the A1111 init barely moves anything
        p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(3)
    io = {"x": torch.randn(1, 4, 8, 8, generator=g), "t": torch.tensor([400.0]),
          "context": torch.randn(1, 77, 768, generator=g)}
    ours = {}
    bundle.unet.eval()
    with torch.no_grad():
        for strength in (0.0, 1.0, 0.5):
            hn.strength = strength
            ours[strength] = bundle.unet(io["x"], io["t"], io["context"]).sample
    folder = tmp_path / "hypernetworks"
    write_comfy_pt(folder / "tsuika_hn.pt", method.file(config, bundle), dtype=None)
    write_hypernetwork(folder / "tsuika_hn.safetensors", method.file(config, bundle))
    save_safetensors(tmp_path / "io.safetensors", io)
    del bundle, hn
    gc.collect()
    python = os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))
    r = subprocess.run([python, "-c", COMFY_HYPERNETWORK, str(folder), str(ckpt),
                        str(tmp_path / "io.safetensors")], capture_output=True, text=True,
                       cwd=COMFY, check=False, timeout=900,
                       env={**os.environ, "PYTHONPATH": COMFY})
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = {k: torch.tensor(v) for k, v in
              json.loads(r.stdout.strip().splitlines()[-1]).items()}
    scale = float(ours[0.0].abs().max())
    assert torch.allclose(theirs["plain"], ours[0.0], atol=1e-4 * scale)  # same base model
    change = float((ours[1.0] - ours[0.0]).abs().max())
    assert change > 1e-2 * scale, "the hypernetwork should visibly change the prediction"
    for strength in (1.0, 0.5):
        got = theirs[f"tsuika_hn.pt@{strength}"]
        assert torch.allclose(got, ours[strength], atol=1e-3 * change), strength
    # A safetensors hypernetwork: every key fails the loader's int(key) test -> no change.
    assert torch.equal(theirs["tsuika_hn.safetensors@1.0"], theirs["plain"])


def test_train_hypernetwork_node_publishes_a_pt_hypernetworkloader_lists(host_models, tmp_path):
    """The example workflow as shipped: Train Hypernetwork trains, publishes the .pt into
    models/hypernetworks and its MODEL (the hypernetwork applied) samples in the same graph."""
    import json

    import torch

    hypernetworks = Path(COMFY) / "models" / "hypernetworks"
    before = set(hypernetworks.glob("tsuika_example_hypernetwork*"))
    report, out = tmp_path / "report.json", tmp_path / "out"
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--report", str(report),
              str(ROOT / "example_workflows/tsuika_train_hypernetwork_then_generate.json"),
              "--expect-nodes", "TsuikaTrainHypernetwork", "TsuikaTrainHypernetworkAdvanced"])
    new = set(hypernetworks.glob("tsuika_example_hypernetwork*")) - before
    try:
        assert r.returncode == 0 and "RESULT: PASS" in r.stdout, r.stdout[-6000:]
        assert [p.suffix for p in new] == [".pt"], new  # the loader's file, nothing else
        sd = torch.load(next(iter(new)), weights_only=True)
        assert sorted(k for k in sd if isinstance(k, int)) == [768]
        assert sd["activation_func"] == "linear" and sd["step"] == 10
        assert list(out.glob("tsuika_hypernetwork*.png")), r.stdout[-3000:]
        runs = json.loads(report.read_text())["workflows"]
        texts = [v["tsuika_report"][0] for run in runs
                 for v in (run.get("raw_outputs") or {}).values() if "tsuika_report" in v]
        assert any(t.startswith("trained 10 steps") for t in texts), texts
        assert any("in models/hypernetworks" in line for t in texts
                   for line in t.splitlines()), texts
    finally:
        for p in new:
            p.unlink()


def test_cancelled_hypernetwork_is_published_as_a_pt_the_loader_reads(host_models, tmp_path):
    """Cancel keeps what was trained where HypernetworkLoader lists it: the partial .pt (a
    partial .safetensors there would load as a silent no-op)."""
    import torch

    hypernetworks = Path(COMFY) / "models" / "hypernetworks"
    before = set(hypernetworks.glob("tsuika_hn_cancel_test-partial-step*"))
    r = _run(["--models", str(host_models), "--output-dir", str(tmp_path / "out"),
              "--timeout", "60", "--show-log",
              str(ROOT / "tests/workflows_negative/train_hypernetwork_until_cancelled.json"),
              "--expect-fail", "train_hypernetwork_until_cancelled.json"])
    log = r.stdout + r.stderr
    partial = set(hypernetworks.glob("tsuika_hn_cancel_test-partial-step*")) - before
    try:
        assert r.returncode == 0 and "interrupt sent and honoured" in log, log[-6000:]
        assert "Processing interrupted" in log and "cancelled at step" in log, log[-6000:]
        assert [p.suffix for p in partial] == [".pt"], (partial, log[-3000:])
        sd = torch.load(next(iter(partial)), weights_only=True)
        assert 768 in sd and sd["activation_func"] == "linear"
    finally:
        for p in partial:
            p.unlink()


_ENCODE_IN_COMFY = """
import sys
from comfy.cli_args import args
args.cpu = True  # as real_host.py starts the server (main.py --cpu)
import folder_paths
models, out = sys.argv[1], sys.argv[2]
folder_paths.add_model_folder_path("checkpoints", models + "/checkpoints", is_default=True)
folder_paths.add_model_folder_path("embeddings", models + "/embeddings", is_default=True)
import torch
from safetensors.torch import save_file
from nodes import CheckpointLoaderSimple, CLIPTextEncode
clip = CheckpointLoaderSimple().load_checkpoint("sd15-hostable.safetensors")[1]
conds = {}
for key, text in (("embedding", "a photo of embedding:tsktok"), ("plain", "a photo of tsktok")):
    conds[key] = CLIPTextEncode().encode(clip, text)[0][0][0].float().contiguous()
save_file(conds, out)
"""


def test_embedding_loads_through_clip_text_encode(host_models, tmp_path):
    """A trained embedding in models/embeddings, used as ``embedding:tsktok`` by ComfyUI's own
    CheckpointLoaderSimple + CLIPTextEncode: the conditioning is what our encoder gives with
    the learned vectors, and not what the plain word gives."""
    import shutil

    from tsuika.trainers.config import build_config
    from tsuika.trainers.families import get_family, load_model
    from tsuika.trainers.formats.embedding import read_embedding
    from tsuika.trainers.formats.safetensors_io import load_safetensors
    from tsuika.trainers.loop import train
    from tsuika.trainers.methods import get_method

    base = host_models / "checkpoints" / "sd15-hostable.safetensors"
    options = ["network.method=textual_inversion", "network.token=tsktok",
               "network.init_word=heart", "network.vectors_per_token=2"]
    cfg = build_config(overrides=[
        f"model.path={base}", f"data.dir={ROOT / 'examples/sample_data/heart'}",
        f"output.dir={tmp_path / 'train'}", "output.name=tsktok", "train.steps=2",
        "data.resolution=64", "train.learning_rate=0.05", "train.device=cpu", *options])
    trained = train(cfg).file_path
    models = tmp_path / "models"
    (models / "embeddings").mkdir(parents=True)
    os.symlink(base, (models / "checkpoints").mkdir() or models / "checkpoints" / base.name)
    shutil.copy(trained, models / "embeddings" / "tsktok.safetensors")
    python = os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))
    out = tmp_path / "conds.safetensors"
    r = subprocess.run([python, "-c", _ENCODE_IN_COMFY, str(models), str(out)],
                       capture_output=True, text=True, cwd=COMFY, check=False,
                       env={**os.environ, "PYTHONPATH": COMFY})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "does not exist" not in r.stderr + r.stdout, r.stderr[-4000:]  # embedding not found
    conds, _ = load_safetensors(out)

    bundle = load_model(base)  # our encoder, with the file's vectors in its new rows
    method = get_method("textual_inversion")
    method.prepare(build_config(overrides=options), bundle)
    vectors = read_embedding(trained).vectors["clip_l"]
    method.layers(bundle)[0].vectors.data.copy_(vectors)
    with torch.no_grad():
        ours = get_family("sd15").encode_text(bundle, ["a photo of tsktok"], "cpu")[
            "encoder_hidden_states"]
    comfy = conds["embedding"]
    assert comfy.shape == ours.shape == (1, 77, 768)
    assert (comfy - ours).abs().max() < 1e-3, float((comfy - ours).abs().max())
    assert (conds["plain"] - comfy).abs().max() > 0.05


def test_train_embedding_then_prompt_with_it_in_one_graph(host_models, tmp_path):
    """Train Embedding -> (its clip output) CLIPTextEncode with embedding:<name> -> KSampler,
    in one graph and one server: the encode runs after the file is published and finds it."""
    embeddings = Path(COMFY) / "models" / "embeddings"  # ComfyUI's first embeddings folder
    before = set(embeddings.glob("tsuika_embedding_test*"))
    out = tmp_path / "out"
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--show-log",
              str(ROOT / "tests/workflows/train_embedding_then_generate.json"),
              "--expect-nodes", "TsuikaTrainEmbedding", "TsuikaTrainEmbeddingAdvanced"])
    log = r.stdout + r.stderr
    made = set(embeddings.glob("tsuika_embedding_test*")) - before
    try:
        assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
        assert [p.name for p in made] == ["tsuika_embedding_test.safetensors"], log[-3000:]
        # ComfyUI logs "warning, embedding:<name> does not exist, ignoring" when it cannot
        # find one: the encode must have run after the file was there.
        assert "does not exist" not in log, log[-4000:]
        assert list(out.glob("tsuika_embedding_test*.png")), log[-3000:]
        from tsuika.trainers.formats.embedding import read_embedding

        emb = read_embedding(next(iter(made)))
        assert emb.token == "tsktok" and emb.vectors["clip_l"].shape == (2, 768)
    finally:
        for p in made:
            p.unlink()


def test_tag_check_train_example_as_shipped(host_models, tmp_path, example_outputs):
    """The example as shipped: Caption Dataset tags the uncaptioned images with the tagger
    in models/captioners, Check Dataset reports on them, Train LoRA trains on the captions
    and KSampler samples with the LoRA applied."""
    import json

    inputs = _tag_example_input(tmp_path / "input")
    report, out = tmp_path / "report.json", tmp_path / "out"
    r = _run(["--models", str(host_models), "--input-dir", str(inputs), "--output-dir",
              str(out), "--strict-lora", "--report", str(report),
              str(ROOT / "example_workflows/tsuika_tag_check_train.json")])
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, r.stdout[-6000:] + r.stderr[-2000:]
    captions = sorted((inputs / TAG_EXAMPLE).glob("*.txt"))
    assert len(captions) == 12  # character first, then general by probability; no rating
    assert {p.read_text() for p in captions} == {"hrt, hatsune miku, solo, ^_^, long hair"}
    texts = {k: v["tsuika_report"][0]
             for k, v in json.loads(report.read_text())["workflows"][0]["raw_outputs"].items()
             if "tsuika_report" in v}
    assert texts["11"].startswith(f"captioned 12 images with {TAGGER_NAME}; 0 kept"), texts
    assert "trigger word 'hrt': in 12 of 12" in texts["12"], texts["12"]
    assert texts["3"].startswith("trained 8 steps"), texts["3"]
    assert list(out.glob("tsuika_tagged*.png")), r.stdout[-3000:]


def test_caption_dataset_with_a_tagger_in_comfyui(tmp_path):
    """Caption Dataset with a WD14-style tagger (tiny ONNX model in models/captioners, run by
    onnxruntime in ComfyUI's Python) writes the missing captions only, tags cleaned."""
    import json
    import shutil

    from test_captioning_tagger import _tagger

    # bias-only tags: the same probabilities for any image
    _tagger(tmp_path / "models" / "captioners" / "tiny_tagger", tags=HOST_TAGS)
    ds = tmp_path / "input" / "ds"
    shutil.copytree(ROOT / "examples" / "sample_data" / "heart", ds)
    (ds / "00001.txt").unlink()
    (ds / "00002.txt").unlink()
    kept = (ds / "00000.txt").read_text()
    # a tagger folder without its tag list: refused when queued, naming the file
    half = tmp_path / "models" / "captioners" / "half_tagger"
    half.mkdir()
    (half / "model.onnx").write_bytes((tmp_path / "models" / "captioners" / "tiny_tagger" /
                                       "model.onnx").read_bytes())
    refused = tmp_path / "half_tagger.json"
    refused.write_text((ROOT / "tests/workflows/caption_tagger.json").read_text()
                       .replace('"tiny_tagger"', '"half_tagger"'))
    report = tmp_path / "report.json"
    r = _run(["--models", str(tmp_path / "models"), "--input-dir", str(tmp_path / "input"),
              "--report", str(report), str(ROOT / "tests/workflows/caption_tagger.json"),
              str(refused), "--expect-fail", refused.name])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "'half_tagger' is a tagger folder without selected_tags.csv" in r.stdout, \
        r.stdout[-4000:]
    out = json.loads(report.read_text())["workflows"][0]["raw_outputs"]
    assert out["2"]["tsuika_report"][0].startswith(
        "captioned 2 images with tiny_tagger; 10 kept")
    for name in ("00001.txt", "00002.txt"):  # character first, general by probability
        assert (ds / name).read_text() == "hrt, hatsune miku, ^_^, long hair"
    assert (ds / "00000.txt").read_text() == kept
    assert "trigger word 'hrt': in 2 of 12" in out["3"]["tsuika_report"][0]


# name, category, weights on (B, G, R), bias (see test_captioning_tagger.py)
HOST_TAGS = [("general", 9, (0, 0, 0), 5.0), ("solo", 0, (0, 0, 0), 2.0),
             ("^_^", 0, (0, 0, 0), 1.0), ("long_hair", 0, (0, 0, 0), 0.5),
             ("hatsune_miku", 4, (0, 0, 0), 3.0), ("low", 0, (0, 0, 0), -1.0)]


def test_caption_edit_check_nodes_in_comfyui(tmp_path):
    """Caption Dataset writes only the missing captions (tiny BLIP in models/captioners),
    Edit Captions and Check Dataset report on the node, Edit Caption Text feeds text on."""
    import json
    import shutil

    import torch
    from test_captioning_models import _blip

    torch.manual_seed(0)
    _blip(tmp_path / "models" / "captioners" / "tiny_blip")
    ds = tmp_path / "input" / "ds"
    shutil.copytree(ROOT / "examples" / "sample_data" / "heart", ds)
    (ds / "00001.txt").unlink()
    (ds / "00002.txt").unlink()
    kept = (ds / "00000.txt").read_text()
    report = tmp_path / "report.json"
    r = _run(["--models", str(tmp_path / "models"), "--input-dir", str(tmp_path / "input"),
              "--report", str(report), str(ROOT / "tests/workflows/dataset_tools.json")])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = json.loads(report.read_text())["workflows"][0]["raw_outputs"]
    assert out["2"]["tsuika_report"][0].startswith("captioned 2 images with tiny_blip; 10 kept")
    assert (ds / "00001.txt").read_text().startswith("hrt, a photo of")
    assert (ds / "00000.txt").read_text() == kept
    check = out["4"]["tsuika_report"][0]
    assert check.startswith("pre-flight: ") and "trigger word 'hrt': in 12 of 12" in check
    assert out["6"]["text"] == ["sks, a, b\nsks, c"]
