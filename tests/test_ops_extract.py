"""Extracting a LoRA from a weight difference and resizing a LoRA: the SVD math on small
tensors, and the round trip train -> bake -> extract on the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from tsuika.trainers.formats.lora_state import LoraStateDict, LoraWeights
from tsuika.trainers.ops.extract import (
    ExtractError,
    RankRule,
    choose_rank,
    low_rank,
    resize_lora,
    summary,
)
from tsuika.trainers.ops.merge import lora_delta


def _rank_r(out, inp, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g) @ torch.randn(r, inp, generator=g)


def test_fixed_rank_recovers_a_matrix_of_that_rank_exactly():
    delta = _rank_r(12, 20, 3)
    weights, error = low_rank(delta, RankRule("fixed", 3))
    assert weights.rank == 3 and weights.alpha == 3.0  # scale 1: the file says the delta
    torch.testing.assert_close(lora_delta(weights, delta.shape), delta, atol=1e-4, rtol=1e-4)
    assert error < 1e-5
    # a lower rank leaves exactly the norm of the singular values dropped
    weights, error = low_rank(delta, RankRule("fixed", 1))
    s = torch.linalg.svdvals(delta)
    assert error == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)


def test_convolution_delta_becomes_a_locon_pair():
    delta = _rank_r(6, 4 * 9, 2).reshape(6, 4, 3, 3)
    weights, error = low_rank(delta, RankRule("fixed", 2))
    assert weights.down.shape == (2, 4, 3, 3) and weights.up.shape == (6, 2, 1, 1)
    torch.testing.assert_close(lora_delta(weights, delta.shape), delta, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule,expected", [
    (RankRule("fixed", 2), 2),
    (RankRule("fixed", 99), 5),                  # capped by the layer's own rank
    (RankRule("energy", 16, 0.5), 1),            # 8 / 16 = 0.5 reached by the first value
    (RankRule("energy", 16, 0.75), 2),           # (8 + 4) / 16
    (RankRule("energy", 2, 0.99), 2),            # the cap wins
    (RankRule("frobenius", 16, 0.9), 2),         # sqrt(80 / 86) = 0.965 >= 0.9 > sqrt(64/86)
    (RankRule("sv_ratio", 16, 4.0), 3),          # values >= 8 / 4 = 2
])
def test_rank_rules_count_singular_values(rule, expected):
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0])
    assert choose_rank(s, rule) == expected


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "mean"}, "unknown"), ({"rank": 0}, ">= 1"),
    ({"mode": "energy", "value": 1.5}, r"\(0, 1\]"), ({"mode": "sv_ratio", "value": 0.5}, ">= 1"),
])
def test_bad_rules_are_refused_naming_the_value(kwargs, match):
    with pytest.raises(ExtractError, match=match):
        RankRule(**kwargs)
    with pytest.raises(ExtractError, match="clamp_quantile"):
        low_rank(torch.ones(2, 2), RankRule(), clamp_quantile=0.0)


def test_clamp_bounds_the_factors():
    delta = _rank_r(30, 30, 4)
    delta[0, 0] += 50.0  # one outlier
    plain, _ = low_rank(delta, RankRule("fixed", 4))
    clamped, error = low_rank(delta, RankRule("fixed", 4), clamp_quantile=0.9)
    top = max(clamped.up.abs().max(), clamped.down.abs().max())
    assert top < max(plain.up.abs().max(), plain.down.abs().max())
    assert 0.0 < error < 1.0


def _lora(rank=6, alpha=3.0, conv=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    if conv:
        down, up = torch.randn(rank, 4, 3, 3, generator=g), torch.randn(8, rank, 1, 1, generator=g)
    else:
        down, up = torch.randn(rank, 10, generator=g), torch.randn(8, rank, generator=g)
    return LoraWeights(down, up, alpha)


@pytest.mark.parametrize("conv", [False, True])
def test_resize_equals_the_truncated_svd_of_the_full_delta(conv):
    w = _lora(conv=conv)
    shape = (8, 4, 3, 3) if conv else (8, 10)
    lsd = LoraStateDict({("unet", "a.b"): w}, {"ss_network_dim": "6"})
    out, reports = resize_lora(lsd, RankRule("fixed", 2))
    got = out.modules[("unet", "a.b")]
    assert got.rank == 2 and got.alpha == 2.0 and got.down.shape[1:] == w.down.shape[1:]
    full = lora_delta(w, shape)
    expected, expected_error = low_rank(full, RankRule("fixed", 2))
    torch.testing.assert_close(lora_delta(got, shape), lora_delta(expected, shape), atol=1e-4,
                               rtol=1e-4)
    assert reports[0].rel_error == pytest.approx(expected_error, rel=1e-3)
    assert out.metadata == lsd.metadata


def test_resize_never_grows_a_layer_and_dynamic_rules_shrink_it():
    lsd = LoraStateDict({("unet", "x"): _lora(rank=3)})
    out, _ = resize_lora(lsd, RankRule("fixed", 8))
    assert out.modules[("unet", "x")].rank == 3
    # a layer of true rank 1 stored at rank 4: the energy rule keeps 1
    w = LoraWeights(torch.ones(4, 5), torch.cat([torch.ones(6, 1), torch.zeros(6, 3)], 1), 4.0)
    out, reports = resize_lora(LoraStateDict({("unet", "y"): w}), RankRule("energy", 8, 0.99))
    assert out.modules[("unet", "y")].rank == 1 and reports[0].rel_error < 1e-5
    assert summary(reports)["layers"] == 1


# -- the acceptance round trip on the tiny model -------------------------------------------

def test_trained_lora_baked_then_extracted_gives_the_trained_deltas(tiny_model, image_folder,
                                                                    tmp_path):
    from tsuika.trainers.config import build_config
    from tsuika.trainers.families import load_model
    from tsuika.trainers.formats.safetensors_io import load_safetensors
    from tsuika.trainers.loop import train
    from tsuika.trainers.tools.bake import bake_file
    from tsuika.trainers.tools.lora_files import extract_file, read_lora_for

    rank = 4
    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path / "run", steps=4,
        **{"network.algorithm": "locon", "network.conv_rank": rank, "network.conv_alpha": 2,
           "network.train_text_encoder": "true", "train.learning_rate": 1e-2}))
    trained_file = train(cfg).file_path
    base_file = tiny_model["single_file"]

    baked = bake_file(base_file, trained_file, tmp_path / "baked.safetensors",
                      save_dtype="fp32").path
    got = extract_file(baked, base_file, tmp_path / "back.safetensors", RankRule("fixed", rank),
                       RankRule("fixed", rank), save_dtype="fp32")
    # (baked, original) as the issue words it: the delta from the baked model back is -delta
    assert got.headline.startswith("extracted")
    back = extract_file(base_file, baked, tmp_path / "fwd.safetensors", RankRule("fixed", rank),
                        RankRule("fixed", rank), save_dtype="fp32")

    bundle = load_model(base_file)
    trained = read_lora_for(bundle, trained_file)
    extracted = read_lora_for(bundle, back.path)
    negative = read_lora_for(bundle, got.path)
    assert set(extracted.modules) == set(trained.modules)
    comps = {c for c, _ in trained.modules}
    assert "text_encoder" in comps and any("resnets" in p for _, p in trained.modules)
    for key, w in trained.modules.items():
        shape = bundle.components[key[0]].get_submodule(key[1]).weight.shape
        want = lora_delta(w, shape)
        scale = float(want.abs().max())
        assert scale > 0, f"{key} was not trained"
        # float tolerance: W + delta is stored in fp32, so the difference read back carries
        # the rounding of W itself (a few ulps of the weight's largest value)
        weight = bundle.components[key[0]].get_submodule(key[1]).weight
        atol = 1e-4 * scale + 4 * torch.finfo(torch.float32).eps * float(weight.abs().max())
        torch.testing.assert_close(lora_delta(extracted.modules[key], shape), want,
                                   atol=atol, rtol=1e-3, msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(lora_delta(negative.modules[key], shape), -want,
                                   atol=atol, rtol=1e-3, msg=lambda m, key=key: f"{key}: {m}")
    assert max(r.rel_error for r in back.reports) < 1e-3
    _, meta = load_safetensors(back.path)
    assert meta["tsuika.tool"] == "extract" and str(tmp_path) not in str(meta)
    assert meta["ss_network_dim"] == str(rank)
