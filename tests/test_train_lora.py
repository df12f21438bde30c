"""LoRA training on the tiny model: what is particular to LoRA files and to the loop's care around
them. The checks every method gets (falling loss, seed, resume, file read back) are in
test_train_matrix.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides

from tsuika.trainers.callbacks import Callbacks
from tsuika.trainers.config import build_config
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.loop import NonFiniteLoss, train


def _train(tiny_model, data, out, steps=4, callbacks=None, which="single_file", **extra):
    cfg = build_config(overrides=tiny_overrides(tiny_model[which], data, out, steps, **extra))
    return train(cfg, callbacks)


@pytest.mark.parametrize("which", ["single_file", "diffusers"])
def test_lora_trains_and_saves_kohya_keys(tiny_model, image_folder, tmp_path, which):
    res = _train(tiny_model, image_folder, tmp_path / "out", steps=3, which=which,
                 **{"network.train_text_encoder": "true", "network.alpha": 2})
    assert res.steps == 3 and all(map(lambda v: v == v and abs(v) < 1e6, res.losses))
    tensors, meta = load_safetensors(res.file_path)
    keys = set(tensors)
    assert ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
            ".lora_down.weight") in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {2.0}
    for k in alphas:
        base = k[: -len(".alpha")]
        assert tensors[base + ".lora_down.weight"].shape[0] == 4
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert str(tmp_path) not in json.dumps(meta), "absolute local paths leaked into metadata"
    for kind in ("loss_csv", "loss_plot", "config"):
        assert res.files[kind].is_file()


def test_nan_loss_stops_with_a_clear_message(tiny_model, image_folder, tmp_path, monkeypatch):
    from tsuika.trainers.families.sd15 import Sd15Family

    real, calls = Sd15Family.predict, []

    def goes_nan_at_step_3(self, *args):
        calls.append(1)
        out = real(self, *args)
        return out * float("nan") if len(calls) >= 3 else out

    monkeypatch.setattr(Sd15Family, "predict", goes_nan_at_step_3)
    with pytest.raises(NonFiniteLoss) as e:
        _train(tiny_model, image_folder, tmp_path / "out", steps=6,
               **{"output.save_every": 2})
    msg = str(e.value)
    assert "step 3" in msg and "tsuika_lora-step00000002.safetensors" in msg
    assert "learning_rate" in msg
    assert (tmp_path / "out" / "tsuika_lora-step00000002.safetensors").is_file()
    assert not (tmp_path / "out" / "tsuika_lora.safetensors").exists()


def test_existing_output_is_not_overwritten(tiny_model, image_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tsuika_lora.safetensors").write_bytes(b"user file")
    with pytest.raises(FileExistsError, match="output.overwrite"):
        _train(tiny_model, image_folder, out, steps=1)
    assert (out / "tsuika_lora.safetensors").read_bytes() == b"user file"


def test_latent_cache_is_reused_and_keyed_by_content(tiny_model, image_folder, tmp_path):
    messages = []

    class Listen(Callbacks):
        def on_message(self, text):
            messages.append(text)

    cache = tmp_path / "cache"
    kw = {"data.cache_dir": cache}
    _train(tiny_model, image_folder, tmp_path / "a", steps=1, callbacks=Listen(), **kw)
    _train(tiny_model, image_folder, tmp_path / "b", steps=1, callbacks=Listen(), **kw)
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(image_folder / "img_00.png")
    _train(tiny_model, image_folder, tmp_path / "c", steps=1, callbacks=Listen(), **kw)
    cache_lines = [m for m in messages if "latent cache" in m]
    assert "0 reused, 4 encoded" in cache_lines[0]
    assert "4 reused, 0 encoded" in cache_lines[1]
    assert "3 reused, 1 encoded" in cache_lines[2]


def test_packed_cpu_convs_train_like_plain_ones_and_leave_the_model_as_it_was(
        tiny_model, image_folder, tmp_path):
    from tsuika.trainers.device.cpu_conv import available
    from tsuika.trainers.families import load_model

    if not available():
        pytest.skip("torch without oneDNN ops: the packed path is off")
    runs = {}
    for px in (0, 4096):  # off; every conv of the 64 px tiny model packed
        bundle = load_model(tiny_model["diffusers"])
        convs = {k: v.clone() for k, v in bundle.unet.state_dict().items() if v.dim() == 4}
        cfg = build_config(overrides=tiny_overrides(
            tiny_model["diffusers"], image_folder, tmp_path / f"px{px}", 3,
            **{"train.cpu_prepack_pixels": px}))
        runs[px] = load_safetensors(train(cfg, bundle=bundle).file_path)[0]
        # the adapters stay injected: compare each base weight under its wrapped name
        after = {k.replace(".base_layer", ""): v for k, v in bundle.unet.state_dict().items()}
        for k, v in convs.items():
            assert torch.equal(after[k], v), f"{k} changed by a run with pixels={px}"
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[4096][k].float(), v.float(), rtol=1e-3, atol=1e-5,
                                   msg=k)


def test_locon_adds_the_convolutions_with_their_own_rank_and_alpha(tiny_model, image_folder,
                                                                   tmp_path):
    res = _train(tiny_model, image_folder, tmp_path / "out", steps=2,
                 **{"network.algorithm": "locon", "network.conv_rank": 2,
                    "network.conv_alpha": 0.5})
    tensors, meta = load_safetensors(res.file_path)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape[:2] == (2, 32)
    assert tensors[f"{conv}.lora_down.weight"].ndim == 4
    assert tensors[f"{conv}.lora_up.weight"].shape[1:] == (2, 1, 1)
    alpha = tensors[f"{conv}.alpha"]
    assert alpha.dtype == torch.float32 and float(alpha) == 0.5
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(tensors[f"{linear}.alpha"]) == 2.0
    assert tensors[f"{linear}.lora_down.weight"].shape[0] == 4
    assert meta["ss_conv_dim"] == "2" and meta["ss_conv_alpha"] == "0.5"
