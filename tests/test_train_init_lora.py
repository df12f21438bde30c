"""Train on from an existing LoRA file (``network.init_lora``): the file's algorithm, rank,
alpha and layers are adopted (each change reported), step 0 of the run is the file (the
adapted UNet and text encoder give the outputs of the base model with the file merged), a
training run continues from it and counts its recorded steps on, and bad files are refused
naming the option."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_images, tiny_overrides

from tsuika.trainers.config import ConfigError, build_config
from tsuika.trainers.families import load_model
from tsuika.trainers.formats.lora_keys import ModuleIndex
from tsuika.trainers.formats.lora_layouts import read_lora
from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
from tsuika.trainers.init_lora import adopt_init_lora
from tsuika.trainers.loop import train
from tsuika.trainers.methods.algorithms import get_algorithm
from tsuika.trainers.methods.algorithms.base import export_kohya, inject
from tsuika.trainers.methods.lora import LoraMethod
from tsuika.trainers.ops.merge import merge_lora

FILES = {  # id -> the network the file was made with
    "lora-te": dict(algorithm="lora", rank=4, alpha=2.0, train_text_encoder=True),
    "locon": dict(algorithm="locon", rank=2, alpha=1.0, conv_rank=2, conv_alpha=2.0),
    "loha": dict(algorithm="loha", rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0),
    "lokr": dict(algorithm="lokr", rank=2, alpha=3.0, lokr_factor=2),
    "dora": dict(algorithm="dora", rank=4, alpha=4.0, train_text_encoder=True),
}


def _file(tiny_model, tmp_path, options: dict, steps: int = 7):
    """A LoRA-family file of random (non-zero) adapters on the tiny model, ``ss_steps`` set."""
    from tsuika.trainers.config import NetworkConfig

    net = NetworkConfig(**options)
    bundle = load_model(tiny_model["diffusers"])
    algorithm = get_algorithm(net.algorithm)
    comps = {c: m for c, m in bundle.components.items()
             if c == "unet" or net.train_text_encoder}
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for comp, module in comps.items():
            inject(algorithm, comp, module, net)
            for name, p in module.named_parameters():
                if algorithm.is_trained(name):
                    noise = torch.randn(p.shape, generator=gen)
                    p.copy_(p * (1 + 0.1 * noise) if "magnitude" in name else noise * 0.2)
    path = tmp_path / f"start_{net.algorithm}.safetensors"
    save_safetensors(path, export_kohya(algorithm, comps, torch.float32),
                     {"ss_steps": str(steps)})
    return path


@pytest.mark.parametrize("case", sorted(FILES))
def test_step_zero_is_the_file(case, tiny_model, tmp_path):
    path = _file(tiny_model, tmp_path, FILES[case])
    config = build_config(overrides=[f"network.init_lora={path}", "network.rank=16"])
    base = load_model(tiny_model["diffusers"])
    bundle = copy.deepcopy(base)
    notes, steps = adopt_init_lora(config, bundle)
    assert steps == 7
    want = FILES[case]
    for key, value in want.items():
        if key != "lokr_factor" or value != -1:
            assert getattr(config.network, key) == value, (key, notes)
    assert any("network.rank = 16 -> " in n for n in notes) == (want["rank"] != 16)
    LoraMethod().prepare(config, bundle)
    merged = copy.deepcopy(base)
    lsd = read_lora(path, ModuleIndex.from_models(base.components))
    merge_lora(merged.components, lsd)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, bundle.unet.config.cross_attention_dim, generator=gen)
    ids = torch.randint(2, 40, (1, 12), generator=gen)
    with torch.no_grad():
        for model in (bundle.unet, merged.unet, base.unet):
            model.eval()
        got = bundle.unet(x, 500, context).sample
        torch.testing.assert_close(got, merged.unet(x, 500, context).sample,
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, base.unet(x, 500, context).sample, atol=1e-4)
        if want.get("train_text_encoder"):
            te, te_merged = bundle.text_encoders[0], merged.text_encoders[0]
            torch.testing.assert_close(te(ids)[0], te_merged(ids)[0], rtol=1e-4, atol=1e-5)


def test_a_run_trains_on_from_the_file_and_counts_its_steps(tiny_model, tmp_path):
    path = _file(tiny_model, tmp_path, FILES["loha"])
    data = tmp_path / "data"
    make_images(data, n=1)
    messages = []

    from tsuika.trainers.callbacks import Callbacks

    class Listen(Callbacks):
        def on_message(self, text):
            messages.append(text)

    res = train(build_config(overrides=tiny_overrides(
        tiny_model["single_file"], data, tmp_path / "out", 2,
        **{"network.init_lora": str(path), "output.save_dtype": "fp32"})), Listen())
    tensors, meta = load_safetensors(res.file_path)
    start, _ = load_safetensors(path)
    assert tensors.keys() == start.keys()  # the same modules, LoHa keys
    assert any(not torch.equal(tensors[k], start[k]) for k in start)  # and it trained
    assert meta["ss_steps"] == "9"  # 7 in the file + 2 here
    assert any("network.algorithm = 'lora' -> 'loha'" in m for m in messages), messages
    assert any("7 steps already trained" in m for m in messages), messages


def test_bad_init_files_are_refused_naming_the_option(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="network.init_lora = .*not an existing"):
        adopt_init_lora(build_config(overrides=[f"network.init_lora={tmp_path / 'x.pt'}"]),
                        load_model(tiny_model["diffusers"]))
    with pytest.raises(ConfigError, match="network.method = 'dreambooth' trains no such"):
        build_config(overrides=["network.method=dreambooth", "network.init_lora=a.safetensors"])
    other = tmp_path / "other.safetensors"
    save_safetensors(other, {"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 4),
                             "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(4, 2)})
    with pytest.raises(ConfigError, match="network.init_lora = 'other.safetensors' cannot be "
                                          "read for this model"):
        adopt_init_lora(build_config(overrides=[f"network.init_lora={other}"]),
                        load_model(tiny_model["diffusers"]))
