"""Key tables between diffusers and the original (CompVis / LDM) SD1.x / SD2.x layout.

The single-file checkpoints that ComfyUI's CheckpointLoaderSimple reads name their modules
after the original LDM code (``input_blocks.4.1.proj_in``); diffusers names the same modules
after its own blocks (``down_blocks.1.attentions.0.proj_in``). This module builds the complete
one-to-one table of *parametrised modules* for a given diffusers config, so that

* whole state dicts convert key by key (module path + parameter name), with every key
  accounted for, and
* adapter formats that name modules (ComfyUI-native LoRA files) can be translated.

Everything is derived from the config alone (block counts, channels, layers per block,
transformer depth), so tiny test models and full-size SD1.5 / SD2.1 use the same code. It
also holds the key-level checks (which layout is this file?) and the ``tsuika.*`` metadata
hints. No torch, no diffusers: plain strings. ``ldm_checkpoint`` does the tensor work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
CLIP_OLD_PREFIX = "cond_stage_model.transformer."  # very old SD1 files: no "text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

SUPPORTED_LAYOUTS = ("supported: SD1.x / SD2.x single-file checkpoints "
                     "(model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)")
# safetensors metadata hints for what tensor shapes cannot tell (JSON-encoded values).
META_UNET_HEADS = "tsuika.unet_attention_head_dim"
META_UNET_GROUPS = "tsuika.unet_norm_num_groups"
META_VAE_GROUPS = "tsuika.vae_norm_num_groups"
META_TE_HEADS = "tsuika.te_num_attention_heads"
META_UNET_SAMPLE_SIZE = "tsuika.unet_sample_size"  # native latent side (not in the weights)
META_PREDICTION = "modelspec.prediction_type"

# diffusers ResnetBlock2D -> LDM ResBlock (the LDM names are Sequential indices).
_UNET_RESNET_LEAVES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
)
# Inside a spatial transformer both libraries use the same names.
_TRANSFORMER_OUTER_LEAVES = ("norm", "proj_in", "proj_out")
_TRANSFORMER_BLOCK_LEAVES = (
    "norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "norm2", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "norm3", "ff.net.0.proj", "ff.net.2",
)
# diffusers AutoencoderKL resnet / mid attention -> LDM VAE.
_VAE_RESNET_LEAVES = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"),
                      ("conv2", "conv2"))
VAE_ATTENTION_LEAVES = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                        ("to_out.0", "proj_out"))

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# The UNet config fields that change the module layout in ways the LDM SD1/SD2 layout
# cannot express; each must keep its default value.
_UNSUPPORTED_UNET_FIELDS = {
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
    "dual_cross_attention": False, "attention_type": "default",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}

# Parameter names of a transformers CLIPTextModel (transformers >= 5: no ``text_model.``).
CLIP_TEXT_KEY_PATTERN = re.compile(
    r"^(embeddings\.(token_embedding|position_embedding)\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
    r"\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias))$")


class LdmCheckpointError(ValueError):
    """A model, config or checkpoint that the SD1.x / SD2.x single-file layout cannot represent."""


def _per_level(value: Any, levels: int, name: str) -> list[int]:
    """``value`` (an int or one int per level) as a list of ``levels`` ints."""
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, Sequence) and len(value) == levels and all(
            isinstance(v, int) for v in value):
        return list(value)
    raise LdmCheckpointError(
        f"unet config {name} = {value!r}: expected an int or a list of {levels} ints (one per "
        "block); per-layer nested lists are not supported by the SD1.x/SD2.x LDM layout.")


def unet_layout(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The layout facts of a diffusers UNet config, validated against the LDM SD1/SD2 layout.

    Args:
        unet_config: a ``UNet2DConditionModel`` config (dict or the model's ``.config``).

    Returns:
        dict with ``channels`` (list), ``layers`` (res blocks per level), ``down_attention`` /
        ``up_attention`` (bool per level, up in diffusers order), ``down_depth`` / ``up_depth``
        (transformer blocks per level) and ``mid_depth``.
    """
    for field, default in _UNSUPPORTED_UNET_FIELDS.items():
        if unet_config.get(field, default) != default:
            raise LdmCheckpointError(
                f"unet config {field} = {unet_config.get(field)!r} is not part of the SD1.x/"
                f"SD2.x single-file layout (expected {default!r}).")
    channels = [int(c) for c in unet_config["block_out_channels"]]
    levels = len(channels)
    layers = unet_config.get("layers_per_block", 2)
    if not isinstance(layers, int) or layers < 1:
        raise LdmCheckpointError(
            f"unet config layers_per_block = {layers!r}: the LDM layout needs one int >= 1.")
    down_types = list(unet_config.get("down_block_types", ()))
    up_types = list(unet_config.get("up_block_types", ()))
    if len(down_types) != levels or len(up_types) != levels:
        raise LdmCheckpointError(
            f"unet config has {levels} block_out_channels but {len(down_types)} "
            f"down_block_types and {len(up_types)} up_block_types; they must match.")
    bad = sorted({t for t in down_types if t not in (_CROSS_DOWN, _PLAIN_DOWN)}
                 | {t for t in up_types if t not in (_CROSS_UP, _PLAIN_UP)})
    if bad:
        raise LdmCheckpointError(
            f"unet block types {bad} are not in the SD1.x/SD2.x layout; supported: "
            f"{_CROSS_DOWN}, {_PLAIN_DOWN}, {_CROSS_UP}, {_PLAIN_UP}.")
    down_attention = [t == _CROSS_DOWN for t in down_types]
    up_attention = [t == _CROSS_UP for t in up_types]
    # The LDM UNet places attention by resolution, so the decoder mirrors the encoder.
    if up_attention != down_attention[::-1]:
        raise LdmCheckpointError(
            f"unet up_block_types {up_types} do not mirror down_block_types {down_types}; "
            "the LDM layout has attention at the same resolutions on both sides.")
    depth = _per_level(unet_config.get("transformer_layers_per_block", 1), levels,
                       "transformer_layers_per_block")
    reverse = unet_config.get("reverse_transformer_layers_per_block")
    up_depth = depth[::-1] if reverse is None else _per_level(
        reverse, levels, "reverse_transformer_layers_per_block")
    return {"channels": channels, "layers": layers, "down_attention": down_attention,
            "up_attention": up_attention, "down_depth": depth, "up_depth": up_depth,
            "mid_depth": depth[-1]}


def _add_unet_resnet(table: dict[str, str], diff: str, ldm: str, c_in: int, c_out: int) -> None:
    for d_leaf, l_leaf in _UNET_RESNET_LEAVES:
        table[f"{diff}.{d_leaf}"] = f"{ldm}.{l_leaf}"
    if c_in != c_out:  # both libraries add a 1x1 shortcut only when the width changes
        table[f"{diff}.conv_shortcut"] = f"{ldm}.skip_connection"


def _add_transformer(table: dict[str, str], diff: str, ldm: str, depth: int) -> None:
    for leaf in _TRANSFORMER_OUTER_LEAVES:
        table[f"{diff}.{leaf}"] = f"{ldm}.{leaf}"
    for block in range(depth):
        for leaf in _TRANSFORMER_BLOCK_LEAVES:
            name = f"transformer_blocks.{block}.{leaf}"
            table[f"{diff}.{name}"] = f"{ldm}.{name}"


def unet_module_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Every parametrised UNet module: diffusers module path -> LDM module path.

    LDM paths are relative to ``model.diffusion_model.`` (e.g.
    ``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"`` ->
    ``"input_blocks.1.1.transformer_blocks.0.attn1.to_q"``, ``"conv_in"`` ->
    ``"input_blocks.0.0"``, ``"time_embedding.linear_1"`` -> ``"time_embed.0"``).
    A state-dict key is ``<module path>.<weight|bias>`` on both sides.

    Args:
        unet_config: a ``UNet2DConditionModel`` config of the SD1.x / SD2.x kind.

    Raises:
        LdmCheckpointError: the config uses blocks the LDM layout cannot express.
    """
    lay = unet_layout(unet_config)
    channels, layers = lay["channels"], lay["layers"]
    levels = len(channels)
    table = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0",
             "conv_out": "out.2"}
    # Encoder: input_blocks.0 is conv_in, then per level `layers` (resnet[, attention])
    # entries and, except on the last level, one downsampler entry.
    c_in = channels[0]
    for level, c_out in enumerate(channels):
        for j in range(layers):
            idx = 1 + level * (layers + 1) + j
            _add_unet_resnet(table, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{idx}.0",
                             c_in if j == 0 else c_out, c_out)
            if lay["down_attention"][level]:
                _add_transformer(table, f"down_blocks.{level}.attentions.{j}",
                                 f"input_blocks.{idx}.1", lay["down_depth"][level])
        if level < levels - 1:
            idx = 1 + level * (layers + 1) + layers
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
        c_in = c_out
    mid = channels[-1]
    _add_unet_resnet(table, "mid_block.resnets.0", "middle_block.0", mid, mid)
    _add_transformer(table, "mid_block.attentions.0", "middle_block.1", lay["mid_depth"])
    _add_unet_resnet(table, "mid_block.resnets.1", "middle_block.2", mid, mid)
    # Decoder: layers + 1 entries per level; each resnet also takes the skip connection.
    rev = channels[::-1]
    for level in range(levels):
        prev_out = rev[max(level - 1, 0)]
        c_out, skip_last = rev[level], rev[min(level + 1, levels - 1)]
        for j in range(layers + 1):
            idx = level * (layers + 1) + j
            skip = skip_last if j == layers else c_out
            res_in = (prev_out if j == 0 else c_out) + skip
            _add_unet_resnet(table, f"up_blocks.{level}.resnets.{j}", f"output_blocks.{idx}.0",
                             res_in, c_out)
            if lay["up_attention"][level]:
                _add_transformer(table, f"up_blocks.{level}.attentions.{j}",
                                 f"output_blocks.{idx}.1", lay["up_depth"][level])
        if level < levels - 1:
            idx = level * (layers + 1) + layers
            slot = 2 if lay["up_attention"][level] else 1
            table[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{idx}.{slot}.conv"
    return table


def _add_vae_resnet(table: dict[str, str], diff: str, ldm: str, c_in: int, c_out: int) -> None:
    for d_leaf, l_leaf in _VAE_RESNET_LEAVES:
        table[f"{diff}.{d_leaf}"] = f"{ldm}.{l_leaf}"
    if c_in != c_out:
        table[f"{diff}.conv_shortcut"] = f"{ldm}.nin_shortcut"


def _add_vae_mid(table: dict[str, str], side: str, channels: int, attention: bool) -> None:
    _add_vae_resnet(table, f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", channels,
                    channels)
    if attention:
        for d_leaf, l_leaf in VAE_ATTENTION_LEAVES:
            table[f"{side}.mid_block.attentions.0.{d_leaf}"] = f"{side}.mid.attn_1.{l_leaf}"
    _add_vae_resnet(table, f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", channels,
                    channels)


def vae_module_map(vae_config: Mapping[str, Any]) -> dict[str, str]:
    """Every parametrised VAE module: diffusers ``AutoencoderKL`` path -> LDM path.

    LDM paths are relative to ``first_stage_model.``. The LDM decoder numbers its ``up.N``
    levels from the lowest resolution's opposite end (``up_blocks.0`` is ``up.{levels-1}``).

    Args:
        vae_config: an ``AutoencoderKL`` config of the SD1.x / SD2.x kind.

    Raises:
        LdmCheckpointError: block types other than the plain encoder / decoder blocks.
    """
    channels = [int(c) for c in vae_config["block_out_channels"]]
    levels, layers = len(channels), int(vae_config.get("layers_per_block", 1))
    types = set(vae_config.get("down_block_types", ())) | set(vae_config.get("up_block_types", ()))
    if not types <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise LdmCheckpointError(
            f"vae block types {sorted(types)} are not in the SD1.x/SD2.x layout; supported: "
            "DownEncoderBlock2D, UpDecoderBlock2D.")
    attention = bool(vae_config.get("mid_block_add_attention", True))
    table = {}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_in"] = f"{side}.conv_in"
        table[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        table[f"{side}.conv_out"] = f"{side}.conv_out"
    if vae_config.get("use_quant_conv", True):
        table["quant_conv"] = "quant_conv"
    if vae_config.get("use_post_quant_conv", True):
        table["post_quant_conv"] = "post_quant_conv"
    c_in = channels[0]
    for level, c_out in enumerate(channels):
        for j in range(layers):
            _add_vae_resnet(table, f"encoder.down_blocks.{level}.resnets.{j}",
                            f"encoder.down.{level}.block.{j}", c_in if j == 0 else c_out, c_out)
        if level < levels - 1:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = \
                f"encoder.down.{level}.downsample.conv"
        c_in = c_out
    _add_vae_mid(table, "encoder", channels[-1], attention)
    _add_vae_mid(table, "decoder", channels[-1], attention)
    rev = channels[::-1]
    for level in range(levels):
        ldm_level = levels - 1 - level
        c_in, c_out = rev[max(level - 1, 0)], rev[level]
        for j in range(layers + 1):
            _add_vae_resnet(table, f"decoder.up_blocks.{level}.resnets.{j}",
                            f"decoder.up.{ldm_level}.block.{j}", c_in if j == 0 else c_out, c_out)
        if level < levels - 1:
            table[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = \
                f"decoder.up.{ldm_level}.upsample.conv"
    return table


# -- key-level checks ----------------------------------------------------------------------------
def indices(keys, prefix: str) -> list[int]:
    """Sorted distinct N of keys starting with ``prefix.N.``."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def strip_prefix(checkpoint: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under ``prefix``, renamed without it (tensors are not copied)."""
    return {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}


def _top_prefixes(keys) -> list[str]:
    return sorted({".".join(k.split(".")[:2]) for k in keys})[:10]


def detect(keys) -> str | None:
    """``"sd1"`` / ``"sd2"`` when ``keys`` look like an SD1.x / SD2.x single file, else None.

    Args:
        keys: the checkpoint's tensor names (no tensors needed).
    """
    keys = list(keys)
    if not any(k.startswith(UNET_PREFIX) for k in keys) or any(
            k.startswith("conditioner.") or k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        return None
    if any(k.startswith(OPEN_CLIP_PREFIX + "transformer.") for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_OLD_PREFIX) for k in keys):
        return "sd1"
    return None


def check_supported_layout(keys: list[str]) -> str:
    """The text-encoder layout; raises a clear error for anything else."""
    if any(k.startswith("conditioner.embedders.") for k in keys) or any(
            k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        raise LdmCheckpointError(
            "this checkpoint looks like SDXL (or another class-conditioned UNet such as SD2 "
            "unCLIP): found conditioner.embedders.* / model.diffusion_model.label_emb.*; "
            + SUPPORTED_LAYOUTS + ".")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        hint = (" It looks like a bare UNet (ComfyUI models/unet): a full checkpoint is needed."
                if "input_blocks.0.0.weight" in keys else "")
        raise LdmCheckpointError(f"no UNet (model.diffusion_model.*) in the checkpoint; found "
                                 f"prefixes {_top_prefixes(keys)}.{hint} {SUPPORTED_LAYOUTS}.")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise LdmCheckpointError("no VAE (first_stage_model.*) in the checkpoint; found prefixes "
                                 f"{_top_prefixes(keys)}. {SUPPORTED_LAYOUTS}.")
    if any(k.startswith(OPEN_CLIP_PREFIX + "transformer.") for k in keys):
        return "open_clip"
    if any(k.startswith(CLIP_OLD_PREFIX) for k in keys):
        return "hf_clip"
    raise LdmCheckpointError("no text encoder (cond_stage_model.transformer.* or "
                             "cond_stage_model.model.*) in the checkpoint; found prefixes "
                             f"{_top_prefixes(keys)}. {SUPPORTED_LAYOUTS}.")


def check_text_keys(te_sd: dict, layers: int, what: str) -> None:
    """Raise unless ``te_sd`` is exactly a ``layers``-layer ``CLIPTextModel`` state dict."""
    bad = sorted(k for k in te_sd if not CLIP_TEXT_KEY_PATTERN.match(k))
    found = indices(te_sd, "encoder.layers")
    if bad or found != list(range(layers)) or len(te_sd) != 4 + 16 * layers:
        raise LdmCheckpointError(f"{what}: text-encoder keys do not form a {layers}-layer CLIP "
                                 f"text model (unexpected {bad[:6]}, layers {found}, "
                                 f"{len(te_sd)} tensors).")


# -- metadata hints ------------------------------------------------------------------------------
def read_hint(metadata: Mapping[str, str] | None, key: str) -> Any:
    """A JSON-encoded metadata hint, or None."""
    if not metadata or key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except (TypeError, ValueError) as e:
        raise LdmCheckpointError(f"metadata {key} = {metadata[key]!r} is not valid JSON; "
                                 "remove it or write e.g. '8' or '[5, 10, 20, 20]'.") from e


def config_metadata_hints(unet_config: Mapping[str, Any] | None = None,
                          vae_config: Mapping[str, Any] | None = None,
                          text_encoder_config: Any = None) -> dict[str, str]:
    """The ``tsuika.*`` safetensors metadata that lets :func:`infer_sd_configs` rebuild the
    values shapes cannot tell (head counts, norm groups) for any model size.

    Args:
        unet_config: the UNet config (``attention_head_dim``, ``norm_num_groups``).
        vae_config: the VAE config (``norm_num_groups``).
        text_encoder_config: a ``CLIPTextConfig`` or dict (``num_attention_heads``).
    """
    hints = {}
    if unet_config is not None:
        heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim", 8)
        hints[META_UNET_HEADS] = json.dumps(list(heads) if not isinstance(heads, int) else heads)
        hints[META_UNET_GROUPS] = json.dumps(int(unet_config.get("norm_num_groups", 32)))
        if isinstance(unet_config.get("sample_size"), int):
            hints[META_UNET_SAMPLE_SIZE] = json.dumps(unet_config["sample_size"])
    if vae_config is not None:
        hints[META_VAE_GROUPS] = json.dumps(int(vae_config.get("norm_num_groups", 32)))
    if text_encoder_config is not None:
        heads = (text_encoder_config["num_attention_heads"]
                 if isinstance(text_encoder_config, Mapping)
                 else text_encoder_config.num_attention_heads)
        hints[META_TE_HEADS] = json.dumps(int(heads))
    return hints
