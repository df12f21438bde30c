"""Where the model's parts live during a run, and in which dtype (trainers/model_placement.py):
frozen weights kept in bf16 on a CPU computing in fp32 (``train.frozen_weights``), a host's
model left in the host's dtypes, trained base weights never narrowed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

import tsuika.trainers.loop as loop_module
from tsuika.trainers.callbacks import Callbacks
from tsuika.trainers.config import build_config
from tsuika.trainers.device import Precision
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.methods import get_method
from tsuika.trainers.model_placement import ModelDtypes

CPU_FP32 = Precision(torch.device("cpu"), torch.float32)
CPU_BF16 = Precision(torch.device("cpu"), torch.bfloat16)
CUDA_BF16 = Precision(torch.device("cuda"), torch.bfloat16)
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("method, frozen, precision, loads, stored, load", [
    ("lora", "auto", CPU_FP32, True, BF16, BF16),  # a CPU without bf16 units
    ("lora", "compute", CPU_FP32, True, None, FP32),
    ("lora", "auto", CPU_FP32, False, None, FP32),  # a host's model stays as the host has it
    ("lora", "auto", CPU_BF16, True, None, BF16),  # stored == computed: nothing to cast
    ("lora", "auto", CUDA_BF16, True, None, BF16),
    ("lora", "bf16", CPU_FP32, True, BF16, BF16),
    ("textual_inversion", "auto", CPU_FP32, True, BF16, BF16),
    ("hypernetwork", "auto", CPU_FP32, True, BF16, BF16),
    ("dreambooth", "bf16", CPU_FP32, True, None, FP32),  # trained weights are never narrowed
])
def test_dtypes_for_each_method_device_and_choice(method, frozen, precision, loads, stored,
                                                  load):
    config = build_config(overrides=[f"network.method={method}",
                                     f"train.frozen_weights={frozen}"])
    dtypes = ModelDtypes.for_run(config, precision, get_method(method), loads_model=loads)
    assert dtypes.stored == stored
    assert dtypes.load == load


def _run(tiny_model, image_folder, out, monkeypatch, frozen):
    """A short LoRA run (UNet and text encoder); the dtypes its models had during the steps."""
    loaded, seen = [], {}
    real_load = loop_module.load_model
    monkeypatch.setattr(loop_module, "load_model",
                        lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])

    class Watch(Callbacks):
        def on_step(self, info):
            bundle = loaded[0]
            seen["unet"] = {p.dtype for p in bundle.unet.parameters() if not p.requires_grad}
            seen["te"] = {p.dtype for p in bundle.text_encoders[0].parameters()
                          if not p.requires_grad and p.dim() == 2}
            seen["trained"] = {p.dtype for p in bundle.unet.parameters() if p.requires_grad}

    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, out, steps=4,
        **{"train.frozen_weights": frozen, "network.train_text_encoder": "true"}))
    result = loop_module.train(cfg, Watch())
    return result, seen


def test_a_cpu_lora_run_keeps_frozen_weights_in_bf16_and_trains_like_the_fp32_one(
        tiny_model, image_folder, tmp_path, monkeypatch):
    narrow, seen = _run(tiny_model, image_folder, tmp_path / "bf16", monkeypatch, "auto")
    assert BF16 in seen["unet"] and BF16 in seen["te"]  # linears and convs stay bf16
    assert seen["trained"] == {FP32}  # the adapters train in fp32
    wide, seen_wide = _run(tiny_model, image_folder, tmp_path / "fp32", monkeypatch, "compute")
    assert seen_wide["unet"] == {FP32} and seen_wide["te"] == {FP32}
    # The same run on the bf16-rounded model: the LoRA it learns is the fp32 run's within
    # what rounding the base weights moves (about 0.4 % of each weight).
    a, b = load_safetensors(narrow.file_path)[0], load_safetensors(wide.file_path)[0]
    assert a.keys() == b.keys()
    ups = sorted(k for k in a if k.endswith("lora_up.weight"))
    got = torch.cat([a[k].float().flatten() for k in ups])
    want = torch.cat([b[k].float().flatten() for k in ups])
    assert want.norm() > 0  # the LoRA did train
    assert (got - want).norm() <= 0.05 * want.norm()
    assert all(torch.isfinite(torch.tensor(narrow.losses)))
