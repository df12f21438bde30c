"""Packed frozen convs (trainers.device.cpu_conv): same results and gradients as plain convs,
and every plain weight comes back bit-identical."""

from __future__ import annotations

import pytest
import torch

from tsuika.trainers.device import cpu_conv

pytestmark = pytest.mark.skipif(not cpu_conv.available(), reason="torch without oneDNN ops")


class Net(torch.nn.Module):
    """Convs of the kinds a UNet has: 3x3, strided 3x3 (downsample), 1x1 (shortcut), plus
    one trainable conv that must be left alone."""

    def __init__(self, dtype):
        super().__init__()
        self.a = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.down = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.short = torch.nn.Conv2d(16, 24, 1)
        self.big = torch.nn.Conv2d(24, 8, 3, padding=1, bias=False)
        self.trained = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.to(dtype).requires_grad_(False)
        self.trained.requires_grad_(True)

    def forward(self, x):
        return self.trained(self.big(self.short(self.down(self.a(x)))))


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.bfloat16, True)])
def test_packed_convs_match_plain_ones_and_restore_the_weights(dtype, autocast):
    torch.manual_seed(0)
    net = Net(dtype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 8, 8, 8, dtype=dtype)
    tol = {"rtol": 0, "atol": 1e-4} if dtype == torch.float32 and not autocast else \
        {"rtol": 2e-2, "atol": 5e-2}

    def run():
        xi = x.clone().requires_grad_(True)
        net.trained.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = net(xi)
        y.float().square().mean().backward()
        return y.detach().float(), xi.grad.float(), net.trained.weight.grad.float()

    plain = run()
    with cpu_conv.packed_frozen_convs(net, max_pixels=64) as packed:
        fast = run()
        # the 8x8 and 4x4 frozen convs are packed; the trainable one never is; a CPU whose
        # oneDNN cannot reorder this dtype (bf16 without AVX512) runs them all plain
        packable = cpu_conv.packs(dtype)
        assert set(packed) == ({"a", "down", "short", "big"} if packable else set()), packed
        assert (net.a.weight.numel() == 0) == packable  # set aside while packed
        fast_again = run()
    for p, f in zip(plain, fast):
        torch.testing.assert_close(f, p, **tol)
    for f, g in zip(fast, fast_again):
        torch.testing.assert_close(g, f, rtol=0, atol=0)  # deterministic once packed
    after = net.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def test_only_small_maps_are_packed_and_an_error_still_restores():
    net = Net(torch.float32)  # fp32: every oneDNN CPU packs it (bf16 needs AVX512)
    weight = net.a.weight.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_conv.packed_frozen_convs(net, max_pixels=16) as packed:
            net(torch.randn(1, 8, 8, 8))
            assert set(packed) == {"short", "big"}  # 4x4 maps; "a" and "down" see 8x8
            raise RuntimeError("boom")
    assert torch.equal(net.a.weight, weight) and net.short.weight.numel() == 24 * 16
    assert "forward" not in vars(net.a)  # the class's forward again


def test_a_call_in_another_dtype_falls_back_to_a_plain_conv():
    torch.manual_seed(1)
    net = Net(torch.float32)  # packed in fp32 by a first call, then called under bf16 autocast
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = net(x)
        with cpu_conv.packed_frozen_convs(net, max_pixels=64) as packed:
            net(x)
            assert "a" in packed
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = net(x)  # bf16 from the kept fp32 weights: the exact plain conv
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert net.a.weight.dtype == torch.float32 and net.a.weight.shape == (16, 8, 3, 3)


@pytest.mark.parametrize("sizes", [(8, 7), (7, 8), (8, 6)])
def test_maps_of_another_size_after_packing_still_get_exact_gradients(sizes):
    # Buckets change a conv's map size between steps; the strided conv's input gradient must
    # come back at each call's own input size.
    torch.manual_seed(2)
    net = Net(torch.float32)
    results = []
    for packed in (False, True):
        grads = []
        with cpu_conv.packed_frozen_convs(net, max_pixels=64 if packed else 0):
            for side in sizes:
                x = torch.randn(1, 8, side, side + 1, generator=torch.Generator().manual_seed(side),
                                requires_grad=True)
                net(x).square().mean().backward()
                grads.append(x.grad)
        results.append(grads)
    for plain, fast in zip(*results):
        assert plain.shape == fast.shape
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "lora"])
def test_convs_under_adapters_that_read_their_weight_stay_plain(kind):
    """LoHa / LoKr shape their update like the base conv's weight and DoRA takes its norm, so
    those convs are never packed (a packed conv's weight is an empty tensor: LoKr failed with
    "shape '[0]' is invalid" on the reference model's 1x1 proj_in); plain LoRA's still are,
    and every variant gives the same result packed as plain."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    torch.manual_seed(3)
    net = Net(torch.float32)
    config = {"loha": LoHaConfig(r=4, target_modules=["short"]),
              "lokr": LoKrConfig(r=4, target_modules=["short"]),
              "dora": LoraConfig(r=4, target_modules=["short"], use_dora=True),
              "lora": LoraConfig(r=4, target_modules=["short"])}[kind]
    net = inject_adapter_in_model(config, net)
    for name, p in net.named_parameters():  # a trained adapter: its update is not zero
        if "short" in name and p.requires_grad:
            p.data.normal_(0, 0.1)
    x = torch.randn(1, 8, 8, 8)
    plain = net(x).detach()
    with cpu_conv.packed_frozen_convs(net, max_pixels=64) as packed:
        fast = net(x).detach()
    assert ("short.base_layer" in packed) == (kind == "lora"), packed
    assert "a" in packed or not cpu_conv.packs(torch.float32)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
