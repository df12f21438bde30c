"""`inspect` reads kohya, LyCORIS, diffusers/peft and ComfyUI-native files and checkpoints;
the scrubber drops local paths and dataset tags and keeps the hyper-parameters."""

from __future__ import annotations

import json

import pytest
import torch

from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
from tsuika.trainers.tools.inspect import inspect_file, report_lines, scrub_file

G = torch.Generator().manual_seed(0)
Q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _r(*shape):
    return torch.randn(*shape, generator=G)


def _save(tmp_path, name, tensors, meta=None):
    return save_safetensors(tmp_path / f"{name}.safetensors", tensors, meta)


def test_kohya_lora_blocks_ranks_alphas_norms(tmp_path):
    down, up = _r(4, 32), _r(32, 4)
    path = _save(tmp_path, "k", {
        f"lora_unet_{Q}.lora_down.weight": down, f"lora_unet_{Q}.lora_up.weight": up,
        f"lora_unet_{Q}.alpha": torch.tensor(2.0),
        "lora_unet_up_blocks_1_resnets_0_conv1.lora_down.weight": _r(8, 16, 3, 3),
        "lora_unet_up_blocks_1_resnets_0_conv1.lora_up.weight": _r(16, 8, 1, 1),
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_down.weight": _r(4, 768),
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight": _r(64, 4)},
        {"ss_network_dim": "4", "ss_learning_rate": "0.0001"})
    info = inspect_file(path)
    assert (info["kind"], info["layout"], info["algorithm"]) == ("lora", "kohya", "locon")
    assert info["components"] == ["text_encoder", "unet"] and info["modules"] == 3
    assert info["family"] == "sd_v1 (768-wide text encoder)"
    rows = {r["block"]: r for r in info["blocks"]}
    q = rows["unet:down_blocks_0"]
    assert (q["ranks"], q["alphas"]) == ([4], [2.0])
    assert q["delta_norm"] == pytest.approx(float((up @ down).norm()) * 0.5, rel=1e-5)
    assert rows["unet:up_blocks_1"]["ranks"] == [8] and rows["text_encoder:layers_3"]
    text = "\n".join(report_lines(info))
    assert "unet:down_blocks_0: 1 modules, rank 4, alpha 2" in text
    assert "ss_learning_rate = 0.0001" in text and "warning" not in text


@pytest.mark.parametrize("layout,tensors,algorithm", [
    ("lycoris", {f"lora_unet_{Q}.hada_w1_a": _r(32, 6), f"lora_unet_{Q}.hada_w1_b": _r(6, 32),
                 f"lora_unet_{Q}.hada_w2_a": _r(32, 6), f"lora_unet_{Q}.hada_w2_b": _r(6, 32),
                 f"lora_unet_{Q}.alpha": torch.tensor(3.0)}, "loha"),
    ("lycoris", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w1": _r(4, 4),
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w2_a": _r(16, 5),
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w2_b": _r(5, 192)}, "lokr"),
    ("peft", {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": _r(4, 32),
              "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": _r(32, 4)}, "lora"),
    ("comfy", {"diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": _r(2, 32),
               "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": _r(32, 2)}, "lora"),
])
def test_other_layouts(tmp_path, layout, tensors, algorithm):
    info = inspect_file(_save(tmp_path, layout, tensors))
    assert (info["kind"], info["layout"], info["algorithm"]) == ("lora", layout, algorithm)
    assert info["modules"] == 1 and len(info["blocks"]) == 1
    rank = {"loha": 6, "lokr": 5}.get(algorithm, tensors[next(iter(tensors))].shape[0])
    assert info["blocks"][0]["ranks"] == [rank]
    if algorithm == "lokr":
        assert info["family"].startswith("sdxl")


def test_checkpoint_is_read_from_its_header(tiny_model):
    info = inspect_file(tiny_model["single_file"])
    assert info["kind"] == "checkpoint"
    assert info["parts"] == ["text encoder", "unet", "vae"]
    assert "family" in info


def test_scrub_drops_paths_and_tags_and_keeps_hyperparameters(tmp_path, capsys):
    from tsuika.trainers.cli import main

    meta = {"ss_dataset_dirs": json.dumps({"/home/me/secret/cats": {"n_repeats": 1}}),
            "ss_tag_frequency": json.dumps({"cats": {"my_cat": 3}}),
            "workflow": "{}", "ss_sd_model_name": "/home/me/models/base.safetensors",
            "ss_learning_rate": "0.0001", "ss_network_dim": "4"}
    tensors = {f"lora_unet_{Q}.lora_down.weight": _r(2, 32),
               f"lora_unet_{Q}.lora_up.weight": _r(32, 2)}
    path = _save(tmp_path, "private", tensors, meta)
    assert main(["inspect", str(path)]) == 0
    assert "warning: metadata holds local paths or dataset tags" in capsys.readouterr().out
    out = tmp_path / "clean.safetensors"
    assert main(["inspect", str(path), "--json", "--scrub", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.rindex("}") + 1])["layout"] == "kohya"
    got, clean = load_safetensors(out)
    assert not {"ss_dataset_dirs", "ss_tag_frequency", "workflow"} & set(clean)
    assert clean["ss_sd_model_name"] == "base.safetensors"
    assert clean["ss_learning_rate"] == "0.0001" and clean["ss_network_dim"] == "4"
    assert "/home/me" not in json.dumps(clean) and clean["tsuika.tool"] == "scrub"
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    with pytest.raises(FileExistsError):
        scrub_file(path, out)
