"""CUDA paths (run on a machine with a GPU; skipped, visibly, elsewhere)."""

import pytest
import test_train_matrix as matrix
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


# -- every method and algorithm on every family, on the GPU ----------------------------------
# The matrix's fixtures, shared by name: its rows (with the test-only method's registration)
# and each family's tiny model.
row, tiny, registered_dummy = matrix.row, matrix.tiny, matrix.registered_dummy


@cuda
def test_cuda_matrix_row_trains_in_bf16_and_reads_back(row, tiny, tmp_path):
    """The training matrix's rows (every method and LoRA algorithm) on each family's tiny
    model, on the GPU in bf16: a finite loss and a file our readers take."""
    from conftest import make_images

    data = tmp_path / "data"
    make_images(data)
    options = {**row.options, "output.save_dtype": "fp32", "train.device": "cuda",
               "train.mixed_precision": "bf16"}
    res = train(build_config(overrides=tiny_overrides(tiny["single_file"], data,
                                                      tmp_path / "out", steps=3, **options)))
    assert len(res.losses) == 3 and all(v == v and v < 1e3 for v in res.losses)
    assert row.read_back(res.file_path, tiny) > 0


@cuda
def test_cuda_previews_mid_run_with_vae_and_text_encoders_parked(tiny_model, image_folder,
                                                                 tmp_path):
    """The VAE leaves the GPU once the latents are cached and the text encoders once the
    captions are encoded: a preview mid-run and at the end must bring them back."""
    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path, steps=4,
        **{"train.device": "cuda", "train.mixed_precision": "bf16",
           "sample.prompts": '["a red circle"]', "sample.every": 2, "sample.steps": 2}))
    res = train(cfg)
    assert len(res.samples_before) == 1 and len(res.samples_after) == 1


@cuda
def test_cuda_offloaded_text_encoders_free_their_memory_during_steps(tiny_model, image_folder,
                                                                       tmp_path):
    """With train.offload_text_encoders the memory in use during the steps drops by the
    encoders' size; the losses are the same; the encoders end where they started."""
    from tsuika.trainers.callbacks import Callbacks
    from tsuika.trainers.families import load_model

    results = {}
    for on in (True, False):
        bundle = load_model(tiny_model["single_file"])
        te = bundle.text_encoders[0].to("cuda")
        te_bytes = sum(p.numel() * 2 for p in te.parameters())  # kept in bf16 on the GPU
        class During(Callbacks):
            in_use: list[int] = []

            def on_step(self, info):
                self.in_use.append(torch.cuda.memory_allocated())

        cfg = build_config(overrides=tiny_overrides(
            tiny_model["single_file"], image_folder, tmp_path / str(on), steps=4,
            **{"train.device": "cuda", "train.mixed_precision": "bf16",
               "train.offload_text_encoders": str(on).lower()}))
        res = train(cfg, During(), bundle=bundle)
        results[on] = (max(During.in_use), res.losses)
        assert next(te.parameters()).device.type == "cuda"
    assert results[True][0] <= results[False][0] - 0.9 * te_bytes
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-3)


@cuda
@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_cuda_adamw8bit(tiny_model, image_folder, tmp_path, method):
    """bitsandbytes' 8-bit AdamW (the optimizer state in 8 bits): trains, and the full
    fine-tune keeps fp32 master weights (bf16 weights are refused with it)."""
    pytest.importorskip("bitsandbytes", reason="adamw8bit needs bitsandbytes installed")
    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path, steps=4,
        **{"train.device": "cuda", "train.mixed_precision": "bf16", "network.method": method,
           "train.optimizer": "adamw8bit", "train.trained_weights": "fp32",
           "output.save_dtype": "fp32"}))
    res = train(cfg)
    assert all(v == v and v < 1e3 for v in res.losses)
    tensors, _ = load_safetensors(res.file_path)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
