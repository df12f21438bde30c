"""LoHa, LoKr and DoRA: the file a peft-adapted layer exports, read back by our reader and
merged by ``ops.merge``, gives the adapted layer's own output (linear, 1x1 and 3x3
convolutions; LoKr with whole and low-rank factors); the keys are the LyCORIS names
ComfyUI's loader maps; the metadata says which algorithm made the file."""

from __future__ import annotations

import copy

import pytest
import torch
from test_formats_lora import _base_models

from tsuika.trainers.config import ConfigError, NetworkConfig, build_config
from tsuika.trainers.formats import lora_layouts as L
from tsuika.trainers.formats.kohya import kohya_tensors, module_tensors_of
from tsuika.trainers.formats.lora_keys import ModuleIndex
from tsuika.trainers.formats.lora_state import LohaWeights, LokrWeights, LoraWeights
from tsuika.trainers.methods.algorithms import get_algorithm
from tsuika.trainers.methods.algorithms.base import export_kohya, inject
from tsuika.trainers.ops.merge import merge_lora

CASES = {  # id -> network options
    "loha": dict(algorithm="loha", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0),
    "lokr-low-rank": dict(algorithm="lokr", rank=2, alpha=3.0, conv_rank=2, conv_alpha=1.0),
    "lokr-whole": dict(algorithm="lokr", rank=8, alpha=2.0),
    "lokr-factor": dict(algorithm="lokr", rank=2, alpha=2.0, lokr_factor=2),
    "dora": dict(algorithm="dora", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0),
}
SUFFIX = {"loha": "hada_w1_a", "lokr": "lokr_w2", "dora": "dora_scale"}


def _adapted(options: dict, seed: int = 3):
    """Base UNet + text encoder, a copy adapted by the algorithm with random (non-zero)
    adapter weights, and the network config."""
    net = NetworkConfig(train_text_encoder=True, **options)
    unet, te = _base_models()
    models = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te)}
    algorithm = get_algorithm(net.algorithm)
    for comp, module in models.items():
        inject(algorithm, comp, module, net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in models.values():
            for name, p in module.named_parameters():
                if algorithm.is_trained(name):
                    # Magnitudes near their start (||W||), the rest small and random.
                    noise = torch.randn(p.shape, generator=gen)
                    p.copy_(p * (1 + 0.1 * noise) if "magnitude" in name else noise * 0.3)
    return {"unet": unet, "text_encoder": te}, models, algorithm


def _inputs(layer: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    if isinstance(base, torch.nn.Conv2d):
        return torch.randn(2, base.in_channels, 6, 6, generator=gen)
    return torch.randn(3, base.in_features, generator=gen)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_file_gives_the_adapted_layers_output(case):
    base, adapted, algorithm = _adapted(CASES[case])
    tensors = export_kohya(algorithm, adapted, torch.float32)
    lsd = L.read_lora(tensors, ModuleIndex.from_models(base))
    merged = {c: copy.deepcopy(m) for c, m in base.items()}
    assert merge_lora(merged, lsd) == len(lsd.modules)
    layers = {(c, p): layer for c, m in adapted.items() for p, layer in
              algorithm.adapted_layers(m)}
    assert set(layers) == set(lsd.modules)
    kinds = {type(layer.get_base_layer()).__name__ + str(getattr(layer.get_base_layer(),
                                                                   "kernel_size", ""))
             for layer in layers.values()}
    if CASES[case].get("conv_rank"):
        assert "Conv2d(3, 3)" in kinds and "Conv2d(1, 1)" in kinds
    with torch.no_grad():
        for (comp, path), layer in layers.items():
            layer.eval()
            x = _inputs(layer)
            want = layer(x)
            got = merged[comp].get_submodule(path)(x)
            plain = base[comp].get_submodule(path)(x)
            assert not torch.allclose(want, plain, atol=1e-4), (comp, path)  # it adapts
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{comp}:{path}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_are_lycoris_names_and_read_back_exactly(case):
    base, adapted, algorithm = _adapted(CASES[case])
    tensors = export_kohya(algorithm, adapted, torch.float32)
    lsd = L.read_lora(tensors, ModuleIndex.from_models(base))
    algo = CASES[case]["algorithm"]
    allowed = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
               "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
               "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}}[algo]
    suffixes = {k.split(".", 1)[1] for k in tensors}
    assert suffixes <= allowed, suffixes - allowed
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    kind = {"loha": LohaWeights, "lokr": LokrWeights, "dora": LoraWeights}[algo]
    assert all(isinstance(w, kind) for w in lsd.modules.values())
    again = kohya_tensors({k: module_tensors_of(w) for k, w in lsd.modules.items()})
    assert again.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(again[k], v), k
    if algo == "dora":  # one magnitude per output channel, (out, 1[, 1, 1])
        for k, v in tensors.items():
            if k.endswith("dora_scale"):
                up = tensors[k.replace("dora_scale", "lora_up.weight")]
                assert v.shape == (up.shape[0], *[1] * (up.ndim - 1)), k
    if case == "lokr-whole":  # whole factors: scale folded into w1, alpha = rank (scale 1)
        whole = [k[: -len(".lokr_w2")] for k in tensors if k.endswith(".lokr_w2")]
        assert whole and all(tensors[f"{m}.alpha"].item() == 8.0 for m in whole)
    if case == "lokr-low-rank":
        assert "lokr_w2_a" in suffixes


def test_lokr_factor_shapes_the_small_factor():
    _, adapted, algorithm = _adapted(CASES["lokr-factor"])
    tensors = export_kohya(algorithm, adapted, torch.float32)
    w1 = [v for k, v in tensors.items() if k.endswith(".lokr_w1")]
    assert w1 and all(v.shape == (2, 2) for v in w1)


def test_the_file_says_which_algorithm_made_it():
    from tsuika.trainers.formats.metadata import read_metadata
    from tsuika.trainers.methods.lora import LoraMethod

    for algo, want in (("loha", {"algo": "loha"}), ("lokr", {"algo": "lokr", "factor": "-1"}),
                       ("dora", {"algo": "locon", "dora_wd": "True"})):
        config = build_config(overrides=[f"network.algorithm={algo}"])
        meta = read_metadata(LoraMethod().file_metadata(config, None, {}))
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert meta["ss_network_args"] == want
    plain = LoraMethod().file_metadata(build_config(overrides=[]), None, {})
    assert plain["ss_network_module"] == "networks.lora"


def test_options_the_algorithm_does_not_have_are_refused():
    with pytest.raises(ConfigError, match="network.dropout = 0.1.*loha"):
        build_config(overrides=["network.algorithm=loha", "network.dropout=0.1"])
    with pytest.raises(ConfigError, match="network.lokr_factor = 4 applies to .*'lokr' only"):
        build_config(overrides=["network.algorithm=lora", "network.lokr_factor=4"])
    with pytest.raises(ConfigError, match="network.lokr_factor = 0"):
        build_config(overrides=["network.algorithm=lokr", "network.lokr_factor=0"])
    assert build_config(overrides=["network.algorithm=dora", "network.dropout=0.1"])


def test_damaged_lycoris_modules_are_refused():
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    unet, te = _base_models()
    index = ModuleIndex.from_models({"unet": unet, "text_encoder": te})
    loha = {f"{name}.hada_w1_a": torch.zeros(32, 2), f"{name}.hada_w1_b": torch.zeros(2, 32),
            f"{name}.hada_w2_a": torch.zeros(32, 2)}
    with pytest.raises(L.LoraFormatError, match="LoHa module needs hada_w2_b"):
        L.read_lora(loha, index)
    with pytest.raises(L.LoraFormatError, match="do not fit"):
        L.read_lora({**loha, f"{name}.hada_w2_b": torch.zeros(3, 32)}, index)
    with pytest.raises(L.LoraFormatError, match="either lokr_w1 or both"):
        L.read_lora({f"{name}.lokr_w1_a": torch.zeros(4, 2), f"{name}.lokr_w2": torch.zeros(8, 8)},
                    index)
    lora = {f"{name}.lora_down.weight": torch.zeros(2, 32, 1, 1),
            f"{name}.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    with pytest.raises(L.LoraFormatError, match="dora_scale .* does not match"):
        L.read_lora({**lora, f"{name}.dora_scale": torch.ones(16, 1, 1, 1)}, index)
    with pytest.raises(L.LoraFormatError, match="mixes the keys"):
        L.read_lora({**lora, f"{name}.hada_w1_a": torch.zeros(32, 2)}, index)
    with pytest.raises(L.LoraFormatError, match="Tucker"):
        L.read_lora({**loha, f"{name}.hada_t1": torch.zeros(2, 2, 3, 3)}, index)


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_comfyui_native_names_read_the_same_modules(algo):
    """The same tensors under ComfyUI's own names (``text_encoders.clip_l.transformer.``)."""
    base, adapted, algorithm = _adapted(dict(algorithm=algo, rank=2, alpha=1.0))
    index = ModuleIndex.from_models(base)
    te_only = {(c, p): algorithm.module_tensors(layer, torch.float32)
               for c, p, layer in ((c, p, layer) for c, m in adapted.items()
                                   for p, layer in algorithm.adapted_layers(m))
               if c == "text_encoder"}
    kohya = L.read_lora(kohya_tensors(te_only), index)
    comfy = {f"text_encoders.clip_l.transformer.text_model.{p.removeprefix('text_model.')}."
             f"{suffix}": t for (_, p), parts in te_only.items() for suffix, t in parts.items()}
    native = L.read_lora(comfy, index)
    assert native.modules.keys() == kohya.modules.keys() and kohya.modules
    for key, w in kohya.modules.items():
        again = module_tensors_of(native.modules[key])
        assert all(torch.equal(t, again[s]) for s, t in module_tensors_of(w).items()), key
