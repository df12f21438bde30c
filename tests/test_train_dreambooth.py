"""DreamBooth (full fine-tuning) on the tiny model: trains the UNet itself, writes a checkpoint
our loader (and CheckpointLoaderSimple's layout) reads, keeps what it did not train; bf16
weights with stochastic rounding. The checks every method gets are in test_train_matrix.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from tsuika.trainers.callbacks import Callbacks
from tsuika.trainers.config import build_config
from tsuika.trainers.families import load_model
from tsuika.trainers.formats.ldm_unet_keys import META_TE_HEADS, META_UNET_HEADS
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.loop import train
from tsuika.trainers.methods import MethodError


class StopAt2(Callbacks):
    step = 0

    def on_step(self, info):
        self.step = info.step

    def should_stop(self):
        return self.step >= 2


def _train(tiny_model, data, out, steps=3, which="single_file", **extra):
    extra = {"network.method": "dreambooth", "output.save_dtype": "fp32", **extra}
    cfg = build_config(overrides=tiny_overrides(tiny_model[which], data, out, steps, **extra))
    return train(cfg)


@pytest.mark.parametrize("which", ["single_file", "diffusers"])
def test_dreambooth_writes_a_checkpoint_with_the_unet_trained_and_the_rest_kept(
        tiny_model, image_folder, tmp_path, which):
    res = _train(tiny_model, image_folder, tmp_path / "out", which=which)
    assert res.steps == 3 and all(v == v for v in res.losses)
    saved, meta = load_safetensors(res.file_path)
    original, _ = load_safetensors(tiny_model["single_file"])
    # The original single-file layout, key for key (what CheckpointLoaderSimple reads).
    assert set(saved) == set(original) - {k for k in original if k.endswith("position_ids")}
    unet = [k for k in saved if k.startswith("model.diffusion_model.")]
    changed = [k for k in unet if not torch.equal(saved[k], original[k].float())]
    assert len(changed) > len(unet) // 2, "most UNet tensors should have trained"
    for k in saved:
        if not k.startswith("model.diffusion_model."):
            assert torch.equal(saved[k], original[k].float()), f"{k} changed but was frozen"
    assert not any(k.startswith("ss_network_") for k in meta)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert {META_UNET_HEADS, META_TE_HEADS} <= set(meta)
    # Loads back as a model, and the trained weights are in it.
    bundle = load_model(res.file_path)
    key = changed[0]
    assert bundle.family == "sd15"
    # Its native size comes back too (the tiny model's 16, not SD1.5's 64): samplers use it.
    assert bundle.unet.config.sample_size == 16
    got = {k: v for k, v in bundle.unet.state_dict().items()}
    assert any(torch.equal(v.float(), saved[key].float()) for v in got.values()
               if v.shape == saved[key].shape)


def test_dreambooth_can_train_the_text_encoder_too(tiny_model, image_folder, tmp_path):
    res = _train(tiny_model, image_folder, tmp_path / "out",
                 **{"network.train_text_encoder": "true", "train.text_encoder_lr": 1e-3})
    saved, _ = load_safetensors(res.file_path)
    original, _ = load_safetensors(tiny_model["single_file"])
    te = [k for k in saved if k.startswith("cond_stage_model.") and "layers" in k]
    assert any(not torch.equal(saved[k], original[k].float()) for k in te)


def test_sdxl_dreambooth_writes_an_sdxl_single_file_that_loads_back_key_for_key(
        image_folder, tmp_path):
    """Both text encoders trained too: every tensor goes back to its sgm name, and our loader
    (which refuses missing or unexpected keys) rebuilds the trained model from the file."""
    from tsuika.trainers.fixtures import write_fixture

    xl = write_fixture("sdxl-tiny", tmp_path / "xl")
    res = _train(xl, image_folder, tmp_path / "out", **{
        "network.train_text_encoder": "true", "train.text_encoder_lr": 1e-3})
    saved, meta = load_safetensors(res.file_path)
    original, _ = load_safetensors(xl["single_file"])
    assert set(saved) == set(original)
    for prefix in ("model.diffusion_model.", "conditioner.embedders.0.transformer.text_model.",
                   "conditioner.embedders.1.model.transformer."):
        assert any(not torch.equal(saved[k], original[k]) for k in saved
                   if k.startswith(prefix)), f"nothing under {prefix} trained"
    assert all(torch.equal(saved[k], original[k]) for k in saved
               if k.startswith("first_stage_model."))
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    bundle = load_model(res.file_path)
    assert bundle.family == "sdxl" and bundle.extra["ldm_info"]["ignored_keys"] == []
    q = bundle.text_encoders[1].text_model.encoder.layers[0].self_attn.q_proj.weight
    fused = saved["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(q, fused[:q.shape[0]])


def test_dreambooth_refuses_a_model_it_cannot_write(tiny_model, image_folder, tmp_path,
                                                    monkeypatch):
    from tsuika.trainers.families.sdxl import SdxlFamily
    from tsuika.trainers.methods.dreambooth import DreamBoothMethod

    bundle = load_model(tiny_model["single_file"])
    bundle.family = "sdxl"
    monkeypatch.delattr(SdxlFamily, "checkpoint_tensors")  # a family with no checkpoint writer
    cfg = build_config(overrides=tiny_overrides(tiny_model["single_file"], image_folder,
                                                 tmp_path, 1, **{"network.method": "dreambooth"}))
    with pytest.raises(MethodError, match="network.method = 'dreambooth'.*'lora'"):
        DreamBoothMethod().validate(cfg, bundle)


def test_stepping_inside_the_backward_pass_trains_exactly_like_a_normal_step(
        tiny_model, image_folder, tmp_path):
    from tsuika.trainers.callbacks import Callbacks

    class Messages(Callbacks):
        lines: list[str] = []

        def on_message(self, text):
            self.lines.append(text)

    same = {"train.max_grad_norm": 0}  # a global norm and per-tensor norms differ by design
    cb = Messages()
    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path / "in", 3,
        **{"network.method": "dreambooth", "output.save_dtype": "fp32", **same}))
    inside = train(cfg, cb)
    assert any("inside the backward pass" in m for m in cb.lines), cb.lines
    outside = _train(tiny_model, image_folder, tmp_path / "out", steps=3,
                     **{"train.optimizer_in_backward": "off", **same})
    a, _ = load_safetensors(inside.file_path)
    b, _ = load_safetensors(outside.file_path)
    assert inside.losses == outside.losses
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)


def test_step_in_backward_on_says_what_stands_in_its_way(tiny_model, image_folder, tmp_path):
    from tsuika.trainers.config import ConfigError

    with pytest.raises(ConfigError, match="optimizer_in_backward = 'on'.*gradient_accumulation"):
        _train(tiny_model, image_folder, tmp_path / "o", steps=1,
               **{"train.optimizer_in_backward": "on", "train.gradient_accumulation": 2})


def test_stochastic_rounding_keeps_updates_a_bf16_weight_cannot_hold():
    from tsuika.trainers.optimizers import AdamWBf16, round_in_place

    x = torch.full((100_000,), 1.0 + 2 ** -10)  # a quarter of a bf16 step above 1.0
    rounded = round_in_place(x.clone(), salt=123)  # what AdamWBf16 does to every update
    assert torch.equal(rounded.bfloat16().float(), rounded), "not exactly a bf16 value"
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(float(rounded.mean()) - (1.0 + 2 ** -10)) < 2e-4  # unbiased
    exact = torch.tensor([0.5, -3.0, 1.0 + 2 ** -7])
    assert torch.equal(round_in_place(exact.clone(), 7), exact)

    # 100 AdamW steps of ~1e-4 each: far below half a bf16 step at 1.0 (2e-3).
    w = torch.nn.Parameter(torch.ones(50_000, dtype=torch.bfloat16))
    opt = AdamWBf16([w], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        w.grad = torch.ones_like(w)
        opt.step()
    assert abs(float(w.detach().float().mean()) - (1.0 - 100 * 1e-4)) < 1e-3
    plain = torch.nn.Parameter(torch.ones(10, dtype=torch.bfloat16))
    ref = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        plain.grad = torch.ones_like(plain)
        ref.step()
    assert torch.equal(plain.detach().float(), torch.ones(10)), "round-to-nearest stalls"


def test_bf16_dreambooth_trains_resumes_exactly_and_keeps_the_text_encoder_exact(
        tiny_model, image_folder, tmp_path):
    from tsuika.trainers.callbacks import TrainingStopped

    bf16 = {"train.mixed_precision": "bf16", "train.trained_weights": "bf16",
            "train.learning_rate": 1e-3}
    full = _train(tiny_model, image_folder, tmp_path / "full", steps=4, **bf16)
    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path / "cut", 4,
        **{"network.method": "dreambooth", "output.save_dtype": "fp32", **bf16}))
    with pytest.raises(TrainingStopped):
        train(cfg, StopAt2())
    resumed = _train(tiny_model, image_folder, tmp_path / "cut", steps=4,
                     **{"train.resume": "latest", **bf16})
    a, _ = load_safetensors(full.file_path)
    b, _ = load_safetensors(resumed.file_path)
    original, _ = load_safetensors(tiny_model["single_file"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert sum(not torch.equal(a[k], original[k].bfloat16().float()) for k in unet) > len(unet) // 2
    for k in a:
        if k.startswith("cond_stage_model."):
            assert torch.equal(a[k], original[k].float()), f"{k} lost precision"
