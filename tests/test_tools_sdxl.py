"""The model and LoRA tools on SDXL (the sdxl-tiny fixture), end to end through the CLI:
bake -> extract back -> resize, merge with per-block ratios, LoRA merge, inspect; SDXL's
block names and both text encoders (kohya ``lora_te1_`` / ``lora_te2_``)."""

from __future__ import annotations

import pytest
import torch
from lora_made import random_lora

from tsuika.trainers.cli import main
from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
from tsuika.trainers.ops.merge import lora_delta

PATHS = [("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"),
         ("unet", "up_blocks.0.attentions.0.proj_in"),
         ("unet", "down_blocks.0.resnets.0.conv1"),
         ("text_encoder_1", "encoder.layers.0.self_attn.q_proj"),
         ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1")]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The sdxl-tiny single file, its bundle, and a rank-2 LoRA on five of its layers."""
    from tsuika.trainers.families import load_model
    from tsuika.trainers.fixtures import write_fixture
    from tsuika.trainers.tools.lora_files import lora_tensors

    folder = tmp_path_factory.mktemp("sdxl_tools")
    path = write_fixture("sdxl-tiny", folder / "model")["single_file"]
    bundle = load_model(path)
    lsd = random_lora(bundle, PATHS, rank=2, seed=7)
    lora = save_safetensors(folder / "made.safetensors", lora_tensors(lsd, torch.float32))
    return path, bundle, lsd, lora, folder


def test_lora_names_both_encoders_as_kohya_does(sdxl):
    *_, lora, _ = sdxl
    keys = set(load_safetensors(lora)[0])
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.alpha" in keys


def test_bake_extract_resize_inspect(sdxl, capsys):
    from tsuika.trainers.tools.lora_files import read_lora_for

    path, bundle, lsd, lora, folder = sdxl
    baked, back, small = (str(folder / n) for n in ("baked.safetensors", "back.safetensors",
                                                     "small.safetensors"))
    assert main(["bake", str(path), str(lora), baked, "--strength", "0.5",
                 "--save-dtype", "fp32"]) == 0
    assert "baked 5 LoRA layers" in capsys.readouterr().out
    assert main(["extract", str(path), baked, back, "--rank", "2", "--conv-rank", "2",
                 "--save-dtype", "fp32"]) == 0
    assert capsys.readouterr().out.startswith("extracted 5 layers")
    got = read_lora_for(bundle, back)
    assert set(got.modules) == set(lsd.modules)  # te1 and te2 kept apart
    for key, w in lsd.modules.items():
        shape = bundle.components[key[0]].get_submodule(key[1]).weight.shape
        torch.testing.assert_close(lora_delta(got.modules[key], shape),
                                   0.5 * lora_delta(w, shape), atol=2e-6, rtol=1e-3)
    assert main(["resize", back, small, "--rank", "1", "--layers", "-1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resized 5 layers from rank <= 2 to fixed rank 1")
    assert set(load_safetensors(small)[0]) == set(load_safetensors(back)[0])  # same names
    assert main(["inspect", back, "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["family"].startswith("sdxl"), info["family"]  # kohya: sdxl_base_v1-0
    blocks = {row["block"] for row in info["blocks"]}
    assert {"text_encoder_1:layers_0", "text_encoder_2:layers_1", "unet:down_blocks_1",
            "unet:up_blocks_0", "unet:down_blocks_0"} <= blocks, blocks
    assert main(["inspect", baked, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"].startswith("sdxl")


def test_checkpoint_merge_per_block_and_encoders(sdxl, capsys):
    from tsuika.trainers.ops.checkpoint_merge import classify

    path, _, _, lora, folder = sdxl
    tuned = folder / "tuned.safetensors"
    if not tuned.exists():
        assert main(["bake", str(path), str(lora), str(tuned), "--save-dtype", "fp32"]) == 0
    merged = folder / "merged.safetensors"
    assert main(["merge", str(path), str(tuned), str(merged), "--ratios", "0 in3-5=1 te=0.5",
                 "--save-dtype", "fp32"]) == 0
    capsys.readouterr()
    a, _ = load_safetensors(path)
    b, _ = load_safetensors(tuned)
    m, meta = load_safetensors(merged)
    assert set(m) == set(a) and meta["tsuika.tool"] == "merge"
    changed = {k for k in a if not torch.equal(a[k].float(), b[k].float())}
    parts = {classify(k)[0] for k in changed}
    assert parts == {"unet", "te"}, parts
    # conditioner.embedders.0 (te1) and .1 (te2) both get te=0.5, as SDXL's keys
    assert any(k.startswith("conditioner.embedders.0.") for k in changed)
    assert any(k.startswith("conditioner.embedders.1.") for k in changed)
    for k in changed:
        part, block = classify(k)
        want = b[k].float() if block is not None and block[0] == "in" and 3 <= block[1] <= 5 \
            else 0.5 * (a[k].float() + b[k].float()) if part == "te" else a[k].float()
        torch.testing.assert_close(m[k].float(), want, atol=1e-6, rtol=1e-5, msg=k)
    # the tiny UNet (one layer per block): down_blocks.1 is input_blocks.3, taken from B
    assert any(classify(k)[1] == ("in", 3) for k in changed)


def test_lora_merge_and_comfy_native_resize_keep_both_encoders(sdxl, capsys):
    from tsuika.trainers.tools.lora_any import ldm_to_diffusers_map

    path, bundle, lsd, lora, folder = sdxl
    merged = folder / "lora_merged.safetensors"
    assert main(["merge-lora", str(lora), str(lora), "--out", str(merged), "--weights",
                 "1,0.5", "--save-dtype", "fp32"]) == 0
    tensors, _ = load_safetensors(merged)
    assert {k.split("_", 2)[1] for k in tensors} == {"unet", "te1", "te2"}
    # the same LoRA in ComfyUI's own layout (LDM UNet names, clip_l / clip_g) -> kohya names
    to_ldm = {d: ldm for ldm, d in ldm_to_diffusers_map(bundle.unet.config).items()}
    comfy = {}
    for (comp, module), w in lsd.modules.items():
        body = (f"diffusion_model.{to_ldm[module]}" if comp == "unet" else
                "text_encoders.{}.transformer.text_model.{}".format(
                    "clip_l" if comp == "text_encoder_1" else "clip_g",
                    module.removeprefix("text_model.")))
        comfy |= {f"{body}.lora_down.weight": w.down, f"{body}.lora_up.weight": w.up,
                  f"{body}.alpha": torch.tensor(w.alpha)}
    native = save_safetensors(folder / "comfy_native.safetensors", comfy)
    out = folder / "from_comfy.safetensors"
    assert main(["resize", str(native), str(out), "--rank", "2", "--save-dtype", "fp32",
                 "--model", str(path)]) == 0
    assert set(load_safetensors(out)[0]) == set(load_safetensors(lora)[0])
