"""Checkpoint merge: per-block ratios, the three modes against whole-tensor math, streaming in
pieces, refusals before any work, and a merged tiny model that loads."""

from __future__ import annotations

import math

import pytest
import torch

from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
from tsuika.trainers.ops.checkpoint_merge import (
    BlockRatios,
    CheckpointMergeError,
    classify,
    slerp_coefficients,
)
from tsuika.trainers.tools import checkpoint_merge as cm

U = "model.diffusion_model."
KEYS = {f"{U}input_blocks.1.1.proj_in.weight": (6, 5), f"{U}input_blocks.4.0.conv.weight": (3, 4),
        f"{U}middle_block.1.weight": (7,), f"{U}output_blocks.2.0.weight": (4, 4),
        f"{U}time_embed.0.weight": (5, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (8, 4),
        "first_stage_model.decoder.conv_in.weight": (3, 3)}


def _ckpt(path, seed, extra=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(*s, generator=g) for k, s in KEYS.items()}
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(6).unsqueeze(0)
    tensors.update(extra or {})
    return save_safetensors(path, tensors, {"modelspec.title": f"seed{seed}"}), tensors


def test_block_ratios_most_specific_wins():
    r = BlockRatios.parse("0.5, te=0 in=0.3 in4-5=0.9 mid=0.7 out2=1 vae=0.25")
    assert r.ratio(f"{U}input_blocks.1.1.proj_in.weight") == 0.3
    assert r.ratio(f"{U}input_blocks.4.0.conv.weight") == 0.9
    assert r.ratio(f"{U}middle_block.1.weight") == 0.7
    assert r.ratio(f"{U}output_blocks.2.0.weight") == 1.0
    assert r.ratio(f"{U}output_blocks.3.0.weight") == 0.5
    assert r.ratio(f"{U}time_embed.0.weight") == 0.5
    assert r.ratio("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") == 0
    assert r.ratio("first_stage_model.decoder.conv_in.weight") == 0.25
    assert BlockRatios.parse("0.4").ratio("first_stage_model.x.weight") is None  # A's VAE
    assert BlockRatios.parse("unet=0.2").ratio(f"{U}out.2.weight") == 0.2
    assert classify("conditioner.embedders.0.transformer.text_model.x") == ("te", None)
    assert classify(f"{U}output_blocks.11.1.x") == ("unet", ("out", 11))


@pytest.mark.parametrize("text,match", [("in=abc", "'in=abc'"), ("bogus=1", "names are"),
                                        ("in5-2=1", "backwards")])
def test_bad_block_strings_name_the_entry(text, match):
    with pytest.raises(CheckpointMergeError, match=match):
        BlockRatios.parse(text)


def test_slerp_keeps_the_angle_and_interpolates_the_length():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    ca, cb = slerp_coefficients(float(a @ b), float(a.norm()), float(b.norm()), 0.5)
    mid = ca * a + cb * b
    assert float(mid.norm()) == pytest.approx(1.5)
    assert math.degrees(math.atan2(mid[1], mid[0])) == pytest.approx(45.0)
    assert slerp_coefficients(1.0, 1.0, 1.0, 0.3) == (0.7, 0.3)  # parallel: linear


@pytest.mark.parametrize("mode", ["weighted_sum", "add_difference", "slerp"])
def test_streamed_merge_equals_whole_tensor_math(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(cm, "PIECE", 5)  # every weight in several pieces
    monkeypatch.setattr(cm.TensorFile.pieces, "__defaults__", (5,))
    pa, ta = _ckpt(tmp_path / "a.safetensors", 0,
                   {f"{U}only_in_a.weight": torch.ones(3)})
    pb, tb = _ckpt(tmp_path / "b.safetensors", 1)
    pc, tc = _ckpt(tmp_path / "c.safetensors", 2)
    ratios = BlockRatios.parse("0.25 te=0.75 out=1")
    res = cm.merge_checkpoints(pa, pb, tmp_path / "m.safetensors", mode=mode, ratios=ratios,
                               path_c=pc if mode == "add_difference" else None)
    got, meta = load_safetensors(res.path)
    assert set(got) == set(ta)
    for key, a in ta.items():
        r = ratios.ratio(key)
        if not a.is_floating_point() or r is None or key not in tb:
            assert torch.equal(got[key], a), key  # copied from A: VAE, ids, A-only
            continue
        b = tb[key]
        if mode == "weighted_sum":
            want = (1 - r) * a + r * b
        elif mode == "add_difference":
            want = a + r * (b - tc[key])
        else:
            ca, cb = slerp_coefficients(float(a.double().flatten() @ b.double().flatten()),
                                        float(a.norm()), float(b.norm()), r)
            want = ca * a + cb * b
        torch.testing.assert_close(got[key], want, atol=1e-5, rtol=1e-5, msg=key)
    assert res.merged == 6 and res.copied == 3
    assert meta["tsuika.tool"] == "merge" and meta["modelspec.title"] == "seed0"
    assert str(tmp_path) not in meta["tsuika.sources"]


def test_refusals_come_before_any_work(tmp_path):
    pa, _ = _ckpt(tmp_path / "a.safetensors", 0)
    pb, _ = _ckpt(tmp_path / "b.safetensors", 1,
                  {f"{U}middle_block.1.weight": torch.zeros(9)})
    out = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointMergeError, match=r"middle_block.1.weight: shape \[7\]"):
        cm.merge_checkpoints(pa, pb, out)
    with pytest.raises(CheckpointMergeError, match="give checkpoint C"):
        cm.merge_checkpoints(pa, pb, out, mode="add_difference")
    with pytest.raises(CheckpointMergeError, match="unknown"):
        cm.merge_checkpoints(pa, pb, out, mode="average")
    with pytest.raises(FileExistsError, match="already exists"):
        cm.merge_checkpoints(pa, pa, pb)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["a.safetensors",
                                                                         "b.safetensors"]


def test_merged_tiny_models_load_as_a_model(tmp_path):
    from tsuika.trainers.families import load_model
    from tsuika.trainers.fixtures import write_fixture

    a = write_fixture("sd15-tiny", tmp_path / "a", seed=0)["single_file"]
    b = write_fixture("sd15-tiny", tmp_path / "b", seed=1)["single_file"]
    res = cm.merge_checkpoints(a, b, tmp_path / "m.safetensors", ratios="0.5 te=0",
                               save_dtype="fp16")
    merged = load_model(res.path)
    ma, mb = load_model(a), load_model(b)
    qa = ma.unet.get_submodule("down_blocks.0.attentions.0.proj_in").weight
    qb = mb.unet.get_submodule("down_blocks.0.attentions.0.proj_in").weight
    torch.testing.assert_close(merged.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
                               .weight, (qa + qb) / 2, atol=2e-3, rtol=2e-3)
    te = "encoder.layers.0.mlp.fc1"
    torch.testing.assert_close(merged.text_encoders[0].get_submodule(te).weight,
                               ma.text_encoders[0].get_submodule(te).weight, atol=1e-3,
                               rtol=1e-3)


def test_merge_command(tmp_path, capsys):
    from tsuika.trainers.cli import main

    pa, ta = _ckpt(tmp_path / "a.safetensors", 0)
    pb, tb = _ckpt(tmp_path / "b.safetensors", 1)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(pa), str(pb), str(out), "--ratios", "1 te=0",
                 "--save-dtype", "fp16"]) == 0
    assert capsys.readouterr().out.startswith("merged 6 weights (weighted_sum, ratios 1 te=0)")
    got, _ = load_safetensors(out)
    key = f"{U}input_blocks.1.1.proj_in.weight"
    assert got[key].dtype == torch.float16 and torch.equal(got[key], tb[key].half())
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(got[te], ta[te].half())
    assert main(["merge", str(pa), str(pb), str(out), "--ratios", "in=x"]) == 2
    assert "'in=x' is not 'name=number'" in capsys.readouterr().err
