"""The hypernetwork method (trainers/methods/hypernetwork.py): what its attention computes, what
it trains and leaves alone. The shared checks (falling loss, seed, resume, file read back) are
its row in test_train_matrix.py."""

from __future__ import annotations

import math

import pytest
import torch

from tsuika.trainers.config import ConfigError, build_config
from tsuika.trainers.families import load_model
from tsuika.trainers.methods import get_method
from tsuika.trainers.methods.base import MethodError
from tsuika.trainers.methods.hypernetwork import ATTR, HypernetworkModule


def _prepared(tiny_model, *options):
    bundle = load_model(tiny_model["diffusers"])
    config = build_config(overrides=["network.method=hypernetwork", *options])
    method = get_method("hypernetwork")
    method.validate(config, bundle)
    torch.manual_seed(0)
    return bundle, config, method, method.prepare(config, bundle)


def test_the_layers_follow_a1111s_structure():
    m = HypernetworkModule(8, (1, 2, 2, 1), "relu", layer_norm=True, dropout=True)
    kinds = [type(x).__name__ for x in m.linear]
    assert kinds == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "ReLU", "LayerNorm",
                     "Linear", "LayerNorm"]
    assert [m.linear[i].weight.shape for i in (0, 4, 7)] == [(16, 8), (16, 16), (8, 16)]
    assert all(float(m.linear[i].bias.detach().abs().max()) == 0 for i in (0, 4, 7))
    assert 0.005 < float(m.linear[4].weight.detach().std()) < 0.02  # "Normal": N(0, 0.01)


def test_attention_reads_keys_and_values_through_the_modules(tiny_model):
    bundle, _, _, groups = _prepared(tiny_model, "network.hypernetwork_activation=tanh")
    hn = getattr(bundle.unet, ATTR)
    for p in hn.parameters():
        p.data.normal_(0, 0.3)
    attn = bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=ctx)
        # By hand: keys from ctx + K(ctx), values from ctx + V(ctx) (ComfyUI's attn2 patch).
        k_mod, v_mod = hn.by_width["32"]
        q = attn.to_q(x)
        k, v = attn.to_k(ctx + k_mod(ctx)), attn.to_v(ctx + v_mod(ctx))
        h = attn.heads

        def split(t):
            return t.view(2, -1, h, t.shape[-1] // h).transpose(1, 2)

        w = torch.softmax(split(q) @ split(k).transpose(-1, -2)
                          / math.sqrt(k.shape[-1] // h), dim=-1)
        want = attn.to_out[0]((w @ split(v)).transpose(1, 2).reshape(2, -1, k.shape[-1]))
    assert torch.allclose(got, want, atol=1e-5)
    # The tiny UNet's first blocks are 32 wide like its context: self-attention of that width
    # is changed too, as in ComfyUI (matched by width); a 64-wide one is not.
    attn1 = bundle.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn1.to_k.in_features == 32
    wide = bundle.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert wide.to_k.in_features == 64 and "64" not in hn.by_width


def test_only_the_modules_train_and_the_file_names_are_a1111s(tiny_model):
    bundle, config, method, groups = _prepared(tiny_model)
    trained = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) in trained for p in bundle.unet.parameters() if p.requires_grad)
    assert not any(p.requires_grad for te in bundle.text_encoders for p in te.parameters())
    names = set(method.export(config, bundle, torch.float32))
    assert names == {f"32.{i}.linear.{j}.{w}" for i in (0, 1) for j in (0, 1)
                     for w in ("weight", "bias")}
    state = method.trainable_state(bundle)
    assert len(state) == len(names) and all(k.startswith(f"unet::{ATTR}.") for k in state)
    meta = method.file_metadata(config, bundle, {"modelspec.architecture": "x"})
    assert meta["hypernetwork.activation_func"] == '"linear"'
    assert meta["modelspec.architecture"] == "x/hypernetwork"


def test_bad_options_are_refused_before_work(tiny_model):
    with pytest.raises(ConfigError, match="hypernetwork_layers"):
        build_config(overrides=["network.hypernetwork_layers=1,x,1"])
    bundle = load_model(tiny_model["diffusers"])
    config = build_config(overrides=["network.method=hypernetwork",
                                     "network.train_text_encoder=true"])
    with pytest.raises(MethodError, match="train_text_encoder"):
        get_method("hypernetwork").validate(config, bundle)


def test_a_saved_file_applied_to_a_fresh_model_acts_as_the_trained_one(tiny_model, tmp_path):
    from tsuika.trainers.formats.hypernetwork import read_hypernetwork, write_hypernetwork
    from tsuika.trainers.methods.hypernetwork import apply_file

    bundle, config, method, _ = _prepared(tiny_model, "network.hypernetwork_layer_norm=true",
                                          "network.hypernetwork_activation=mish")
    for p in getattr(bundle.unet, ATTR).parameters():
        p.data.normal_(0, 0.2)
    path = write_hypernetwork(tmp_path / "h.safetensors", method.file(config, bundle))
    fresh = load_model(tiny_model["diffusers"])
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        plain = fresh.unet(x, 10, ctx).sample
        apply_file(fresh, read_hypernetwork(path))
        trained = bundle.unet.eval()(x, 10, ctx).sample
        applied = fresh.unet(x, 10, ctx).sample
    assert torch.allclose(applied, trained, atol=1e-5)
    assert not torch.allclose(applied, plain, atol=1e-3)
