"""Resize and LoRA-merge take every layout ``read_lora`` takes (kohya, diffusers/peft,
ComfyUI-native) and write kohya names: one LoRA written by the test in each layout gives the
same kohya output, without a model (the released SD1.5 UNet's names) and with one."""

from __future__ import annotations

import pytest
import torch

from tsuika.trainers.formats.lora_state import LoraWeights
from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
from tsuika.trainers.ops.extract import RankRule
from tsuika.trainers.ops.merge import lora_delta
from tsuika.trainers.tools.lora_files import resize_file
from tsuika.trainers.tools.lora_merge import merge_lora_files

# (kohya name, peft key body, ComfyUI-native key body, out, in, conv) of the released SD1.5:
# names written out by hand (ComfyUI's LDM names; kohya's lora_te_text_model_ form).
SD15 = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q", 12, 10, False),
    ("lora_unet_down_blocks_0_resnets_0_conv1",
     "unet.down_blocks.0.resnets.0.conv1",
     "diffusion_model.input_blocks.1.0.in_layers.2", 8, 6, True),
    ("lora_unet_up_blocks_3_attentions_2_proj_out",
     "unet.up_blocks.3.attentions.2.proj_out",
     "diffusion_model.output_blocks.11.1.proj_out", 10, 10, False),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
     "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", 9, 9,
     False),
]
RANK = 4


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kohya, _, _, o, i, conv in SD15:
        k = [3, 3] if conv else []
        out[kohya] = (torch.randn(RANK, i, *k, generator=g), torch.randn(o, RANK,
                                                                        *([1, 1] * conv),
                                                                        generator=g) * 0.1)
    return out


def _write(folder, seed: int):
    """The same LoRA (alpha = rank: scale 1 in every layout) as kohya, peft and comfy files."""
    w = _weights(seed)
    kohya, peft, comfy = {}, {}, {}
    for name, pbody, cbody, *_ in SD15:
        down, up = w[name]
        kohya |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                  f"{name}.alpha": torch.tensor(float(RANK))}
        peft |= {f"{pbody}.lora_A.weight": down, f"{pbody}.lora_B.weight": up}
        comfy |= {f"{cbody}.lora_down.weight": down, f"{cbody}.lora_up.weight": up,
                  f"{cbody}.alpha": torch.tensor(float(RANK))}
    return {layout: save_safetensors(folder / f"{layout}{seed}.safetensors", t)
            for layout, t in (("kohya", kohya), ("peft", peft), ("comfy", comfy))}, w


def _deltas(path):
    """kohya name -> the module's delta (up @ down * alpha / rank)."""
    tensors, _ = load_safetensors(path)
    names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    out = {}
    for n in names:
        down, up = tensors[f"{n}.lora_down.weight"].float(), tensors[f"{n}.lora_up.weight"].float()
        w = LoraWeights(down, up, float(tensors[f"{n}.alpha"]))
        shape = (up.shape[0], *down.shape[1:])
        out[n] = lora_delta(w, shape)
    return out


def _expected(w, scale=1.0):
    return {n: scale * lora_delta(LoraWeights(d, u, float(RANK)), (u.shape[0], *d.shape[1:]))
            for n, (d, u) in w.items()}


@pytest.mark.parametrize("layout", ["kohya", "peft", "comfy"])
def test_resize_reads_every_layout_and_writes_kohya_names(tmp_path, layout):
    files, w = _write(tmp_path, 0)
    out = tmp_path / f"{layout}-r{RANK}.safetensors"
    result = resize_file(files[layout], out, RankRule("fixed", RANK), save_dtype="fp32")
    got = _deltas(result.path)
    assert set(got) == {row[0] for row in SD15}  # kohya names, text_model_ written out
    for name, want in _expected(w).items():  # same rank: the LoRA itself back
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-4)
    small = resize_file(files[layout], tmp_path / f"{layout}-r2.safetensors",
                        RankRule("fixed", 2), save_dtype="fp32")
    assert {r.rank for r in small.reports} == {2} and len(small.reports) == len(SD15)
    assert "resized 4 layers from rank <= 4 to fixed rank 2" in small.headline


def test_merge_mixes_layouts_into_one_kohya_lora(tmp_path):
    files_a, wa = _write(tmp_path, 1)
    files_b, wb = _write(tmp_path, 2)
    result = merge_lora_files([files_a["comfy"], files_b["peft"]], [1.0, 0.5],
                              tmp_path / "merged.safetensors", "concat", save_dtype="fp32")
    got = _deltas(result.path)
    ea, eb = _expected(wa), _expected(wb, 0.5)
    assert set(got) == set(ea)
    for name in ea:  # concat is exact: the weighted sum of the two deltas
        torch.testing.assert_close(got[name], ea[name] + eb[name], atol=1e-5, rtol=1e-4)
    _, meta = load_safetensors(result.path)
    assert meta["tsuika.tool"] == "merge_lora" and "comfy1.safetensors" in meta["tsuika.sources"]


def test_comfy_file_of_another_unet_needs_its_model(tiny_model, tmp_path):
    """The tiny UNet's LDM names differ from the released model's: without the model the
    stock map refuses them by name; with --model they map through its own UNet."""
    from tsuika.trainers.cli import main
    from tsuika.trainers.families import load_model
    from tsuika.trainers.formats.lora_keys import LoraKeyError, kohya_name
    from tsuika.trainers.tools.lora_any import ldm_to_diffusers_map

    bundle = load_model(tiny_model["single_file"])
    to_ldm = {d: ldm for ldm, d in ldm_to_diffusers_map(bundle.unet.config).items()}
    path = "mid_block.attentions.0.proj_out"
    weight = bundle.unet.get_submodule(path).weight
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2,
                                                                         generator=g)
    body = f"diffusion_model.{to_ldm[path]}"
    lora = save_safetensors(tmp_path / "tiny_comfy.safetensors",
                            {f"{body}.lora_down.weight": down, f"{body}.lora_up.weight": up,
                             f"{body}.alpha": torch.tensor(2.0)})
    out = tmp_path / "tiny_kohya.safetensors"
    assert main(["resize", str(lora), str(out), "--rank", "1",
                 "--model", str(tiny_model["single_file"])]) == 0
    tensors, _ = load_safetensors(out)
    assert set(tensors) == {f"{kohya_name('unet', path)}.{s}"
                            for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    bad = save_safetensors(tmp_path / "not_sd15.safetensors",
                           {"diffusion_model.input_blocks.99.1.proj_in.lora_down.weight": down,
                            "diffusion_model.input_blocks.99.1.proj_in.lora_up.weight": up})
    with pytest.raises(LoraKeyError, match="input_blocks.99.1.proj_in"):
        resize_file(bad, tmp_path / "x.safetensors", RankRule("fixed", 1))
