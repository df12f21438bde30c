"""SDXL single-file (sgm layout) <-> diffusers, detection, v-prediction from the file, and the
refusal of a LoRA made for the other family. Tiny models; full size on the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tsuika.trainers.families import ModelLoadError, detect_family, get_family, load_model
from tsuika.trainers.families.sd15 import read_config
from tsuika.trainers.fixtures import build_modules, write_fixture
from tsuika.trainers.formats import sdxl_checkpoint as sx
from tsuika.trainers.formats.lora_keys import ModuleIndex
from tsuika.trainers.formats.lora_layouts import read_lora
from tsuika.trainers.formats.lora_state import LoraFormatError
from tsuika.trainers.formats.safetensors_io import save_safetensors
from tsuika.trainers.ops.merge import MergeError, merge_lora

SHAPE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                "down_block_types", "up_block_types", "cross_attention_dim",
                "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "attention_head_dim")


@pytest.fixture(scope="module")
def tiny():
    unet, vae, (te1, te2), cfg = build_modules("sdxl_tiny", seed=0)
    return unet, vae, te1, te2, cfg


def _single(unet, vae, te1, te2, cfg, prediction_type="epsilon"):
    sd = sx.diffusers_to_sdxl(unet.state_dict(), vae.state_dict(), te1.state_dict(),
                              te2.state_dict(), unet.config, vae.config,
                              prediction_type=prediction_type)
    meta = sx.sdxl_metadata_hints(cfg["unet"], cfg["vae"], cfg["text_encoder"],
                                  cfg["text_encoder_2"])
    return sd, meta


def test_round_trip_is_bit_identical_and_configs_are_inferred(tiny):
    unet, vae, te1, te2, cfg = tiny
    sd, meta = _single(*tiny)
    conv = sx.sdxl_to_diffusers(sd, meta)
    for got, module in ((conv.unet, unet), (conv.vae, vae), (conv.text_encoder_1, te1),
                        (conv.text_encoder_2, te2)):
        want = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        assert set(got) == set(want), set(got) ^ set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    for name in SHAPE_FIELDS:
        assert conv.unet_config[name] == cfg["unet"][name], name
    for part, got in (("text_encoder", conv.text_encoder_1_config),
                      ("text_encoder_2", conv.text_encoder_2_config)):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                     "projection_dim", "intermediate_size"):
            assert got[name] == cfg[part][name], (part, name)
    assert conv.vae_config["scaling_factor"] == 0.13025
    assert conv.info["family"] == "sdxl" and conv.info["prediction_type"] == "epsilon"


def test_names_are_the_ones_comfyui_reads(tiny):
    """ComfyUI's SDXL class reads conditioner.embedders.0.transformer.text_model.* (CLIP-L),
    conditioner.embedders.1.model.* (OpenCLIP, fused in_proj, text_projection as x @ P) and
    the UNet's label_emb (supported_models.SDXL.process_clip_state_dict)."""
    unet, vae, te1, te2, cfg = tiny
    sd, _ = _single(*tiny)
    h = cfg["text_encoder_2"]["hidden_size"]
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj." \
           "weight" in sd
    fused = sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    layer = te2.text_model.encoder.layers[0].self_attn
    assert fused.shape == (3 * h, h)
    assert torch.equal(fused, torch.cat([layer.q_proj.weight, layer.k_proj.weight,
                                         layer.v_proj.weight]))
    assert torch.equal(sd["conditioner.embedders.1.model.text_projection"],
                       te2.text_projection.weight.t())
    assert torch.equal(sd["model.diffusion_model.label_emb.0.0.weight"],
                       unet.add_embedding.linear_1.weight)
    assert not any(k.startswith("cond_stage_model.") for k in sd)
    # The same text: the OpenCLIP layout computes what transformers does.
    ids = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    rebuilt = CLIPTextModelWithProjection(CLIPTextConfig(**sx.sdxl_to_diffusers(
        sd, _single(*tiny)[1]).text_encoder_2_config)).eval()
    missing, unexpected = rebuilt.load_state_dict(
        sx.open_clip_to_hf(sx.strip_prefix(sd, sx.TE2_PREFIX)), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    with torch.no_grad():
        assert torch.allclose(rebuilt(ids).text_embeds, te2(ids).text_embeds)


def test_real_sdxl_layout_round_trips_with_a_plain_first_level():
    """SDXL's first level has no attention and its depths differ per level."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=2, cross_attention_dim=48,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 3), attention_head_dim=(2, 2, 4),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 48,
        sample_size=16).eval()
    _, vae, (te1, te2), cfg = build_modules("sdxl_tiny")
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg["text_encoder_2"],
                                                        "hidden_size": 16,
                                                        "projection_dim": 16})).eval()
    sd = sx.diffusers_to_sdxl(unet.state_dict(), vae.state_dict(), te1.state_dict(),
                              te2.state_dict(), unet.config, vae.config)
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.2.attn2.to_k.weight" in sd
    conv = sx.sdxl_to_diffusers(sd, {**sx.sdxl_metadata_hints(
        unet.config, vae.config, te1.config, te2.config)})
    assert conv.unet_config["down_block_types"] == list(unet.config.down_block_types)
    assert conv.unet_config["transformer_layers_per_block"] == [1, 1, 3]
    assert conv.unet_config["addition_time_embed_dim"] == 8
    assert all(torch.equal(conv.unet[k], v) for k, v in unet.state_dict().items())


def test_full_size_shapes_infer_the_shipped_sdxl_configs():
    """No hints: SDXL base's head counts, depths and time-id width come from the rules."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_config("sdxl", "unet"))
        vae = AutoencoderKL.from_config(read_config("sdxl", "vae"))
        te1 = CLIPTextModel(CLIPTextConfig(**read_config("sdxl", "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**read_config("sdxl",
                                                                       "text_encoder_2")))
    sd = sx.diffusers_to_sdxl(unet.state_dict(), vae.state_dict(), te1.state_dict(),
                              te2.state_dict(), unet.config, vae.config)
    conv = sx.sdxl_to_diffusers(sd)
    for part, got in (("unet", conv.unet_config), ("vae", conv.vae_config),
                      ("text_encoder", conv.text_encoder_1_config),
                      ("text_encoder_2", conv.text_encoder_2_config)):
        for name, value in read_config("sdxl", part).items():
            if name.startswith("_") or name in ("architectures", "model_type", "attention_dropout",
                                                "dropout", "initializer_factor",
                                                "initializer_range", "pad_token_id",
                                                "transformer_layers_per_block"):
                continue
            assert got[name] == value, (part, name)
    assert conv.unet_config["transformer_layers_per_block"] == [1, 2, 10]
    assert len(conv.unet) == len(unet.state_dict())


def test_detect_family_and_load_from_the_weights(tmp_path):
    sdxl = write_fixture("sdxl-tiny", tmp_path / "xl")
    sd15 = write_fixture("sd15-tiny", tmp_path / "sd1")
    assert detect_family(sdxl["single_file"]).name == "sdxl"
    assert detect_family(sdxl["diffusers"]).name == "sdxl"
    assert detect_family(sd15["single_file"]).name == "sd15"
    assert detect_family(sd15["diffusers"]).name == "sd15"
    a, b = load_model(sdxl["single_file"]), load_model(sdxl["diffusers"])
    assert a.family == b.family == "sdxl" and len(a.text_encoders) == 2
    assert set(a.components) == {"unet", "text_encoder_1", "text_encoder_2"}
    for m1, m2 in zip((a.unet, a.vae, *a.text_encoders), (b.unet, b.vae, *b.text_encoders)):
        assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())


@pytest.mark.parametrize("how", ["v_pred key", "modelspec", "ss_v_parameterization", "none"])
def test_v_prediction_is_read_from_the_file(tiny, how):
    sd, meta = _single(*tiny)
    if how == "v_pred key":
        sd["v_pred"] = torch.tensor([])
        sd["ztsnr"] = torch.tensor([])
    elif how == "modelspec":
        meta["modelspec.prediction_type"] = "v"
    elif how == "ss_v_parameterization":
        meta["ss_v_parameterization"] = "True"
    bundle = get_family("sdxl").bundle_from_ldm(sd, meta)
    want = "epsilon" if how == "none" else "v_prediction"
    assert bundle.prediction_type == bundle.scheduler_config["prediction_type"] == want
    assert bundle.scheduler_config.get("rescale_betas_zero_snr", False) == (how == "v_pred key")


def test_v_prediction_export_writes_the_marker_comfyui_reads(tiny):
    sd, meta = _single(*tiny, prediction_type="v_prediction")
    assert "v_pred" in sd
    assert sx.sdxl_to_diffusers(sd, meta).info["prediction_type"] == "v_prediction"


def test_broken_files_are_named(tiny):
    sd, meta = _single(*tiny)
    no_g = {k: v for k, v in sd.items() if not k.startswith(sx.TE2_PREFIX)}
    with pytest.raises(sx.LdmCheckpointError, match="conditioner.embedders.1.model"):
        sx.sdxl_to_diffusers(no_g, meta)
    extra = dict(sd, **{sx.TE2_PREFIX + "transformer.resblocks.0.attn.bogus": torch.zeros(1)})
    with pytest.raises(sx.LdmCheckpointError, match="bogus"):
        sx.sdxl_to_diffusers(extra, meta)
    no_label = {k: v for k, v in sd.items() if "label_emb" not in k}
    with pytest.raises(ModelLoadError, match="label_emb"):
        get_family("sdxl").bundle_from_ldm(no_label, meta, source_name="x.safetensors")


# -- a LoRA of one family is refused on the other ------------------------------------------------
def _kohya_file(tmp_path, family_dir, component_prefix, metadata):
    module = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"lora_unet_{module}.lora_down.weight": torch.zeros(2, 32),
               f"lora_unet_{module}.lora_up.weight": torch.zeros(32, 2),
               f"lora_unet_{module}.alpha": torch.tensor(2.0),
               f"{component_prefix}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                   torch.zeros(2, 32),
               f"{component_prefix}text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
                   torch.zeros(32, 2),
               f"{component_prefix}text_model_encoder_layers_0_self_attn_q_proj.alpha":
                   torch.tensor(2.0)}
    path = tmp_path / f"{family_dir}.safetensors"
    save_safetensors(path, tensors, metadata)
    return path


@pytest.mark.parametrize("metadata", [{}, {"ss_base_model_version": "sd_v1"},
                                      {"modelspec.architecture": "stable-diffusion-v1/lora"}])
def test_an_sd1_lora_on_sdxl_is_refused_naming_both(tmp_path, metadata):
    _, _, (te1, te2), _ = build_modules("sdxl_tiny")
    unet = build_modules("sdxl_tiny")[0]
    models = {"unet": unet, "text_encoder_1": te1, "text_encoder_2": te2}
    path = _kohya_file(tmp_path, "sd1", "lora_te_", metadata)
    with pytest.raises(LoraFormatError, match="made for SD1.x .* model is SDXL"):
        read_lora(path, ModuleIndex.from_models(models))


def test_an_sdxl_lora_on_sd1_is_refused_in_reader_and_merge(tmp_path, tiny_model):
    sd1 = load_model(tiny_model["diffusers"])
    path = _kohya_file(tmp_path, "xl", "lora_te1_", {})
    with pytest.raises(LoraFormatError, match="made for SDXL .*lora_te|made for SDXL"):
        read_lora(path, ModuleIndex.from_models(sd1.components))
    # Read against its own family, then merged into the wrong one: refused, nothing changed.
    unet, _, (te1, te2), _ = build_modules("sdxl_tiny")
    lsd = read_lora(path, ModuleIndex.from_models(
        {"unet": unet, "text_encoder_1": te1, "text_encoder_2": te2}))
    before = sd1.unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q."
                                    "weight"].clone()
    with pytest.raises(MergeError, match="made for SDXL.*model is SD1.x"):
        merge_lora({"unet": sd1.unet}, lsd, family="sd15")
    with pytest.raises(MergeError, match="made for SDXL.*model is SD1.x"):
        merge_lora(sd1.components, lsd)
    assert torch.equal(before, sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                       .attn1.to_q.weight)


@pytest.mark.parametrize("layout", ["comfy", "peft"])
def test_sdxl_loras_of_other_layouts_map_to_both_encoders(layout):
    """ComfyUI names SDXL's pair clip_l / clip_g, diffusers text_encoder. / text_encoder_2.:
    both are our text_encoder_1 / text_encoder_2."""
    unet, _, (te1, te2), _ = build_modules("sdxl_tiny")
    index = ModuleIndex.from_models({"unet": unet, "text_encoder_1": te1, "text_encoder_2": te2})
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    names = {"comfy": ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer."),
             "peft": ("text_encoder.", "text_encoder_2.")}[layout]
    up, down = (".lora_up.weight", ".lora_down.weight") if layout == "comfy" else (
        ".lora_B.weight", ".lora_A.weight")
    tensors = {}
    for name in names:
        tensors[name + path + down] = torch.ones(2, 32)
        tensors[name + path + up] = torch.ones(32, 2)
    for index_or_none in (index, None):
        lsd = read_lora(tensors, index_or_none)
        assert lsd.components() == ["text_encoder_1", "text_encoder_2"], index_or_none
    merged = merge_lora({"text_encoder_1": te1, "text_encoder_2": te2}, read_lora(tensors, index))
    assert merged == 2
