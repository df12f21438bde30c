"""LoRA + LoRA merges: concatenated ranks are exact, SVD / TIES / DARE against their math."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from tsuika.trainers.formats.lora_state import LoraStateDict, LoraWeights
from tsuika.trainers.ops.extract import ExtractError, RankRule, low_rank
from tsuika.trainers.ops.lora_merge import merge_loras
from tsuika.trainers.ops.merge import lora_delta

SHAPE = torch.Size((8, 10))


def _lora(seed, rank, alpha, extra=False):
    g = torch.Generator().manual_seed(seed)
    mods = {("unet", "a"): LoraWeights(torch.randn(rank, 10, generator=g),
                                       torch.randn(8, rank, generator=g), alpha)}
    if extra:
        mods[("text_encoder", "b")] = LoraWeights(torch.randn(rank, 10, generator=g),
                                                  torch.randn(8, rank, generator=g), alpha)
    return LoraStateDict(mods)


def test_concat_is_the_exact_weighted_sum():
    l1, l2 = _lora(0, 2, 1.0, extra=True), _lora(1, 3, 6.0)
    out, reports = merge_loras([l1, l2], [0.5, -2.0], "concat")
    a = out.modules[("unet", "a")]
    assert a.rank == 5 and a.scale == 1.0
    want = 0.5 * lora_delta(l1.modules[("unet", "a")], SHAPE) - 2.0 * lora_delta(
        l2.modules[("unet", "a")], SHAPE)
    torch.testing.assert_close(lora_delta(a, SHAPE), want, atol=1e-5, rtol=1e-5)
    # a layer only the first LoRA has is kept, at its weight
    torch.testing.assert_close(lora_delta(out.modules[("text_encoder", "b")], SHAPE),
                               0.5 * lora_delta(l1.modules[("text_encoder", "b")], SHAPE))
    assert {r.rel_error for r in reports} == {0.0}


def test_svd_rerank_is_the_truncated_sum():
    l1, l2 = _lora(0, 3, 3.0), _lora(1, 3, 1.5)
    out, reports = merge_loras([l1, l2], [1.0, 1.0], "svd", RankRule("fixed", 2))
    total = lora_delta(l1.modules[("unet", "a")], SHAPE) + lora_delta(l2.modules[("unet", "a")],
                                                                       SHAPE)
    want, error = low_rank(total, RankRule("fixed", 2))
    torch.testing.assert_close(lora_delta(out.modules[("unet", "a")], SHAPE),
                               lora_delta(want, SHAPE), atol=1e-4, rtol=1e-4)
    assert out.modules[("unet", "a")].rank == 2
    assert reports[0].rel_error == pytest.approx(error, rel=1e-3)


def test_ties_is_peft_ties_on_the_deltas():
    l1, l2 = _lora(0, 3, 3.0), _lora(1, 3, 1.5)
    out, _ = merge_loras([l1, l2], [1.0, 0.7], "ties", RankRule("fixed", 8), density=0.4)
    deltas = [lora_delta(lo.modules[("unet", "a")], SHAPE) for lo in (l1, l2)]
    want = merge_utils.ties(deltas, torch.tensor([1.0, 0.7]), 0.4)
    torch.testing.assert_close(lora_delta(out.modules[("unet", "a")], SHAPE), want, atol=1e-4,
                               rtol=1e-4)


def test_dare_is_repeatable_by_seed():
    l1, l2 = _lora(0, 3, 3.0), _lora(1, 3, 1.5)
    runs = [merge_loras([l1, l2], [1.0, 1.0], "dare_ties", density=0.5, seed=s)[0]
            for s in (0, 0, 1)]
    d = [lora_delta(r.modules[("unet", "a")], SHAPE) for r in runs]
    assert torch.equal(d[0], d[1]) and not torch.allclose(d[0], d[2])


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "mean"}, "unknown"), ({"method": "ties", "density": 0.0}, "density"),
    ({"weights": [1.0]}, "one weight each")])
def test_bad_merges_are_refused(kwargs, match):
    loras = [_lora(0, 2, 1.0), _lora(1, 2, 1.0)]
    weights = kwargs.pop("weights", [1.0, 1.0])
    with pytest.raises(ExtractError, match=match):
        merge_loras(loras, weights, **kwargs)
    other = LoraStateDict({("unet", "a"): LoraWeights(torch.ones(2, 4), torch.ones(8, 2), 1.0)})
    with pytest.raises(ExtractError, match="different shapes"):
        merge_loras([loras[0], other], [1.0, 1.0])


def test_merge_lora_command(tmp_path, capsys):
    from tsuika.trainers.cli import main
    from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
    from tsuika.trainers.tools.lora_files import read_kohya_raw

    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    files = []
    for i, rank in enumerate((2, 4)):
        files.append(save_safetensors(tmp_path / f"l{i}.safetensors", {
            f"{name}.lora_down.weight": torch.randn(rank, 10, generator=g),
            f"{name}.lora_up.weight": torch.randn(8, rank, generator=g),
            f"{name}.alpha": torch.tensor(1.0)}, {"ss_network_dim": str(rank)}))
    out = tmp_path / "m.safetensors"
    assert main(["merge-lora", *map(str, files), "--out", str(out), "--weights", "1,0.5",
                 "--save-dtype", "fp32"]) == 0
    assert capsys.readouterr().out.startswith("merged 2 LoRAs (concat, weights 1, 0.5): 1 "
                                              "layers, rank <= 6")
    tensors, meta = load_safetensors(out)
    got = read_kohya_raw(tensors).modules[("unet", "down_blocks_0_attentions_0_proj_in")]
    srcs = [read_kohya_raw(load_safetensors(f)[0]).modules[
        ("unet", "down_blocks_0_attentions_0_proj_in")] for f in files]
    torch.testing.assert_close(lora_delta(got, SHAPE), lora_delta(srcs[0], SHAPE)
                               + 0.5 * lora_delta(srcs[1], SHAPE), atol=1e-5, rtol=1e-5)
    assert meta["tsuika.tool"] == "merge_lora" and meta["ss_network_dim"] == "6"
    assert main(["merge-lora", *map(str, files), "--out", str(tmp_path / "x.safetensors"),
                 "--weights", "1,a"]) == 2
    assert "--weights '1,a' must be comma-separated" in capsys.readouterr().err
