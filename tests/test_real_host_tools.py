"""The model and LoRA tool nodes inside a real ComfyUI (../shared/tools/real_host.py):
extract from two checkpoints -> apply -> sample, the extracted file through LoraLoader with
zero unmatched keys, and a baked checkpoint loaded and sampled with no missing keys.

Runs when COMFYUI_DIR is set (see test_real_host.py); skipped, visibly, otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from lora_made import random_lora
from test_real_host import COMFY, HARNESS, _run

pytestmark = pytest.mark.skipif(
    not COMFY or not HARNESS.is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout (and have ../shared/tools/real_host.py)")

LORAS = Path(COMFY or ".") / "models" / "loras"
CHECKPOINTS = Path(COMFY or ".") / "models" / "checkpoints"
TRAINED = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
           ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
           ("unet", "down_blocks.0.resnets.0.conv1"),
           ("text_encoder", "encoder.layers.0.self_attn.v_proj")]


def _sample(model, clip, vae, prefix):
    return {
        "s1": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a heart"}},
        "s2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                            "batch_size": 1}},
        "s3": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["s1", 0], "negative": ["s1", 0],
            "latent_image": ["s2", 0], "seed": 0, "steps": 2, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "s4": {"class_type": "VAEDecode", "inputs": {"samples": ["s3", 0], "vae": vae}},
        "s5": {"class_type": "SaveImage", "inputs": {"images": ["s4", 0],
                                                     "filename_prefix": prefix}}}


def test_extract_apply_sample_and_bake_in_comfyui(tmp_path):
    from tsuika.trainers.families import load_model
    from tsuika.trainers.fixtures import write_fixture
    from tsuika.trainers.formats.safetensors_io import save_safetensors
    from tsuika.trainers.ops.merge import lora_delta
    from tsuika.trainers.tools.bake import bake_file
    from tsuika.trainers.tools.lora_files import lora_tensors, read_lora_for

    models = tmp_path / "models"
    base = write_fixture("sd15-hostable", models / "build", dtype="fp16")["single_file"]
    for sub in ("checkpoints", "loras"):
        (models / sub).mkdir()
    os.symlink(base, models / "checkpoints" / "sd15-hostable.safetensors")
    bundle = load_model(base)
    made = random_lora(bundle, TRAINED, rank=4, seed=5, scale=0.05)
    made_file = save_safetensors(models / "loras" / "tsuika_tools_made.safetensors",
                                 lora_tensors(made, torch.float32))
    bake_file(base, made_file, models / "checkpoints" / "tsuika_tools_tuned.safetensors",
              save_dtype="fp32")

    extracted, baked = LORAS / "tsuika_tools_extracted.safetensors", \
        CHECKPOINTS / "tsuika_tools_baked.safetensors"
    merged = CHECKPOINTS / "tsuika_tools_merged.safetensors"
    extract = {
        "1": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "tsuika_tools_tuned.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "sd15-hostable.safetensors"}},
        "3": {"class_type": "TsuikaExtractLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "model_base": ["2", 0], "clip_base": ["2", 1],
            "vae": ["2", 2], "rank": 4, "rank_mode": "fixed", "rank_value": 0.9,
            "clamp_quantile": 1.0, "conv_rank": 4, "text_encoder": True}},
        "4": {"class_type": "TsuikaSaveLoRA", "inputs": {
            "lora": ["3", 0], "filename": extracted.stem, "overwrite": True}},
        "5": {"class_type": "TsuikaApplyLoRA", "inputs": {
            "model": ["2", 0], "clip": ["2", 1], "lora": ["3", 0], "strength_model": 1.0,
            "strength_clip": 1.0}},
        "6": {"class_type": "TsuikaBakeLoRA", "inputs": {
            "ckpt_name": "sd15-hostable.safetensors", "lora_name": made_file.name,
            "strength_model": 1.0, "strength_clip": 1.0, "filename": baked.stem,
            "save_dtype": "fp16", "overwrite": True}},
        "7": {"class_type": "TsuikaMergeCheckpoints", "inputs": {
            "ckpt_a": "sd15-hostable.safetensors", "ckpt_b": "tsuika_tools_tuned.safetensors",
            "mode": "weighted_sum", "ratios": "0.5 te=0 out=1", "ckpt_c": "(none)",
            "filename": merged.stem, "save_dtype": "fp16", "overwrite": True}},
        **_sample(["5", 0], ["5", 1], ["2", 2], "tsuika_tools_extracted"),
        **{f"m{k}": v for k, v in _sample(["7", 0], ["7", 1], ["7", 2],
                                           "tsuika_tools_merged").items()}}
    for node in (v for k, v in extract.items() if k.startswith("m")):  # the m-copy's own links
        for name, value in node["inputs"].items():
            if isinstance(value, list) and str(value[0]).startswith("s"):
                node["inputs"][name] = [f"m{value[0]}", value[1]]
    reload = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": baked.name}},
        "2": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": extracted.name,
            "strength_model": 1.0, "strength_clip": 1.0}},
        **_sample(["2", 0], ["2", 1], ["1", 2], "tsuika_tools_baked")}
    files = []
    for name, graph in (("extract_apply_sample.json", extract), ("baked_reload.json", reload)):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(graph))
    out = tmp_path / "out"
    try:
        r = _run(["--models", str(models), "--output-dir", str(out), "--strict-lora",
                  "--show-log", *map(str, files)])
        log = r.stdout + r.stderr
        assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
        assert list(out.glob("tsuika_tools_extracted*.png")), log[-3000:]
        assert list(out.glob("tsuika_tools_baked*.png")), log[-3000:]
        assert list(out.glob("tsuika_tools_merged*.png")), log[-3000:]
        for complaint in ("unet missing", "unet unexpected", "clip missing",
                          "missing vae keys", "lora key not loaded"):
            assert complaint not in log.lower(), f"ComfyUI: {complaint}\n" + log[-4000:]
        # what ComfyUI's weights gave the node is the LoRA baked in, layer by layer
        got = read_lora_for(bundle, extracted)
        assert set(got.modules) == set(made.modules)
        for key, w in made.modules.items():
            shape = bundle.components[key[0]].get_submodule(key[1]).weight.shape
            want = lora_delta(w, shape)
            torch.testing.assert_close(lora_delta(got.modules[key], shape), want,
                                       atol=2e-3 * float(want.abs().max()), rtol=1e-2)
        from safetensors import safe_open

        with safe_open(str(baked), "pt") as f:
            meta = f.metadata()
        assert meta["tsuika.tool"] == "bake" and str(models) not in json.dumps(meta)
        with safe_open(str(merged), "pt") as f:
            meta = f.metadata()
        assert meta["tsuika.tool"] == "merge" and "te=0 out=1" in meta["tsuika.settings"]
    finally:
        merged.unlink(missing_ok=True)
        extracted.unlink(missing_ok=True)
        baked.unlink(missing_ok=True)


GRID_EXAMPLE = Path(__file__).resolve().parents[1] / "example_workflows" / \
    "tsuika_train_lora_step_strength_grid.json"


def test_train_then_grid_example_as_shipped(tmp_path):
    """The shipped train -> grid example: Train LoRA Advanced saves every 5 steps, the grid
    node finds that run from the LoRA it returned and samples its 3 saved steps and final file
    at 3 strengths with ComfyUI's KSampler, into one labelled image."""
    import numpy as np
    from PIL import Image

    from tsuika.trainers.fixtures import write_fixture

    models = tmp_path / "models"
    base = write_fixture("sd15-hostable", models / "build", dtype="fp16")["single_file"]
    (models / "checkpoints").mkdir()
    os.symlink(base, models / "checkpoints" / "sd15-hostable.safetensors")
    # after the example, in the same server: the run by its name plus two LoRA files from
    # models/loras as rows; and a file name that is not there, refused at validation
    from tsuika.trainers.families import load_model
    from tsuika.trainers.formats.safetensors_io import save_safetensors
    from tsuika.trainers.tools.lora_files import lora_tensors

    (models / "loras").mkdir()
    bundle = load_model(base, dtype=torch.float16)
    for i, name in enumerate(("grid_a", "grid_b")):
        save_safetensors(models / "loras" / f"{name}.safetensors", lora_tensors(
            random_lora(bundle, TRAINED, rank=4, seed=i, scale=0.3), torch.float16))
    del bundle

    def files_grid(names):
        return {"g1": {"class_type": "CheckpointLoaderSimple",
                       "inputs": {"ckpt_name": "sd15-hostable.safetensors"}},
                "g2": {"class_type": "TsuikaLoRAGrid", "inputs": {
                    "model": ["g1", 0], "clip": ["g1", 1], "vae": ["g1", 2],
                    "strengths": "1, 0", "prompt": "a heart", "negative": "",
                    "sample_seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                    "scheduler": "normal", "width": 64, "height": 64,
                    "change_threshold": 0.01, "run_name": "tsuika_example_grid",
                    "lora_names": names}},
                "g3": {"class_type": "SaveImage", "inputs": {
                    "images": ["g2", 0], "filename_prefix": "tsuika_grid_files"}}}
    files, bad = tmp_path / "grid_files.json", tmp_path / "grid_bad_name.json"
    files.write_text(json.dumps(files_grid("grid_a.safetensors\ngrid_b.safetensors")))
    bad.write_text(json.dumps(files_grid("grid_a.safetensors\nnot_there.safetensors")))
    out, report = tmp_path / "out", tmp_path / "report.json"
    r = _run(["--models", str(models), "--output-dir", str(out), "--report", str(report),
              "--show-log", str(GRID_EXAMPLE), str(files), str(bad),
              "--expect-fail", bad.name])
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
    assert "'not_there.safetensors' is not a file in models/loras" in log, log[-4000:]
    shown = {k: v for run in json.loads(report.read_text())["workflows"]
             for k, v in (run.get("raw_outputs") or {}).items()}
    text = shown["5"]["tsuika_report"][0]
    assert text.startswith("4 rows x 3 strengths"), text
    assert shown["g2"]["tsuika_report"][0].startswith("6 rows x 2 strengths"), shown["g2"]
    [files_png] = out.glob("tsuika_grid_files*.png")
    fw, fh = Image.open(files_png).size
    assert fw > 2 * 64 and 6 * 64 < fh < 6 * 64 + 64, (fw, fh)
    runs = list((out / "tsuika" / "tsuika_example_grid").glob("run_*"))
    assert len(runs) == 1 and len(list(runs[0].glob("*-step*.safetensors"))) == 3, runs
    [png] = out.glob("tsuika_example_grid*.png")
    img = np.asarray(Image.open(png).convert("RGB")).astype(np.float32) / 255
    h, w = img.shape[:2]
    left, top = w - 3 * 64, h - 4 * 64  # the label strip and the header
    assert left > 20 and top > 10, img.shape
    # a cell below its top rows (where a flag's letter may be drawn), inside its frame
    cell = lambda r, c: img[top + r * 64 + 20:top + (r + 1) * 64 - 3,  # noqa: E731
                            left + c * 64 + 3:left + (c + 1) * 64 - 3]
    for r in range(1, 4):  # strength 0: the base model in every row, the same seed
        assert np.abs(cell(r, 0) - cell(0, 0)).max() < 2 / 255
    # the trained LoRA at strength 1 changes the image, more at the final step than step 5
    change = lambda r: float(np.abs(cell(r, 2) - cell(r, 0)).mean())  # noqa: E731
    assert change(3) > 0 and change(3) >= change(0), (change(0), change(3), text)


EXTRACT_EXAMPLE = GRID_EXAMPLE.parent / "tsuika_extract_lora_apply_sample.json"


def test_extract_example_as_shipped_with_zero_unmatched_keys(tmp_path):
    """The shipped extract example: Train Checkpoint fine-tunes (UNet and text encoder) and
    publishes a checkpoint, Extract LoRA takes (fine-tuned, base), Save LoRA keeps it, Apply
    LoRA patches the base and KSampler samples: no LoRA key ComfyUI leaves unmatched."""
    from tsuika.trainers.fixtures import write_fixture

    models = tmp_path / "models"
    base = write_fixture("sd15-hostable", models / "build", dtype="fp16")["single_file"]
    (models / "checkpoints").mkdir()
    os.symlink(base, models / "checkpoints" / "sd15-hostable.safetensors")
    out, report = tmp_path / "out", tmp_path / "report.json"
    published = {CHECKPOINTS: "tsuika_example_extract_tuned*", LORAS: "tsuika_example_extracted*"}
    before = {folder: set(folder.glob(p)) for folder, p in published.items()}
    try:
        r = _run(["--models", str(models), "--output-dir", str(out), "--report", str(report),
                  "--strict-lora", "--show-log", str(EXTRACT_EXAMPLE)])
        log = r.stdout + r.stderr
        assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
        assert "lora key not loaded" not in log.lower(), log[-4000:]
        shown = {k: v for run in json.loads(report.read_text())["workflows"]
                 for k, v in (run.get("raw_outputs") or {}).items()}
        assert shown["4"]["tsuika_report"][0].startswith("extracted "), shown["4"]
        assert list(out.glob("tsuika_extracted*.png"))
        [saved] = set(LORAS.glob("tsuika_example_extracted*")) - before[LORAS]
        from safetensors import safe_open

        with safe_open(str(saved), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        assert any(k.startswith("lora_te_text_model_") for k in keys), keys[:5]
        assert any(k.startswith("lora_unet_") for k in keys) and meta["tsuika.tool"] == "extract"
    finally:
        for folder, pattern in published.items():
            for p in set(folder.glob(pattern)) - before[folder]:
                p.unlink()


SDXL_PATHS = [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
              ("unet", "down_blocks.0.resnets.0.conv1"),
              ("text_encoder_1", "encoder.layers.0.self_attn.q_proj"),
              ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1")]


def test_sdxl_baked_checkpoint_and_lora_load_in_comfyui(tmp_path):
    """SDXL (the sdxl-hostable fixture, 2 GB: one run): a LoRA on the UNet and both text
    encoders baked into a single-file checkpoint by the bake tool's pieces (the model loaded
    in fp16 to keep this process near the file's size), then Load Checkpoint -> LoraLoader
    (the same LoRA, kohya te1/te2 names) -> KSampler in ComfyUI: no missing or left-over
    checkpoint key, no unmatched LoRA key, and every tensor of the baked file is the base's
    but the four layers the LoRA changes."""
    from safetensors import safe_open
    from test_real_host_sdxl import _checkpoint

    from tsuika.trainers.families import load_model
    from tsuika.trainers.formats.safetensors_io import save_safetensors
    from tsuika.trainers.tools.bake import bake_into_bundle, single_file_tensors
    from tsuika.trainers.tools.lora_files import lora_tensors, read_lora_for

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "loras").mkdir()
    base = _checkpoint(models, "sdxl-hostable")
    bundle = load_model(base, dtype=torch.float16)
    made = random_lora(bundle, SDXL_PATHS, rank=4, seed=11, scale=0.05)
    lora_file = save_safetensors(models / "loras" / "tsuika_sdxl_made.safetensors",
                                 lora_tensors(made, torch.float16))
    assert bake_into_bundle(bundle, read_lora_for(bundle, lora_file)) == 4
    tensors, hints = single_file_tensors(bundle, torch.float16)
    baked = save_safetensors(models / "checkpoints" / "tsuika_sdxl_baked.safetensors", tensors,
                             hints, dtype=torch.float16)
    del bundle, tensors
    with safe_open(str(base), "pt") as fa, safe_open(str(baked), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        changed = [k for k in fa.keys() if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
    assert len(changed) == 4 and any(k.startswith("conditioner.embedders.1.") for k in changed)
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": baked.name}},
        "2": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_file.name,
            "strength_model": 0.5, "strength_clip": 0.5}},
        **_sample(["2", 0], ["2", 1], ["1", 2], "tsuika_sdxl_baked")}
    wf = tmp_path / "sdxl_baked.json"
    wf.write_text(json.dumps(graph))
    out = tmp_path / "out"
    r = _run(["--models", str(models), "--output-dir", str(out), "--strict-lora", "--show-log",
              str(wf)])
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
    assert list(out.glob("tsuika_sdxl_baked*.png")), log[-3000:]
    for complaint in ("unet missing", "unet unexpected", "clip missing", "missing vae keys",
                      "left over keys", "lora key not loaded"):
        assert complaint not in log.lower(), f"ComfyUI: {complaint}\n" + log[-4000:]
