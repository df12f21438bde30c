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
    tensors, _ = load_safetensors(res.file_path)
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


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_dreambooth_trains_the_unet(tiny_model, image_folder, tmp_path, precision):
    """bf16: bf16 weights, stochastic rounding and the step inside the backward pass on the
    GPU; fp16: fp32 master weights under the loss scaler, stepping after the backward."""
    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path / precision, steps=3,
        **{"train.device": "cuda", "train.mixed_precision": precision,
           "network.method": "dreambooth", "output.save_dtype": "fp32"}))
    res = train(cfg)
    assert all(v == v and v < 1e3 for v in res.losses)
    saved, _ = load_safetensors(res.file_path)
    original, _ = load_safetensors(tiny_model["single_file"])
    unet = [k for k in saved if k.startswith("model.diffusion_model.")]
    assert sum(not torch.equal(saved[k], original[k].float()) for k in unet) > len(unet) // 2
