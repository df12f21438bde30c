"""Architecture of an SD1.x / SD2.x single-file checkpoint, read from its tensor shapes.

:func:`infer_sd_configs` gives the diffusers / transformers configs of the three models in
an original-layout checkpoint; what shapes cannot tell (attention heads, norm groups, native
size) comes from the family rules or from ``tsuika.*`` metadata hints (``config_metadata_hints``
in ``ldm_unet_keys``). The conversions (``ldm_to_diffusers``, ``diffusers_to_ldm``) build on
it; an SDXL reader is a sibling of this module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .ldm_unet_keys import (
    CLIP_OLD_PREFIX,
    META_PREDICTION,
    META_TE_HEADS,
    META_UNET_GROUPS,
    META_UNET_HEADS,
    META_UNET_SAMPLE_SIZE,
    META_VAE_GROUPS,
    OPEN_CLIP_PREFIX,
    SUPPORTED_LAYOUTS,
    UNET_PREFIX,
    VAE_PREFIX,
    LdmCheckpointError,
    check_supported_layout,
    indices,
    read_hint,
    strip_prefix,
)

log = logging.getLogger(__name__)

# ComfyUI (comfy/supported_models.py, SD20.model_type) tells SD2 v-prediction models from
# epsilon ones by the spread of this bias; only for 4-channel (non-inpainting) UNets.
SD2_VPRED_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_VPRED_STD_THRESHOLD = 0.09

OPEN_CLIP_EXTRAS = ("text_projection", "logit_scale", "attn_mask")
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
        te = hf_clip_part(checkpoint)
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


def hf_clip_part(checkpoint) -> dict:
    """SD1 text-encoder tensors named as in ``CLIPTextModel`` (no ``text_model.``)."""
    part = strip_prefix(checkpoint, CLIP_OLD_PREFIX)
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v
            for k, v in part.items()}

