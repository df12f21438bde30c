"""Merging a LoRA into weights gives the same outputs as running it as an adapter."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from tsuika.trainers.formats.lora_keys import ModuleIndex
from tsuika.trainers.formats.lora_layouts import LoraStateDict, LoraWeights, read_lora
from tsuika.trainers.methods.algorithms import get_algorithm
from tsuika.trainers.methods.algorithms.base import export_kohya
from tsuika.trainers.ops.merge import MergeError, merge_lora


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.proj = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


def _adapted(alpha: float, rank: int = 2):
    torch.manual_seed(0)
    base = Tiny()
    adapted = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=["conv", "proj"]),
        copy.deepcopy(base))
    with torch.no_grad():  # peft starts B at zero; give the adapter a real effect
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return base, adapted


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_merged_weights_match_the_adapter(strength):
    base, adapted = _adapted(alpha=4.0)
    # as training writes it and the quality scoring reads it back
    lsd = read_lora(export_kohya(get_algorithm("lora"), {"unet": adapted}, torch.float32),
                    ModuleIndex.from_models({"unet": base}))
    assert {w.alpha for w in lsd.modules.values()} == {4.0}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = base(x)
        full = adapted(x)
    assert merge_lora({"unet": base}, lsd, strength) == 2
    with torch.no_grad():
        merged = base(x)
    expected = before + strength * (full - before)  # both layers are linear in the delta here
    if strength == 1.0:
        torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(merged, full, atol=1e-3)
        # The conv feeds the linear, so half strength is not exactly halfway; it must move
        # towards the adapter, not away.
        assert (merged - before).norm() < (full - before).norm()
        assert torch.dot((merged - before).flatten(), (expected - before).flatten()) > 0


def test_a_mismatched_lora_changes_nothing():
    base, _ = _adapted(alpha=2.0)
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    lsd = LoraStateDict()
    lsd.add("unet", "proj", LoraWeights(torch.ones(2, 8), torch.ones(5, 2), 2.0), "test")
    lsd.add("unet", "missing", LoraWeights(torch.ones(2, 8), torch.ones(5, 2), 2.0), "test")
    with pytest.raises(MergeError, match="missing"):
        merge_lora({"unet": base}, lsd)
    bad_shape = LoraStateDict()
    bad_shape.add("unet", "proj", LoraWeights(torch.ones(2, 7), torch.ones(5, 2), 2.0), "test")
    with pytest.raises(MergeError, match="does not fit"):
        merge_lora({"unet": base}, bad_shape)
    with pytest.raises(MergeError, match="text_encoder"):
        te_only = LoraStateDict()
        te_only.add("text_encoder", "proj", LoraWeights(torch.ones(2, 8), torch.ones(5, 2), 2.0),
                    "test")
        merge_lora({"unet": base}, te_only)
    for k, v in base.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
