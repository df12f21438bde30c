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


class _ConvNet(torch.nn.Module):
    """Every layer kind a UNet has: convs (one strided), a norm, linears with and without bias."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.lin = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):
        h = self.down(torch.nn.functional.silu(self.norm(self.conv(x))))
        return self.out(torch.nn.functional.gelu(self.lin(h.flatten(2).transpose(1, 2))))


def _bf16_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return _ConvNet().to(torch.bfloat16).requires_grad_(False)


def test_backward_through_a_bf16_stored_model_matches_the_cast_model_and_keeps_no_fp32_weights():
    stored = _bf16_net()
    cast = copy.deepcopy(stored).float()
    hooks = StoredDtype(stored, torch.float32)
    assert len(hooks.recast) == 4  # the convs and linears; the norm goes through hooks
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    x_cast = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = stored(x)
    y.square().sum().backward()
    cast(x_cast).square().sum().backward()
    assert torch.equal(y, cast(x_cast))
    assert torch.equal(x.grad, x_cast.grad)
    # What the graph kept of each conv / linear weight is the stored bf16 tensor, never an fp32
    # copy of it (that would be the whole model again in fp32 by the end of the forward pass).
    weights = {tuple(m.weight.shape) for m in hooks.recast}
    kept = [(t.dtype, tuple(t.shape)) for t in saved if tuple(t.shape) in weights]
    assert kept and all(dtype == torch.bfloat16 for dtype, _ in kept), kept


def test_a_lora_over_bf16_stored_layers_gets_the_gradients_it_gets_over_the_cast_layers():
    from peft import LoraConfig, inject_adapter_in_model

    def with_lora(net):
        net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin", "down"],
                                                 init_lora_weights=False), net)
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()  # trained weights are fp32, as the LoRA method keeps them
        return net

    stored, cast = _bf16_net(), _bf16_net().float()
    StoredDtype(stored, torch.float32)  # before the adapters, as the loop does
    stored, cast = with_lora(stored), with_lora(cast)
    cast.load_state_dict(stored.state_dict())  # the same adapter weights on both
    x = torch.randn(2, 4, 9, 9)
    stored(x).square().sum().backward()
    cast(x).square().sum().backward()
    grads = {n: p.grad for n, p in stored.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in cast.named_parameters() if p.requires_grad}
    assert grads.keys() == want.keys() and len(grads) == 4
    for n in grads:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-6, atol=1e-7, msg=n)


def test_remove_gives_the_layers_their_own_forward_back():
    net = _bf16_net()
    hooks = StoredDtype(net, torch.float32)
    assert net(torch.randn(1, 4, 5, 5)).dtype == torch.float32
    hooks.remove()
    assert not any("forward" in m.__dict__ for m in net.modules())
    assert net(torch.randn(1, 4, 5, 5).bfloat16()).dtype == torch.bfloat16


def test_a_layer_unfrozen_after_the_hooks_trains_in_the_compute_dtype():
    net = _bf16_net()
    hooks = StoredDtype(net, torch.float32)
    net.down.requires_grad_(True)  # a method that trains a base layer itself
    net.norm.requires_grad_(True)
    assert hooks.release_trained() == 2
    assert net.down.weight.dtype == net.norm.weight.dtype == torch.float32
    assert "forward" not in net.down.__dict__ and "forward" in net.lin.__dict__
    net(torch.randn(1, 4, 9, 9)).sum().backward()
    assert net.down.weight.grad is not None and net.norm.weight.grad is not None
    assert net.lin.weight.grad is None and net.lin.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("stride,bias", [(1, True), (2, False)])
def test_a_conv_larger_than_a_chunk_runs_in_slices_with_the_cast_convs_results(monkeypatch,
                                                                              stride, bias):
    """A weight larger than ``CONV_CHUNK`` is cast and convolved a slice of output channels
    at a time; backward, the slices' input gradients are summed. Each forward output element
    is still one oneDNN sum over the same terms (only the blocking oneDNN picks for a slice may
    reorder it); the input gradient adds its slices' partial sums in another order. On the
    project's CPU the forward pass came out bit for bit (SD1.5's 1280->1280 and 2560->1280
    convs too); the bound here is fp32 rounding over a few hundred terms (1e-5 of the scale),
    so that another CPU's blocking does not fail it."""
    from tsuika.trainers.device import stored_dtype

    torch.manual_seed(4)
    stored = torch.nn.Conv2d(24, 40, 3, stride=stride, padding=1, bias=bias)
    stored = stored.to(torch.bfloat16).requires_grad_(False)
    cast = copy.deepcopy(stored).float()
    monkeypatch.setattr(stored_dtype, "CONV_CHUNK", 40 * 24 * 9 // 2)  # half the weight
    assert stored_dtype._spans(stored.weight, 1) == [(0, 20), (20, 40)]
    calls = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(stored_dtype.F, "conv2d", lambda *a, **k: calls.append(a[1].shape)
                        or real(*a, **k))
    StoredDtype(stored, torch.float32)
    x = torch.randn(2, 24, 9, 9, requires_grad=True)
    x_cast = x.detach().clone().requires_grad_(True)
    y = stored(x)
    assert [s[0] for s in calls] == [20, 20]  # two slices of output channels
    y.square().sum().backward()
    y_cast = cast(x_cast)
    y_cast.square().sum().backward()
    for ours, want in ((y, y_cast), (x.grad, x_cast.grad)):
        scale = want.abs().max().item()
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5 * scale)
    assert stored.weight.dtype == torch.bfloat16  # nothing cast was kept on the layer


def test_an_embedding_looks_up_its_stored_rows_then_casts_them():
    """The lookup gives the cast table's rows bit for bit, without casting the whole table
    (CLIP's is 49408 x 768: 150 MB in fp32 every text-encoder pass)."""
    stored = _encoder()
    table = stored.get_input_embeddings()
    want = table.weight.float()[torch.tensor([[5, 999, 0]])]
    hooks = StoredDtype(stored, torch.float32)
    assert table in hooks.recast
    casts = []
    real = torch.Tensor.to
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", lambda t, *a, **k: casts.append(t.shape) or
                   real(t, *a, **k))
        got = table(torch.tensor([[5, 999, 0]]))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert casts == [(1, 3, 32)]  # the three rows, never the 1000-row table
    assert table.weight.dtype == torch.float16
