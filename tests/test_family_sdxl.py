"""SDXL's conditioning, proven against diffusers on the same random weights: both text
encoders, the pooled embedding and the size / crop time ids; the time ids of each training
sample; LoRA on the UNet and both encoders with their own learning rates; the fp32 VAE."""

from __future__ import annotations

import pytest
import torch
from conftest import make_images, tiny_overrides
from PIL import Image

from tsuika.trainers.config import ConfigError, build_config
from tsuika.trainers.data.buckets import resize_and_crop
from tsuika.trainers.families import get_family, load_model
from tsuika.trainers.families.sdxl import SdxlFamily, load_tokenizers
from tsuika.trainers.fixtures import build_modules, write_fixture
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.loop import train
from tsuika.trainers.methods.lora import LoraMethod

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return write_fixture("sdxl-tiny", tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    unet, vae, (te1, te2), cfg = build_modules("sdxl_tiny", seed=3)
    tok1, tok2 = load_tokenizers()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=tok1, tokenizer_2=tok2, unet=unet,
                                     scheduler=DDPMScheduler.from_config(cfg["scheduler"]))


def _bundle(pipe):
    from tsuika.trainers.families.base import ModelBundle

    return ModelBundle(family="sdxl", unet=pipe.unet, vae=pipe.vae,
                       text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
                       tokenizers=[pipe.tokenizer, pipe.tokenizer_2], scheduler_config={},
                       prediction_type="epsilon", source_name="pipe")


@torch.no_grad()
def test_text_conditioning_equals_diffusers_encode_prompt(pipe):
    prompts = ["a red circle on a blue field", "x"]
    ours = get_family("sdxl").encode_text(_bundle(pipe), prompts, CPU)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=CPU, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (2, 77, 64)  # 32 (CLIP-L) + 32 (G) wide
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=1e-6)


@torch.no_grad()
def test_prediction_equals_the_diffusers_unet_with_added_cond_kwargs(pipe, tmp_path):
    family, bundle = get_family("sdxl"), _bundle(pipe)
    # A 96x48 photo cropped into a 64x64 bucket: its real size and offset, not the bucket's.
    _, info = resize_and_crop(Image.new("RGB", (96, 48)), (64, 64), crop="center")
    cond = family.encode_text(bundle, ["a", "b"], CPU)
    ours_ids = torch.tensor([info.sdxl_time_ids()] * 2, dtype=torch.float32)
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    got = family.predict(bundle, noisy, t, {**cond, "time_ids": ours_ids})
    ids = pipe._get_add_time_ids((48, 96), (0, 32), (64, 64), torch.float32,
                                 text_encoder_projection_dim=32).repeat(2, 1)
    assert torch.equal(ids, ours_ids)
    embeds, _, pooled, _ = pipe.encode_prompt(["a", "b"], device=CPU,
                                              do_classifier_free_guidance=False)
    want = pipe.unet(noisy, t, encoder_hidden_states=embeds,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The time ids matter: without them (previews) the target size stands for all three.
    other = family.predict(bundle, noisy, t, cond)
    assert not torch.allclose(other, got)


@pytest.mark.parametrize("cache_latents", [True, False])
def test_each_sample_is_conditioned_on_its_own_size_and_crop(xl, tmp_path, monkeypatch,
                                                             cache_latents):
    data = tmp_path / "data"
    make_images(data, n=1, size=(96, 48))
    seen = []
    original = SdxlFamily.predict

    def spy(self, bundle, noisy, timesteps, cond, unet=None):
        seen.append(cond["time_ids"].clone())
        return original(self, bundle, noisy, timesteps, cond, unet)

    monkeypatch.setattr(SdxlFamily, "predict", spy)
    train(build_config(overrides=tiny_overrides(
        xl["single_file"], data, tmp_path / "out", 2, **{"data.cache_latents": cache_latents,
                                                         "data.buckets": False})))
    _, info = resize_and_crop(Image.open(data / "img_00.png"), (64, 64), crop="center")
    assert info.sdxl_time_ids() == (48, 96, 0, 32, 64, 64)
    assert len(seen) == 2 and all(s.tolist() == [list(info.sdxl_time_ids())] for s in seen)


def test_lora_on_the_unet_and_both_encoders_with_their_own_rates(xl, tmp_path):
    data = tmp_path / "data"
    make_images(data, n=1)
    config = build_config(overrides=tiny_overrides(
        xl["single_file"], data, tmp_path / "out", 2, **{
            "network.train_text_encoder": True, "train.text_encoder_lr": 2e-4,
            "train.text_encoder_2_lr": 1e-5}))
    groups = LoraMethod().prepare(config, load_model(xl["single_file"]))
    assert {g["name"]: g["lr"] for g in groups} == {
        "unet": 1e-3, "text_encoder_1": 2e-4, "text_encoder_2": 1e-5}
    res = train(config)
    tensors, meta = load_safetensors(res.file_path)
    prefixes = {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in tensors}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_self_attn_q_proj")
               for k in tensors)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    same = build_config(overrides=["train.text_encoder_lr=3e-4"]).train.text_encoder_lrs()
    assert same["text_encoder_2"] == same["text_encoder_1"] == 3e-4
    with pytest.raises(ConfigError, match="train.text_encoder_2_lr = -0.5"):
        build_config(overrides=["train.text_encoder_2_lr=-0.5"])


def test_the_vae_encodes_in_fp32_where_fp16_overflows(xl):
    """SDXL's VAE overflows in fp16 (activations past 65504). Tsuika keeps every VAE in fp32
    whatever the compute dtype, and encodes outside autocast: the latents stay finite."""
    bundle = load_model(xl["single_file"], dtype=torch.float16)
    assert bundle.unet.dtype == torch.float16 and bundle.vae.dtype == torch.float32
    vae = bundle.vae
    with torch.no_grad():  # crafted: weights fp16 holds, activations (27 x 5e3) it cannot
        vae.encoder.conv_in.weight.fill_(5e3)
        x = torch.ones(1, 3, 32, 32)
        half = vae.half().encode(x.half()).latent_dist.mean
        full = vae.float().encode(x).latent_dist.mean
    assert not torch.isfinite(half).all()
    assert torch.isfinite(full).all()


def test_previews_sample_on_sdxl(xl):
    """Previews pass no time ids: an uncropped image of the sampled size stands for them."""
    from tsuika.trainers.device import Precision
    from tsuika.trainers.sampling import sample_images

    bundle = load_model(xl["diffusers"])
    precision = Precision(device=CPU, compute_dtype=torch.float32)
    images = sample_images(get_family("sdxl"), bundle, ["a red circle"], precision, size=64,
                           steps=2)
    assert len(images) == 1 and images[0].size == (64, 64)


def test_a_sharded_diffusers_folder_streams_every_component_into_the_load_dtype(pipe, tmp_path,
                                                                                monkeypatch):
    """``save_pretrained`` shards files over its limit (an fp32 SDXL UNet is 10 GB, past the
    default): those shards, and the second encoder's file, are read tensor by tensor into the
    load dtype instead of mapped whole by ``from_pretrained``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = tmp_path / "xl"
    pipe.save_pretrained(folder, max_shard_size="200KB")
    assert len(list((folder / "unet").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert len(list((folder / "text_encoder_2").glob("model-*.safetensors"))) > 1

    def refused(*args, **kwargs):
        raise AssertionError("from_pretrained maps whole files; the folder should stream")

    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection):
        monkeypatch.setattr(cls, "from_pretrained", refused)
    bundle = load_model(folder, "sdxl", dtype=torch.bfloat16)
    for ours, theirs in ((bundle.unet, pipe.unet), (bundle.text_encoders[1], pipe.text_encoder_2)):
        want = theirs.state_dict()
        got = ours.state_dict()
        assert got.keys() == want.keys()
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].bfloat16())
                   for k in want if want[k].is_floating_point())
    assert type(bundle.text_encoders[1]) is CLIPTextModelWithProjection
    assert next(bundle.vae.parameters()).dtype == torch.float32  # the VAE stays fp32
