"""`tsuika bake | extract | resize` end to end on the tiny model, and their refusals."""

from __future__ import annotations

import pytest
import torch
from lora_made import random_lora

from tsuika.trainers.cli import main
from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
from tsuika.trainers.ops.merge import lora_delta

PATHS = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
         ("unet", "up_blocks.1.attentions.0.proj_in"),
         ("text_encoder", "encoder.layers.0.mlp.fc1")]


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    """A rank-2 LoRA on three layers of the tiny model, and the bundle it was made for."""
    from tsuika.trainers.families import load_model
    from tsuika.trainers.tools.lora_files import lora_tensors

    bundle = load_model(tiny_model["single_file"])
    lsd = random_lora(bundle, PATHS, rank=2, seed=3, alpha=1.0)
    folder = tmp_path_factory.mktemp("cli_tools")
    lora_path = save_safetensors(folder / "made.safetensors", lora_tensors(lsd, torch.float32))
    return bundle, lsd, lora_path, folder


def test_bake_then_extract_then_resize(tiny_model, made, capsys):
    from tsuika.trainers.tools.lora_files import read_lora_for

    bundle, lsd, lora_path, folder = made
    base = str(tiny_model["single_file"])
    baked, back, small = (str(folder / n) for n in ("baked.safetensors", "back.safetensors",
                                                     "small.safetensors"))
    assert main(["bake", base, str(lora_path), baked, "--strength", "0.5",
                 "--save-dtype", "fp32"]) == 0
    assert "baked 3 LoRA layers" in capsys.readouterr().out
    assert main(["extract", base, baked, back, "--rank", "2", "--save-dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("extracted 3 layers (fixed rank 2") and "rank 2 error" in out
    got = read_lora_for(bundle, back)
    assert set(got.modules) == set(lsd.modules)
    for key, w in lsd.modules.items():
        shape = bundle.components[key[0]].get_submodule(key[1]).weight.shape
        torch.testing.assert_close(lora_delta(got.modules[key], shape),
                                   0.5 * lora_delta(w, shape), atol=2e-6, rtol=1e-3)
    assert main(["resize", back, small, "--rank", "1", "--layers", "-1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resized 3 layers from rank <= 2 to fixed rank 1")
    assert out.count(" rank 1 error ") == 3
    tensors, meta = load_safetensors(small)
    downs = [t for k, t in tensors.items() if k.endswith("lora_down.weight")]
    assert len(downs) == 3 and {t.shape[0] for t in downs} == {1}
    assert {t.dtype for t in downs} == {torch.float16}
    assert meta["tsuika.tool"] == "resize" and meta["ss_network_dim"] == "1"
    assert 0.0 < float(meta["tsuika.rel_error"]) < 1.0


def test_tools_refuse_bad_input_with_one_line(tiny_model, made, capsys):
    _, _, lora_path, folder = made
    base = str(tiny_model["single_file"])
    existing = str(lora_path)
    assert main(["resize", existing, existing, "--rank", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["resize", existing, str(folder / "x.safetensors"), "--rank-mode", "energy",
                 "--value", "2"]) == 2
    assert "value = 2.0 must be in (0, 1]" in capsys.readouterr().err
    assert main(["extract", base, base, str(folder / "none.safetensors")]) == 2
    assert "do not differ" in capsys.readouterr().err
    assert not (folder / "none.safetensors").exists()
    assert main(["bake", base, base, str(folder / "bad.safetensors")]) == 2
    assert "not a LoRA layout" in capsys.readouterr().err
