"""Frozen modules computing in another dtype than they are stored in (trainers/device/
stored_dtype.py): the outputs of a cast module, with no second copy of its weights."""

import copy

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from tsuika.trainers.device.stored_dtype import StoredDtype


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
                         hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg).half().requires_grad_(False).eval()


def test_an_fp16_stored_encoder_gives_the_fp32_cast_encoders_outputs_bit_for_bit():
    stored = _encoder()
    cast = copy.deepcopy(stored).float()
    before = {n: (t.data_ptr(), t.dtype) for n, t in stored.state_dict().items()}
    hooks = StoredDtype(stored, torch.float32)
    assert hooks.layers > 0
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        ours = stored(ids, output_hidden_states=True)
        want = cast(ids, output_hidden_states=True)
    assert ours.text_embeds.dtype == torch.float32
    assert torch.equal(ours.text_embeds, want.text_embeds)
    assert torch.equal(ours.hidden_states[-2], want.hidden_states[-2])
    # The stored weights are the same tensors, in their own dtype, before and after the call.
    assert {n: (t.data_ptr(), t.dtype) for n, t in stored.state_dict().items()} == before
    hooks.remove()
    with torch.no_grad():
        assert stored(ids).text_embeds.dtype == torch.float16  # as it was without the hooks


def test_a_module_with_trained_weights_is_refused():
    enc = _encoder()
    enc.text_projection.requires_grad_(True)
    with pytest.raises(ValueError, match=r"'text_projection.weight' .* require grad: cast"):
        StoredDtype(enc, torch.float32)


def test_a_layer_that_raises_gets_its_stored_weights_back():
    layer = torch.nn.Linear(4, 4).half().requires_grad_(False)
    weight = layer.weight
    StoredDtype(layer, torch.float32)
    with pytest.raises(RuntimeError):
        layer(torch.zeros(3, 5))  # wrong width
    assert layer.weight is weight and layer.weight.dtype == torch.float16
    assert torch.equal(layer(torch.ones(1, 4)), torch.nn.functional.linear(
        torch.ones(1, 4), weight.float(), layer.bias.float()))
