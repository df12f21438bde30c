"""SD1.x / SD2.x single-file checkpoints (the original CompVis / LDM layout) <-> diffusers.

A single-file checkpoint holds three models under fixed prefixes:

* ``model.diffusion_model.*``  the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``),
* ``first_stage_model.*``      the VAE (``encoder.down.N.block.M``, ``mid.attn_1`` ...),
* ``cond_stage_model.transformer.text_model.*``  SD1's CLIP-L in Hugging Face naming, or
  ``cond_stage_model.model.*`` SD2's OpenCLIP ViT-H text tower.

This is what ComfyUI's CheckpointLoaderSimple reads. Our backend trains diffusers /
transformers modules, so we convert both ways, entirely offline: the architecture is read
from tensor shapes (:func:`infer_sd_configs`); what shapes cannot tell (attention heads, norm
groups) comes from the family rules or from ``tsuika.*`` metadata hints that
:func:`config_metadata_hints` produces for the writer. Pure dict in, dict out: file I/O lives
in ``safetensors_io``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from .ldm_unet_keys import (
    CLIP_OLD_PREFIX,
    CLIP_PREFIX,
    META_PREDICTION,
    META_TE_HEADS,
    META_UNET_GROUPS,
    META_UNET_HEADS,
    META_UNET_SAMPLE_SIZE,
    META_VAE_GROUPS,
    OPEN_CLIP_PREFIX,
    SUPPORTED_LAYOUTS,
    UNET_PREFIX,
    VAE_ATTENTION_LEAVES,
    VAE_PREFIX,
    LdmCheckpointError,
    check_supported_layout,
    check_text_keys,
    config_metadata_hints,
    detect,
    indices,
    read_hint,
    strip_prefix,
    unet_module_map,
    vae_module_map,
)

__all__ = ["LdmCheckpointError", "LdmConversion", "SdConfigs", "config_metadata_hints", "detect",
           "diffusers_to_ldm", "infer_sd_configs", "ldm_to_diffusers", "unet_module_map",
           "vae_module_map"]

log = logging.getLogger(__name__)

# ComfyUI (comfy/supported_models.py, SD20.model_type) tells SD2 v-prediction models from
# epsilon ones by the spread of this bias; only for 4-channel (non-inpainting) UNets.
SD2_VPRED_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_VPRED_STD_THRESHOLD = 0.09

_OPEN_CLIP_EXTRAS = ("text_projection", "logit_scale", "attn_mask")
_V_NAMES, _EPS_NAMES = {"v", "v_prediction", "v-prediction", "vpred"}, {"epsilon", "eps"}


@dataclass(frozen=True)
class SdConfigs:
    """Configs inferred from a single-file checkpoint.

    ``unet`` / ``vae`` feed ``from_config`` of ``UNet2DConditionModel`` / ``AutoencoderKL``,
    ``text_encoder`` feeds ``CLIPTextConfig(**...)``. ``rules`` says, in words, how each
    value that shapes cannot give was chosen.
    """

    family: str  # "sd1" | "sd2"
    text_encoder_layout: str  # "hf_clip" | "open_clip"
    unet: dict
    vae: dict
    text_encoder: dict
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    prediction_rule: str = ""
    zero_terminal_snr: bool = False
    rules: list[str] = field(default_factory=list)


class LdmConversion(NamedTuple):
    """Result of :func:`ldm_to_diffusers`; unpacks as a 7-tuple."""

    unet: dict
    vae: dict
    text_encoder: dict
    unet_config: dict
    vae_config: dict
    text_encoder_config: dict
    info: dict


# -- architecture inference ---------------------------------------------------------------------
def _unet_heads(metadata, channels: list[int], cross: int, rules: list[str]):
    hint = read_hint(metadata, META_UNET_HEADS)
    if hint is not None:
        if not (isinstance(hint, int) or (isinstance(hint, list) and len(hint) == len(channels))):
            raise LdmCheckpointError(f"metadata {META_UNET_HEADS} = {hint!r}: expected an int or "
                                     f"{len(channels)} ints.")
        rules.append(f"unet attention_head_dim={hint} from metadata {META_UNET_HEADS}")
        return hint
    if cross == 768:
        rules.append("unet attention_head_dim=8: SD1 rule (cross_attention_dim 768 -> 8 heads)")
        return 8
    heads = [max(1, c // 64) for c in channels]
    rule = "SD2 rule (cross_attention_dim 1024" if cross == 1024 else "fallback (no hint"
    rules.append(f"unet attention_head_dim={heads}: {rule}, 64-channel heads)")
    return heads


def _groups(metadata, key: str, channels: list[int], what: str, rules: list[str]) -> int:
    hint = read_hint(metadata, key)
    groups = int(hint) if hint is not None else 32
    rules.append(f"{what} norm_num_groups={groups}"
                 + (f" from metadata {key}" if hint is not None else " (SD default)"))
    if any(c % groups for c in channels):
        raise LdmCheckpointError(
            f"{what} block_out_channels {channels} are not divisible by norm_num_groups="
            f"{groups}; store the right value in metadata {key}.")
    return groups


def _infer_unet(unet: dict, metadata, rules: list[str]) -> dict:
    for key in ("input_blocks.0.0.weight", "out.2.weight", "middle_block.1.proj_in.weight"):
        if key not in unet:
            raise LdmCheckpointError(f"UNet key {UNET_PREFIX + key} is missing; the checkpoint "
                                     f"is incomplete or not SD1.x/SD2.x. {SUPPORTED_LAYOUTS}.")
    total = len(indices(unet, "input_blocks"))
    down = [i for i in range(total) if f"input_blocks.{i}.0.op.weight" in unet]
    levels = len(down) + 1
    layers = total // levels - 1
    outputs = indices(unet, "output_blocks")
    if (indices(unet, "input_blocks") != list(range(total)) or total % levels or layers < 1
            or down != [(lv + 1) * (layers + 1) for lv in range(levels - 1)]
            or outputs != list(range(levels * (layers + 1)))):
        raise LdmCheckpointError(
            f"UNet block numbering is not SD1.x/SD2.x-like: {total} input_blocks, downsamplers "
            f"at {down}, output_blocks {outputs[:1]}..{outputs[-1:]}.")
    channels = [int(unet[f"input_blocks.{1 + lv * (layers + 1)}.0.out_layers.3.weight"].shape[0])
                for lv in range(levels)]

    def depth(prefix: str) -> int:
        if f"{prefix}.proj_in.weight" not in unet:
            return 0
        return len(indices(unet, f"{prefix}.transformer_blocks"))

    down_d = [{depth(f"input_blocks.{1 + lv * (layers + 1) + j}.1") for j in range(layers)}
              for lv in range(levels)]
    up_d = [{depth(f"output_blocks.{lv * (layers + 1) + j}.1") for j in range(layers + 1)}
            for lv in range(levels)]
    if any(len(s) != 1 for s in down_d + up_d):
        raise LdmCheckpointError("UNet levels mix blocks with and without attention (or with "
                                 "different transformer depths); not an SD1.x/SD2.x layout.")
    down_d, up_d = [s.pop() for s in down_d], [s.pop() for s in up_d]
    mid_d = depth("middle_block.1")
    attn = next((f"input_blocks.{1 + lv * (layers + 1)}.1" for lv in range(levels) if down_d[lv]),
                "middle_block.1")
    cross = int(unet[f"{attn}.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    used = [d for d in down_d + up_d if d] + [mid_d]
    if len(set(used)) == 1:
        tlpb, reverse = used[0], None
    else:  # per-level depths; levels without attention get a placeholder diffusers ignores
        tlpb = [d or 1 for d in down_d]
        if down_d[-1] and down_d[-1] != mid_d:
            raise LdmCheckpointError(f"UNet mid-block depth {mid_d} differs from the last "
                                     f"level's {down_d[-1]}; diffusers cannot express that.")
        tlpb[-1] = mid_d
        mirrored = all(not u or u == t for u, t in zip(up_d, tlpb[::-1]))
        reverse = None if mirrored else [d or 1 for d in up_d]
    time_dim = int(unet["time_embed.0.weight"].shape[0])
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": int(unet["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(unet["out.2.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_d],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_d],
        "transformer_layers_per_block": tlpb,
        "cross_attention_dim": cross,
        "use_linear_projection": unet[f"{attn}.proj_in.weight"].ndim == 2,
        "attention_head_dim": _unet_heads(metadata, channels, cross, rules),
        "norm_num_groups": _groups(metadata, META_UNET_GROUPS, channels, "unet", rules),
        "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "norm_eps": 1e-5,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    }
    if reverse is not None:
        cfg["reverse_transformer_layers_per_block"] = reverse
    if time_dim != 4 * channels[0]:
        cfg["time_embedding_dim"] = time_dim
    return cfg


def _infer_vae(vae: dict, metadata, rules: list[str]) -> dict:
    levels = len(indices(vae, "encoder.down"))
    layers = len(indices(vae, "encoder.down.0.block"))
    needed = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
    if not levels or not layers or any(k not in vae for k in needed):
        raise LdmCheckpointError(f"VAE ({VAE_PREFIX}*) lacks encoder.down.N.block.M / conv_in / "
                                 f"conv_out keys; it is not an SD1.x/SD2.x AutoencoderKL.")
    if indices(vae, "decoder.up") != list(range(levels)) or any(
            len(indices(vae, f"decoder.up.{lv}.block")) != layers + 1 for lv in range(levels)):
        raise LdmCheckpointError(f"VAE decoder does not mirror the encoder ({levels} levels x "
                                 f"{layers} blocks); not an SD1.x/SD2.x AutoencoderKL.")
    channels = [int(vae[f"encoder.down.{lv}.block.0.conv2.weight"].shape[0])
                for lv in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": int(vae["decoder.conv_in.weight"].shape[1]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": _groups(metadata, META_VAE_GROUPS, channels, "vae", rules),
        "act_fn": "silu", "scaling_factor": 0.18215,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
    }


def _te_heads(metadata, hidden: int, rules: list[str]) -> int:
    hint = read_hint(metadata, META_TE_HEADS)
    if hint is not None:
        heads, why = int(hint), f"from metadata {META_TE_HEADS}"
    elif hidden in (768, 1024):
        heads, why = {768: 12, 1024: 16}[hidden], f"CLIP rule (hidden {hidden})"
    else:
        heads, why = max(1, hidden // 64), "fallback hidden//64 (no hint)"
    rules.append(f"text encoder num_attention_heads={heads}: {why}")
    if hidden % heads:
        raise LdmCheckpointError(f"text encoder hidden size {hidden} is not divisible by "
                                 f"{heads} heads; store the right value in metadata "
                                 f"{META_TE_HEADS}.")
    return heads


def _infer_text_encoder(checkpoint, layout: str, metadata, rules: list[str]) -> dict:
    if layout == "hf_clip":
        te = _hf_clip_part(checkpoint)
        vocab, hidden = te["embeddings.token_embedding.weight"].shape
        positions = te["embeddings.position_embedding.weight"].shape[0]
        layers = len(indices(te, "encoder.layers"))
        inner = te["encoder.layers.0.mlp.fc1.weight"].shape[0]
        act, proj = "quick_gelu", hidden
    else:
        oc = strip_prefix(checkpoint, OPEN_CLIP_PREFIX)
        vocab, hidden = oc["token_embedding.weight"].shape
        positions = oc["positional_embedding"].shape[0]
        # SD2 conditions on the penultimate block (LDM FrozenOpenCLIPEmbedder layer="penultimate",
        # then ln_final), so diffusers keeps all blocks but the last, as we do.
        layers = len(indices(oc, "transformer.resblocks")) - 1
        inner = oc["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act = "gelu"
        proj = oc["text_projection"].shape[1] if "text_projection" in oc else hidden
        rules.append(f"text encoder: OpenCLIP's last block dropped ({layers} layers kept, SD2 "
                     "uses the penultimate layer)")
    cfg = {"vocab_size": int(vocab), "hidden_size": int(hidden),
           "intermediate_size": int(inner), "num_hidden_layers": int(layers),
           "num_attention_heads": _te_heads(metadata, int(hidden), rules),
           "max_position_embeddings": int(positions), "hidden_act": act,
           "projection_dim": int(proj), "layer_norm_eps": 1e-5}
    if vocab == 49408:  # the real CLIP BPE vocabulary: its special tokens
        cfg.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return cfg


def _prediction_type(checkpoint, metadata, family: str, in_channels: int) -> tuple[str, str]:
    if "v_pred" in checkpoint:
        return "v_prediction", "checkpoint has a v_pred key"
    declared = str((metadata or {}).get(META_PREDICTION, "")).strip().lower()
    if declared in _V_NAMES:
        return "v_prediction", f"metadata {META_PREDICTION}={declared}"
    if declared in _EPS_NAMES:
        return "epsilon", f"metadata {META_PREDICTION}={declared}"
    if declared:
        log.warning("ignoring unknown metadata %s=%r", META_PREDICTION, declared)
    if family == "sd2" and in_channels == 4 and SD2_VPRED_PROBE_KEY in checkpoint:
        std = float(torch.std(checkpoint[SD2_VPRED_PROBE_KEY].float(), unbiased=False))
        pred = "v_prediction" if std > SD2_VPRED_STD_THRESHOLD else "epsilon"
        return pred, (f"SD2 weight statistic (ComfyUI's rule): std of output_blocks.11 norm1.bias "
                      f"= {std:.4f} vs threshold {SD2_VPRED_STD_THRESHOLD}")
    return "epsilon", "default (no v_pred key, no metadata)"


def infer_sd_configs(checkpoint: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> SdConfigs:
    """Read the UNet / VAE / text-encoder architecture of an SD1.x / SD2.x single file.

    Shapes give channels, block and layer counts, attention placement and depth, context
    width, projection kind and vocabulary; head counts and norm groups come from ``tsuika.*``
    metadata hints, else from the SD1 / SD2 rules (see ``SdConfigs.rules`` and the log).

    Args:
        checkpoint: tensor name -> tensor, in the LDM layout (only shapes are read).
        metadata: the file's safetensors metadata (optional hints, see ``META_*``).

    Raises:
        LdmCheckpointError: SDXL or other unsupported layouts, missing components.
    """
    keys = list(checkpoint)
    layout = check_supported_layout(keys)
    rules: list[str] = []
    unet = _infer_unet(strip_prefix(checkpoint, UNET_PREFIX), metadata, rules)
    te = _infer_text_encoder(checkpoint, layout, metadata, rules)
    if te["hidden_size"] != unet["cross_attention_dim"]:
        raise LdmCheckpointError(
            f"text encoder width {te['hidden_size']} does not match the UNet's "
            f"cross_attention_dim {unet['cross_attention_dim']}; the checkpoint mixes families.")
    family = "sd2" if layout == "open_clip" else "sd1"
    if unet["cross_attention_dim"] not in (768, 1024):
        rules.append(f"family {family} from the text-encoder layout ({layout})")
    vae = _infer_vae(strip_prefix(checkpoint, VAE_PREFIX), metadata, rules)
    pred, why = _prediction_type(checkpoint, metadata, family, unet["in_channels"])
    rules.append(f"prediction_type={pred}: {why}")
    # Not in the weights: the native resolution (SD2's v-prediction model is the 768 px one),
    # unless our writer recorded it (a fine-tune of a smaller model must not sample at 512 px).
    # The VAE only uses it for tiling.
    side = read_hint(metadata, META_UNET_SAMPLE_SIZE)
    if isinstance(side, int) and side > 0:
        rules.append(f"unet sample_size={side} from metadata {META_UNET_SAMPLE_SIZE}")
        unet["sample_size"] = side
    else:
        side = 64  # the VAE's tiling size stays SD's 512 px, as in the shipped configs
        unet["sample_size"] = 96 if family == "sd2" and pred == "v_prediction" else 64
    vae["sample_size"] = side * 2 ** (len(vae["block_out_channels"]) - 1)
    for rule in rules:
        log.info("single-file config: %s", rule)
    return SdConfigs(family, layout, unet, vae, te, pred, why, "ztsnr" in checkpoint, rules)


# -- LDM -> diffusers ---------------------------------------------------------------------------
def _hf_clip_part(checkpoint) -> dict:
    """SD1 text-encoder tensors named as in ``CLIPTextModel`` (no ``text_model.``)."""
    part = strip_prefix(checkpoint, CLIP_OLD_PREFIX)
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v
            for k, v in part.items()}


def _check_against_map(converted: dict, part: dict, module_map: dict, what: str) -> None:
    """Every LDM key maps through ``module_map`` and diffusers produced exactly those keys."""
    inverse = {ldm: diff for diff, ldm in module_map.items()}
    expected, unknown = set(), []
    for key in part:
        module, _, param = key.rpartition(".")
        if module in inverse:
            expected.add(f"{inverse[module]}.{param}")
        else:
            unknown.append(key)
    if unknown:
        raise LdmCheckpointError(f"{what}: {len(unknown)} checkpoint keys do not fit the inferred "
                                 f"architecture, e.g. {sorted(unknown)[:6]}.")
    if set(converted) != expected:
        raise LdmCheckpointError(
            f"{what}: diffusers' converter disagrees with the key table (missing "
            f"{sorted(expected - set(converted))[:6]}, extra "
            f"{sorted(set(converted) - expected)[:6]}); please report this checkpoint.")


def _convert_text_encoder(checkpoint, cfg: SdConfigs) -> tuple[dict, set[str]]:
    """The ``CLIPTextModel`` state dict and the checkpoint keys it was made from."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    layers = cfg.text_encoder["num_hidden_layers"]
    if cfg.text_encoder_layout == "hf_clip":
        # position_ids is a buffer every loader rebuilds; text_projection is not part of
        # CLIPTextModel (ComfyUI drops both too).
        skip = ("embeddings.position_ids", "text_projection.weight")
        part = {k: v for k, v in checkpoint.items()
                if k.startswith(CLIP_OLD_PREFIX) and not k.endswith(skip)}
        # convert_ldm_clip_checkpoint keeps whatever follows the prefix: normalise old files.
        named = {CLIP_PREFIX + k: v for k, v in _hf_clip_part(part).items()}
        out, extra = convert_ldm_clip_checkpoint(named), 0
    else:
        dropped = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layers}."
        extras = tuple(OPEN_CLIP_PREFIX + e for e in _OPEN_CLIP_EXTRAS)
        part = {k: v for k, v in checkpoint.items() if k.startswith(OPEN_CLIP_PREFIX)
                and not k.startswith(dropped) and k not in extras}
        width = SimpleNamespace(config=SimpleNamespace(hidden_size=cfg.text_encoder["hidden_size"]))
        out = convert_open_clip_checkpoint(width, part, prefix=OPEN_CLIP_PREFIX)
        out.pop("text_projection.weight", None)  # CLIPTextModel has no projection
        extra = 4 * layers  # each fused in_proj weight / bias becomes q, k, v
    te_sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v
             for k, v in out.items()}
    check_text_keys(te_sd, layers, f"text encoder ({cfg.text_encoder_layout})")
    if len(part) + extra != len(te_sd):
        raise LdmCheckpointError(f"text encoder: {len(part)} checkpoint tensors became "
                                 f"{len(te_sd)}; some keys were not understood.")
    return te_sd, set(part)


def ldm_to_diffusers(checkpoint: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> LdmConversion:
    """Split an SD1.x / SD2.x single-file checkpoint into diffusers / transformers state dicts.

    Uses diffusers' ``convert_ldm_*`` / ``convert_open_clip_checkpoint`` with configs from
    :func:`infer_sd_configs`, then checks every UNet / VAE / text-encoder key was converted.
    Keys outside the three models (EMA copies, schedule buffers, ``v_pred``) are listed in
    ``info["ignored_keys"]``. The input is not modified.

    Args:
        checkpoint: tensor name -> tensor in the LDM layout.
        metadata: the file's safetensors metadata (prediction type and ``tsuika.*`` hints).

    Returns:
        ``LdmConversion(unet, vae, text_encoder, unet_config, vae_config, text_encoder_config,
        info)``; ``text_encoder`` keys follow transformers 5's ``CLIPTextModel`` (no
        ``text_model.``). ``info``: family, prediction_type, prediction_rule,
        text_encoder_layout, zero_terminal_snr, rules, ignored_keys.

    Raises:
        LdmCheckpointError: unsupported layout or keys that do not fit the inferred model.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    cfg = infer_sd_configs(checkpoint, metadata)
    unet_part = {k: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    unet_sd = convert_ldm_unet_checkpoint(unet_part, cfg.unet)
    _check_against_map(unet_sd, strip_prefix(unet_part, UNET_PREFIX), unet_module_map(cfg.unet),
                       "UNet")
    vae_part = {k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}
    vae_sd = convert_ldm_vae_checkpoint(vae_part, cfg.vae)
    _check_against_map(vae_sd, strip_prefix(vae_part, VAE_PREFIX), vae_module_map(cfg.vae), "VAE")
    te_sd, te_used = _convert_text_encoder(checkpoint, cfg)
    used = set(unet_part) | set(vae_part) | te_used
    ignored = sorted(k for k in checkpoint if k not in used)
    if ignored:
        log.info("single-file checkpoint: %d tensors outside the three models ignored (e.g. %s)",
                 len(ignored), ignored[:3])
    log.info("single-file checkpoint: family %s, prediction %s (%s)", cfg.family,
             cfg.prediction_type, cfg.prediction_rule)
    info = {"family": cfg.family, "prediction_type": cfg.prediction_type,
            "prediction_rule": cfg.prediction_rule,
            "text_encoder_layout": cfg.text_encoder_layout,
            "zero_terminal_snr": cfg.zero_terminal_snr, "rules": list(cfg.rules),
            "ignored_keys": ignored}
    return LdmConversion(unet_sd, vae_sd, te_sd, dict(cfg.unet), dict(cfg.vae),
                         dict(cfg.text_encoder), info)


# -- diffusers -> LDM ---------------------------------------------------------------------------
def _translate(out: dict, state_dict: Mapping[str, torch.Tensor], module_map: dict[str, str],
               prefix: str, what: str, as_conv: frozenset[str] = frozenset()) -> None:
    """Rename ``state_dict`` into ``out`` through ``module_map``; all keys, all modules."""
    unknown, seen = [], set()
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        target = module_map.get(module)
        if target is None:
            unknown.append(key)
            continue
        seen.add(module)
        if param == "weight" and module in as_conv and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM VAE attention uses 1x1 convs
        out[f"{prefix}{target}.{param}"] = tensor
    missing = sorted(set(module_map) - seen)
    if unknown or missing:
        raise LdmCheckpointError(
            f"{what} state dict does not match its config: unexpected keys {sorted(unknown)[:6]}"
            f", missing modules {missing[:6]}. Pass the state dict and config of the same model.")


def diffusers_to_ldm(unet_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor],
                     text_encoder_sd: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any],
                     vae_config: Mapping[str, Any], *, prediction_type: str = "epsilon",
                     ) -> dict[str, torch.Tensor]:
    """Assemble an SD1.x single-file state dict (the layout CheckpointLoaderSimple reads).

    Tensors are shared, not copied (VAE attention weights become 1x1-conv views). The text
    encoder is written in SD1's Hugging Face naming under
    ``cond_stage_model.transformer.text_model.``; ``position_ids`` is not written.

    Args:
        unet_sd: ``UNet2DConditionModel.state_dict()``.
        vae_sd: ``AutoencoderKL.state_dict()``.
        text_encoder_sd: ``CLIPTextModel.state_dict()`` (with or without ``text_model.``).
        unet_config: the UNet's config (dict or ``model.config``); drives the key table.
        vae_config: the VAE's config.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; the latter adds the empty
            ``v_pred`` marker tensor that :func:`ldm_to_diffusers` (and SDXL-era tools) read.

    Raises:
        LdmCheckpointError: a key that does not belong to the configured model, a missing
            module, an SD2-width (1024) model (its OpenCLIP text layout is not written yet).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise LdmCheckpointError(f"prediction_type = {prediction_type!r}; choose 'epsilon' or "
                                 "'v_prediction'.")
    if unet_config.get("cross_attention_dim") == 1024:
        raise LdmCheckpointError(
            "SD2 single-file export is not supported yet: ComfyUI expects SD2's text encoder "
            "in the OpenCLIP layout (cond_stage_model.model.*). Save as a diffusers folder.")
    out: dict[str, torch.Tensor] = {}
    _translate(out, unet_sd, unet_module_map(unet_config), UNET_PREFIX, "UNet")
    attention = frozenset(f"{side}.mid_block.attentions.0.{leaf}" for side in ("encoder", "decoder")
                          for leaf, _ in VAE_ATTENTION_LEAVES if leaf != "group_norm")
    _translate(out, vae_sd, vae_module_map(vae_config), VAE_PREFIX, "VAE", attention)
    te = {(k[len("text_model."):] if k.startswith("text_model.") else k): v
          for k, v in text_encoder_sd.items()}
    te.pop("embeddings.position_ids", None)  # a buffer, rebuilt by every loader
    check_text_keys(te, len(indices(te, "encoder.layers")), "text_encoder_sd")
    out.update({CLIP_PREFIX + k: v for k, v in te.items()})
    if prediction_type == "v_prediction":
        out["v_pred"] = torch.tensor([])
    return out
