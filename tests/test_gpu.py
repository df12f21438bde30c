"""CUDA paths (run on a machine with a GPU; skipped, visibly, elsewhere)."""

import pytest
import torch
from conftest import tiny_overrides

from tsuika.trainers.config import build_config
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.loop import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_cuda_training_in_each_precision(tiny_model, image_folder, tmp_path, precision):
    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path / precision, steps=6,
        **{"train.device": "cuda", "train.mixed_precision": precision,
           "network.train_text_encoder": "true"}))
    res = train(cfg)
    assert all(v == v and v < 1e3 for v in res.losses)
    tensors, _ = load_safetensors(res.lora_path)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and any(float(u.abs().sum()) > 0 for u in ups), "LoRA did not train"
    assert torch.cuda.max_memory_allocated() > 0


@cuda
def test_cuda_and_cpu_agree_on_the_first_loss(tiny_model, image_folder, tmp_path):
    losses = {}
    for dev in ("cpu", "cuda"):
        cfg = build_config(overrides=tiny_overrides(
            tiny_model["single_file"], image_folder, tmp_path / dev, steps=1,
            **{"train.device": dev, "train.mixed_precision": "no"}))
        losses[dev] = train(cfg).losses[0]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
