"""SD1.x / SD2.x single-file (LDM layout) <-> diffusers conversion, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tsuika.trainers.families.sd15 import read_config
from tsuika.trainers.formats import ldm_checkpoint as ldm
from tsuika.trainers.formats.ldm_unet_keys import (
    CLIP_TEXT_KEY_PATTERN,
    unet_module_map,
    vae_module_map,
)

UNET_VARIANTS = {
    "two_levels": dict(block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8),
    "three_levels": dict(block_out_channels=(32, 32, 64), layers_per_block=2,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D",
                                         "CrossAttnUpBlock2D"),
                         attention_head_dim=(2, 4, 4), transformer_layers_per_block=2),
    "linear_projection": dict(block_out_channels=(32, 64), layers_per_block=1,
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                              attention_head_dim=(2, 4), use_linear_projection=True),
}
SHAPE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                "down_block_types", "up_block_types", "cross_attention_dim",
                "use_linear_projection", "transformer_layers_per_block")


def tiny_unet(variant: str = "two_levels", cross: int = 32, groups: int = 8, **extra):
    torch.manual_seed(0)
    return UNet2DConditionModel(cross_attention_dim=cross, norm_num_groups=groups,
                                sample_size=16, **{**UNET_VARIANTS[variant], **extra}).eval()


def tiny_vae(groups: int = 8):
    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=groups).eval()


def tiny_clip(hidden: int = 32, layers: int = 2, heads: int = 4, act: str = "quick_gelu"):
    torch.manual_seed(2)
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                            num_attention_heads=heads, vocab_size=1000,
                            max_position_embeddings=77, hidden_act=act, bos_token_id=0,
                            eos_token_id=2, pad_token_id=1)
    return CLIPTextModel(config).eval()


def to_single_file(unet, vae, te, **kw):
    """LDM state dict + the metadata hints a writer would store."""
    sd = ldm.diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te.state_dict(), unet.config,
                              vae.config, **kw)
    return sd, ldm.config_metadata_hints(unet.config, vae.config, te.config)


def assert_same_state(expected: dict, actual: dict):
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def to_open_clip(te: CLIPTextModel) -> dict:
    """SD2's OpenCLIP layout, written by hand from a CLIPTextModel (the test's own inverse)."""
    sd, p = te.state_dict(), "cond_stage_model.model."
    hidden = te.config.hidden_size
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"],
           p + "ln_final.bias": sd["final_layer_norm.bias"],
           p + "text_projection": torch.randn(hidden, 16), p + "logit_scale": torch.tensor(4.6)}
    for i in range(te.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
    return out


# -- key tables -----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [*UNET_VARIANTS, "sd15", "sd2_v"])
def test_unet_module_map_covers_every_parametrised_module(config):
    cfg = read_config(config, "unet") if config in ("sd15", "sd2_v") else {
        **UNET_VARIANTS[config], "cross_attention_dim": 32, "norm_num_groups": 8}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    modules = {k.rpartition(".")[0] for k in unet.state_dict()}
    table = unet_module_map(unet.config)
    assert set(table) == modules
    assert len(set(table.values())) == len(table)  # one-to-one


def test_unet_module_map_names_match_the_ldm_layout():
    table = unet_module_map(read_config("sd15", "unet"))
    assert table["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert table["conv_in"] == "input_blocks.0.0"
    assert table["time_embedding.linear_1"] == "time_embed.0"
    assert table["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert table["down_blocks.1.resnets.0.conv_shortcut"] == "input_blocks.4.0.skip_connection"
    assert table["mid_block.attentions.0.proj_in"] == "middle_block.1.proj_in"
    assert table["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert table["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert table["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"] == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k"
    assert table["conv_out"] == "out.2"


@pytest.mark.parametrize("cfg", [read_config("sd15", "vae"), dict(tiny_vae().config)])
def test_vae_module_map_covers_every_parametrised_module(cfg):
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    assert set(vae_module_map(vae.config)) == {k.rpartition(".")[0] for k in vae.state_dict()}


def test_unet_module_map_rejects_layouts_ldm_cannot_express():
    cfg = {**UNET_VARIANTS["two_levels"], "addition_embed_type": "text_time"}
    with pytest.raises(ldm.LdmCheckpointError, match="addition_embed_type"):
        unet_module_map(cfg)


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
def test_round_trip_is_bit_identical_and_configs_are_inferred(variant):
    unet, vae, te = tiny_unet(variant), tiny_vae(), tiny_clip()
    sd, meta = to_single_file(unet, vae, te)
    assert len(sd) == len(unet.state_dict()) + len(vae.state_dict()) + len(te.state_dict())
    conv = ldm.ldm_to_diffusers(sd, meta)
    assert_same_state(unet.state_dict(), conv.unet)
    assert_same_state(vae.state_dict(), conv.vae)
    assert_same_state(te.state_dict(), conv.text_encoder)
    assert conv.info["ignored_keys"] == []
    for name in SHAPE_FIELDS:
        original = unet.config[name]
        assert conv.unet_config[name] == (list(original) if isinstance(original, tuple)
                                          else original), name
    for name in ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                 "latent_channels", "norm_num_groups"):
        assert conv.vae_config[name] == (list(vae.config[name]) if name == "block_out_channels"
                                         else vae.config[name]), name
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                 "max_position_embeddings", "num_attention_heads", "hidden_act"):
        assert conv.text_encoder_config[name] == getattr(te.config, name), name


@pytest.mark.parametrize("variant", ["two_levels", "linear_projection"])
def test_rebuilt_models_give_the_same_outputs(variant):
    unet, vae, te = tiny_unet(variant), tiny_vae(), tiny_clip()
    sd, meta = to_single_file(unet, vae, te)
    conv = ldm.ldm_to_diffusers(sd, meta)
    unet2 = UNet2DConditionModel.from_config(conv.unet_config).eval()
    vae2 = AutoencoderKL.from_config(conv.vae_config).eval()
    te2 = CLIPTextModel(CLIPTextConfig(**conv.text_encoder_config)).eval()
    unet2.load_state_dict(conv.unet, strict=True)
    vae2.load_state_dict(conv.vae, strict=True)
    te2.load_state_dict(conv.text_encoder, strict=True)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (1, 7), generator=gen)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    image = torch.randn(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ctx, ctx2 = te(ids).last_hidden_state, te2(ids).last_hidden_state
        torch.testing.assert_close(ctx2, ctx, rtol=0, atol=0)
        torch.testing.assert_close(unet2(sample, 10, ctx).sample, unet(sample, 10, ctx).sample,
                                   rtol=0, atol=0)
        torch.testing.assert_close(vae2.decode(vae2.encode(image).latent_dist.mean).sample,
                                   vae.decode(vae.encode(image).latent_dist.mean).sample,
                                   rtol=0, atol=0)


def test_family_loader_takes_the_checkpoint_tensors_without_copying_them():
    from tsuika.trainers.families.sd15 import Sd15Family

    unet, vae, te = tiny_unet("two_levels"), tiny_vae(), tiny_clip()
    sd, meta = to_single_file(unet, vae, te)
    sd = {k: v.float().contiguous() for k, v in sd.items()}
    bundle = Sd15Family().bundle_from_ldm(sd, meta)
    pointers = {v.data_ptr() for v in sd.values()}
    params = [p for m in (bundle.unet, bundle.vae, *bundle.text_encoders) for p in m.parameters()]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    shared = sum(p.data_ptr() in pointers for p in params)
    # Most weights are the file's own tensors; attention and VAE-mid reshapes are new ones.
    assert shared >= 0.8 * len(params), (shared, len(params))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (1, 7), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(bundle.text_encoders[0](ids).last_hidden_state,
                                   te(ids).last_hidden_state, rtol=0, atol=0)
    fp16 = {k: v.half() for k, v in sd.items()}  # a half-precision file still loads as fp32
    half_bundle = Sd15Family().bundle_from_ldm(fp16, meta)
    assert {p.dtype for p in half_bundle.unet.parameters()} == {torch.float32}


def test_ldm_names_are_the_ones_comfyui_reads():
    sd, _ = to_single_file(tiny_unet(), tiny_vae(), tiny_clip())
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight",
                "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.down.0.block.0.conv1.weight",
                "first_stage_model.decoder.up.1.block.1.conv1.weight",
                "first_stage_model.decoder.conv_out.weight",
                "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in sd, key
    assert not any(k.startswith(("model.diffusion_model.down_blocks", "first_stage_model.encoder"
                                 ".down_blocks")) for k in sd)
    assert not any("position_ids" in k for k in sd)
    # LDM's VAE attention is 1x1 convolutions, diffusers' is Linear.
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert sd["first_stage_model.encoder.mid.attn_1.proj_out.weight"].ndim == 4


def test_text_encoder_with_text_model_prefix_and_old_layouts_are_accepted():
    unet, vae, te = tiny_unet(), tiny_vae(), tiny_clip()
    prefixed = {"text_model." + k: v for k, v in te.state_dict().items()}
    prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd = ldm.diffusers_to_ldm(unet.state_dict(), vae.state_dict(), prefixed, unet.config,
                              vae.config)
    meta = ldm.config_metadata_hints(unet.config, vae.config, te.config)
    # Very old SD1 files have no "text_model." level; both must read the same.
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."):
           v for k, v in sd.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    conv = ldm.ldm_to_diffusers(old, meta)
    assert_same_state(te.state_dict(), conv.text_encoder)
    assert conv.info["ignored_keys"] == ["cond_stage_model.transformer.embeddings.position_ids"]


def test_non_model_keys_are_ignored_and_listed_and_input_untouched():
    sd, meta = to_single_file(tiny_unet(), tiny_vae(), tiny_clip())
    extras = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.99),
              "cond_stage_model.transformer.text_model.embeddings.position_ids":
                  torch.arange(77)[None]}
    sd.update(extras)
    before = dict(sd)
    conv = ldm.ldm_to_diffusers(sd, meta)
    assert conv.info["ignored_keys"] == sorted(extras)
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)


# -- inference rules ------------------------------------------------------------------------------
def test_sd1_rules_apply_without_metadata():
    unet, te = tiny_unet(cross=768, groups=32), tiny_clip(hidden=768, layers=1, heads=12)
    sd = ldm.diffusers_to_ldm(unet.state_dict(), tiny_vae(32).state_dict(), te.state_dict(),
                              unet.config, tiny_vae(32).config)
    cfg = ldm.infer_sd_configs(sd)
    assert cfg.family == "sd1" and cfg.text_encoder_layout == "hf_clip"
    assert cfg.unet["attention_head_dim"] == 8
    assert cfg.text_encoder["num_attention_heads"] == 12
    assert cfg.text_encoder["hidden_act"] == "quick_gelu"
    assert cfg.unet["norm_num_groups"] == 32 and cfg.vae["norm_num_groups"] == 32
    assert any("SD1 rule" in r for r in cfg.rules)


def test_fallback_heads_and_groups_without_metadata():
    sd, _ = to_single_file(tiny_unet(groups=32), tiny_vae(32), tiny_clip())
    cfg = ldm.infer_sd_configs(sd)
    assert cfg.unet["attention_head_dim"] == [1, 1]  # 32 and 64 channels: 64-channel heads
    assert cfg.text_encoder["num_attention_heads"] == 1
    assert any("fallback" in r for r in cfg.rules)


def test_metadata_hints_win_and_bad_hints_fail():
    unet, vae, te = tiny_unet("three_levels"), tiny_vae(), tiny_clip()
    sd, meta = to_single_file(unet, vae, te)
    assert json.loads(meta["tsuika.unet_attention_head_dim"]) == [2, 4, 4]
    assert ldm.infer_sd_configs(sd, meta).unet["attention_head_dim"] == [2, 4, 4]
    with pytest.raises(ldm.LdmCheckpointError, match="tsuika.unet_attention_head_dim"):
        ldm.infer_sd_configs(sd, {**meta, "tsuika.unet_attention_head_dim": "eight"})
    with pytest.raises(ldm.LdmCheckpointError, match="norm_num_groups"):
        ldm.infer_sd_configs(sd, {**meta, "tsuika.vae_norm_num_groups": "48"})


def test_prediction_type_from_v_pred_key_and_metadata():
    unet, vae, te = tiny_unet(), tiny_vae(), tiny_clip()
    sd, meta = to_single_file(unet, vae, te, prediction_type="v_prediction")
    assert sd["v_pred"].numel() == 0
    conv = ldm.ldm_to_diffusers(sd, meta)
    assert conv.info["prediction_type"] == "v_prediction"
    assert conv.info["ignored_keys"] == ["v_pred"]
    plain, _ = to_single_file(unet, vae, te)
    assert ldm.infer_sd_configs(plain, meta).prediction_type == "epsilon"
    declared = {**meta, "modelspec.prediction_type": "v"}
    assert ldm.infer_sd_configs(plain, declared).prediction_type == "v_prediction"
    with pytest.raises(ldm.LdmCheckpointError, match="prediction_type"):
        to_single_file(unet, vae, te, prediction_type="flow")


# -- SD2 (OpenCLIP text tower) --------------------------------------------------------------------
def sd2_like_checkpoint():
    """Four levels, two layers: output_blocks.11.1 exists as in real SD2."""
    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(1, 1, 1, 1), use_linear_projection=True, norm_num_groups=32).eval()
    vae, te = tiny_vae(32), tiny_clip(layers=3, act="gelu")
    sd, meta = to_single_file(unet, vae, te)
    sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    sd.update(to_open_clip(te))
    return sd, meta, unet, te


def test_sd2_open_clip_text_encoder_uses_the_penultimate_layer():
    sd, meta, unet, te = sd2_like_checkpoint()
    assert ldm.detect(sd) == "sd2"
    conv = ldm.ldm_to_diffusers(sd, meta)
    assert conv.info["family"] == "sd2" and conv.info["text_encoder_layout"] == "open_clip"
    assert conv.text_encoder_config["num_hidden_layers"] == 2
    assert conv.text_encoder_config["hidden_act"] == "gelu"
    assert_same_state(unet.state_dict(), conv.unet)
    assert all(CLIP_TEXT_KEY_PATTERN.match(k) for k in conv.text_encoder)
    te2 = CLIPTextModel(CLIPTextConfig(**conv.text_encoder_config)).eval()
    te2.load_state_dict(conv.text_encoder, strict=True)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        penultimate = te(ids, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(te2(ids).last_hidden_state, te.final_layer_norm(penultimate))
    dropped = [k for k in conv.info["ignored_keys"] if "resblocks.2." in k]
    assert len(dropped) == 12 and "cond_stage_model.model.text_projection" in conv.info[
        "ignored_keys"]


def test_sd2_v_prediction_heuristic_follows_comfyui():
    sd, meta, _, _ = sd2_like_checkpoint()
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    assert probe in sd
    spread = dict(sd, **{probe: torch.linspace(-1, 1, sd[probe].numel())})
    cfg = ldm.infer_sd_configs(spread, meta)
    assert cfg.prediction_type == "v_prediction" and "ComfyUI" in cfg.prediction_rule
    assert cfg.unet["sample_size"] == 96
    flat = dict(sd, **{probe: torch.full_like(sd[probe], 0.5)})
    assert ldm.infer_sd_configs(flat, meta).prediction_type == "epsilon"
    inpaint = dict(spread, **{"model.diffusion_model.input_blocks.0.0.weight":
                              torch.zeros(32, 9, 3, 3)})
    assert ldm.infer_sd_configs(inpaint, meta).prediction_type == "epsilon"


def test_sd2_width_export_is_refused_clearly():
    unet = tiny_unet(cross=1024, groups=32)
    with pytest.raises(ldm.LdmCheckpointError, match="SD2 single-file export"):
        ldm.diffusers_to_ldm(unet.state_dict(), {}, {}, unet.config, tiny_vae().config)


# -- errors ---------------------------------------------------------------------------------------
def test_sdxl_checkpoint_is_not_read_as_sd1_but_loads_as_sdxl(tmp_path):
    """The SD1/SD2 converter names SDXL and leaves it alone; the family loader reads it
    (the SDXL layout's own tests: tests/test_formats_sdxl.py)."""
    from tsuika.trainers.families import detect_family, load_model
    from tsuika.trainers.fixtures import write_fixture

    path = write_fixture("sdxl-tiny", tmp_path, single_file_only=True)["single_file"]
    from tsuika.trainers.formats.safetensors_io import load_safetensors

    sd, meta = load_safetensors(path)
    assert ldm.detect(sd) is None
    with pytest.raises(ldm.LdmCheckpointError, match="SDXL"):
        ldm.ldm_to_diffusers(sd, meta)
    assert detect_family(path).name == "sdxl"
    bundle = load_model(path)
    assert bundle.family == "sdxl" and bundle.unet.config.addition_embed_type == "text_time"


def test_missing_components_are_named():
    sd, meta = to_single_file(tiny_unet(), tiny_vae(), tiny_clip())
    bare = {k[len("model.diffusion_model."):]: v for k, v in sd.items()
            if k.startswith("model.diffusion_model.")}
    with pytest.raises(ldm.LdmCheckpointError, match="bare UNet"):
        ldm.ldm_to_diffusers(bare, meta)
    no_te = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ldm.LdmCheckpointError, match="no text encoder"):
        ldm.ldm_to_diffusers(no_te, meta)
    no_vae = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ldm.LdmCheckpointError, match="no VAE"):
        ldm.ldm_to_diffusers(no_vae, meta)


def test_leftover_keys_inside_a_model_are_errors():
    sd, meta = to_single_file(tiny_unet(), tiny_vae(), tiny_clip())
    unet_extra = dict(sd, **{"model.diffusion_model.input_blocks.1.1.extra.weight":
                             torch.zeros(1)})
    with pytest.raises(ldm.LdmCheckpointError, match="input_blocks.1.1.extra.weight"):
        ldm.ldm_to_diffusers(unet_extra, meta)
    te_extra = dict(sd, **{"cond_stage_model.transformer.text_model.encoder.bogus.weight":
                           torch.zeros(1)})
    with pytest.raises(ldm.LdmCheckpointError, match="bogus"):
        ldm.ldm_to_diffusers(te_extra, meta)


def test_diffusers_to_ldm_rejects_mismatched_state_dicts():
    unet, vae, te = tiny_unet(), tiny_vae(), tiny_clip()
    partial = dict(unet.state_dict())
    del partial["down_blocks.0.resnets.0.conv1.weight"]
    del partial["down_blocks.0.resnets.0.conv1.bias"]
    with pytest.raises(ldm.LdmCheckpointError, match="down_blocks.0.resnets.0.conv1"):
        ldm.diffusers_to_ldm(partial, vae.state_dict(), te.state_dict(), unet.config, vae.config)
    other = tiny_unet("three_levels")
    with pytest.raises(ldm.LdmCheckpointError, match="unexpected keys"):
        ldm.diffusers_to_ldm(other.state_dict(), vae.state_dict(), te.state_dict(), unet.config,
                             vae.config)
    with pytest.raises(ldm.LdmCheckpointError, match="text_projection"):
        ldm.diffusers_to_ldm(unet.state_dict(), vae.state_dict(),
                             {**te.state_dict(), "text_projection.weight": torch.zeros(2, 2)},
                             unet.config, vae.config)


def test_detect_and_metadata_hints():
    sd, meta = to_single_file(tiny_unet(), tiny_vae(), tiny_clip())
    assert ldm.detect(sd) == "sd1"
    assert ldm.detect(["lora_unet_down_blocks_0.alpha"]) is None
    assert meta == {"tsuika.unet_attention_head_dim": "8", "tsuika.unet_norm_num_groups": "8",
                    "tsuika.vae_norm_num_groups": "8", "tsuika.te_num_attention_heads": "4",
                    "tsuika.unet_sample_size": "16"}


# -- full-size shapes (meta tensors: no memory, no weights) ---------------------------------------
def _meta_models(family: str):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_config(family, "unet"))
        vae = AutoencoderKL.from_config(read_config(family, "vae"))
        te_cfg = dict(read_config(family, "text_encoder"))
        if family == "sd2_v":
            te_cfg["num_hidden_layers"] += 1  # OpenCLIP keeps the block diffusers drops
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    return unet, vae, te


def _ldm_part(state_dict, table, prefix):
    return {f"{prefix}{table[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v
            for k, v in state_dict.items()}


@pytest.mark.parametrize("family", ["sd15", "sd2_v"])
def test_full_size_shapes_infer_the_shipped_configs(family):
    unet, vae, te = _meta_models(family)
    if family == "sd15":
        sd = ldm.diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te.state_dict(),
                                  unet.config, vae.config)
    else:  # SD2 export is not supported, so write the LDM names with the key tables
        sd = {**_ldm_part(unet.state_dict(), unet_module_map(unet.config),
                          "model.diffusion_model."),
              **_ldm_part(vae.state_dict(), vae_module_map(vae.config), "first_stage_model."),
              **to_open_clip(te)}
    # No tsuika.* hints: the SD1 / SD2 rules must give the real values. (The SD2 statistic
    # cannot run on meta tensors, so the prediction type is declared.)
    cfg = ldm.infer_sd_configs(sd, {"modelspec.prediction_type": "v"} if family == "sd2_v"
                               else None)
    assert cfg.family == {"sd15": "sd1", "sd2_v": "sd2"}[family]
    for part, inferred in (("unet", cfg.unet), ("vae", cfg.vae), ("text_encoder",
                                                                   cfg.text_encoder)):
        for name, value in read_config(family, part).items():
            if name.startswith("_") or name in ("architectures", "model_type", "projection_dim",
                                                "attention_dropout", "dropout",
                                                "initializer_factor", "initializer_range"):
                continue
            assert inferred[name] == value, (part, name)
    # diffusers' converters agree with our key tables at full size too (two-digit indices).
    conv = ldm.ldm_to_diffusers(sd, {"modelspec.prediction_type": "v"})
    assert set(conv.unet) == set(unet.state_dict()) and set(conv.vae) == set(vae.state_dict())
    with torch.device("meta"):
        te_diffusers = CLIPTextModel(CLIPTextConfig(**conv.text_encoder_config))
    assert set(conv.text_encoder) == set(te_diffusers.state_dict())


def test_family_loader_loads_frozen_parts_straight_into_the_compute_dtype(tmp_path):
    from tsuika.trainers.families import load_model
    from tsuika.trainers.families.sd15 import Sd15Family
    from tsuika.trainers.fixtures import write_fixture

    unet, vae, te = tiny_unet("two_levels"), tiny_vae(), tiny_clip()
    sd, meta = to_single_file(unet, vae, te)
    fp16 = {k: v.half() for k, v in sd.items()}
    kept = dict(fp16)
    bundle = Sd15Family().bundle_from_ldm(fp16, meta, dtype=torch.bfloat16)
    assert fp16.keys() == kept.keys()  # the caller's dict is left alone unless consumed
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.text_encoders[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}  # VAE: fp32 always
    for name, w in unet.state_dict().items():  # same values, rounded once (fp16 -> bf16)
        torch.testing.assert_close(bundle.unet.state_dict()[name],
                                   w.half().to(torch.bfloat16), rtol=0, atol=0, msg=name)
    Sd15Family().bundle_from_ldm(fp16, meta, dtype=torch.bfloat16, consume=True)
    assert fp16 == {}  # consumed: the originals can be freed module by module

    paths = write_fixture("sd15-tiny", tmp_path, dtype="fp16")
    for path in paths.values():
        loaded = load_model(path, dtype=torch.bfloat16)
        assert {p.dtype for p in loaded.unet.parameters()} == {torch.bfloat16}, path
        assert {p.dtype for p in loaded.text_encoders[0].parameters()} == {torch.bfloat16}
        assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}, path


def test_folder_read_into_a_dtype_matches_from_pretrained(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from tsuika.trainers.families import load_model
    from tsuika.trainers.fixtures import write_fixture

    folder = write_fixture("sd15-tiny", tmp_path)["diffusers"]
    bundle = load_model(folder, dtype=torch.bfloat16)
    expected = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder")}
    got = {"unet": bundle.unet, "vae": bundle.vae, "text_encoder": bundle.text_encoders[0]}
    for part, module in expected.items():
        want = module.state_dict()
        have = got[part].state_dict()
        assert want.keys() == have.keys(), part
        dtype = torch.float32 if part == "vae" else torch.bfloat16
        for k, v in want.items():
            target = v.to(dtype) if v.is_floating_point() else v
            torch.testing.assert_close(have[k], target, rtol=0, atol=0, msg=f"{part}.{k}")
    # a damaged file is refused with its name, in the converting reader too
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(Exception, match="diffusion_pytorch_model.safetensors"):
        load_model(folder, dtype=torch.bfloat16)
