"""SDXL single-file checkpoints (the original Stability ``sgm`` layout) <-> diffusers.

An SDXL single file holds four models:

* ``model.diffusion_model.*``  the UNet, SD1's LDM block layout plus ``label_emb.0.{0,2}``
  (diffusers' ``add_embedding``: the pooled text embedding and the size / crop time ids),
* ``first_stage_model.*``      the VAE, laid out as SD1's,
* ``conditioner.embedders.0.transformer.text_model.*``  CLIP-L in Hugging Face naming,
* ``conditioner.embedders.1.model.*``  OpenCLIP ViT-bigG's text tower: fused ``in_proj``
  attention weights, ``text_projection`` stored as the (width, dim) matrix OpenCLIP
  multiplies by (transformers keeps its transpose as a Linear weight).

This is what ComfyUI's CheckpointLoaderSimple and A1111/Forge read. The architecture comes
from tensor shapes through the SD1 rules of ``ldm_config`` (UNet, VAE) and this module's
text-encoder rules; ``tsuika.*`` metadata hints give what shapes cannot (head counts of tiny
models). Every key is accounted for both ways. Pure dict in, dict out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .diffusers_to_ldm import _translate
from .ldm_config import _infer_unet, _infer_vae, _prediction_type
from .ldm_unet_keys import (
    UNET_PREFIX,
    VAE_ATTENTION_LEAVES,
    VAE_PREFIX,
    LdmCheckpointError,
    check_text_keys,
    indices,
    read_hint,
    strip_prefix,
    unet_module_map,
    vae_module_map,
)

log = logging.getLogger(__name__)

TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TE2_PREFIX = "conditioner.embedders.1.model."
META_TE1_HEADS = "tsuika.te1_num_attention_heads"
META_TE2_HEADS = "tsuika.te2_num_attention_heads"
VAE_SCALING = 0.13025  # SDXL's VAE latent scale (SD1's is 0.18215)
# Keys every loader rebuilds or ignores: buffers, CLIP-L's unused projection, OpenCLIP's
# contrastive temperature.
_IGNORED_TEXT = (TE1_PREFIX + "embeddings.position_ids", "conditioner.embedders.0.transformer."
                 "text_projection.weight", "conditioner.embedders.0.logit_scale",
                 TE2_PREFIX + "logit_scale", TE2_PREFIX + "attn_mask")
# diffusers' UNet config fields of the SDXL time / text embedding, beyond SD1's layout.
_ADDITION_FIELDS = ("addition_embed_type", "addition_time_embed_dim",
                    "projection_class_embeddings_input_dim", "addition_embed_type_num_heads")
# OpenCLIP resblock leaf -> transformers CLIPEncoderLayer leaf (in_proj is split apart).
_OPEN_CLIP_LEAVES = (("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"),
                     ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
_V_TRUE = {"true", "1", "yes"}


class SdxlConversion(NamedTuple):
    """Result of :func:`sdxl_to_diffusers`: state dicts, configs and what was inferred."""

    unet: dict
    vae: dict
    text_encoder_1: dict
    text_encoder_2: dict
    unet_config: dict
    vae_config: dict
    text_encoder_1_config: dict
    text_encoder_2_config: dict
    info: dict


def detect(keys) -> bool:
    """Whether tensor names ``keys`` are an SDXL single file (UNet + both embedders)."""
    keys = list(keys)
    return (any(k.startswith(UNET_PREFIX) for k in keys)
            and any(k.startswith(TE2_PREFIX + "transformer.resblocks.") for k in keys)
            and any(k.startswith("conditioner.embedders.0.transformer.") for k in keys))


def sdxl_unet_module_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Every parametrised SDXL UNet module: diffusers path -> LDM path (under
    ``model.diffusion_model.``): SD1's table plus ``add_embedding`` -> ``label_emb.0``.

    Args:
        unet_config: an SDXL ``UNet2DConditionModel`` config (``addition_embed_type``
            ``"text_time"``).

    Raises:
        LdmCheckpointError: another kind of added embedding, or blocks the layout lacks.
    """
    kind = unet_config.get("addition_embed_type")
    if kind != "text_time":
        raise LdmCheckpointError(f"unet config addition_embed_type = {kind!r}: an SDXL UNet has "
                                 "'text_time' (pooled text embedding + size/crop time ids).")
    table = unet_module_map({k: v for k, v in unet_config.items() if k not in _ADDITION_FIELDS})
    table["add_embedding.linear_1"] = "label_emb.0.0"
    table["add_embedding.linear_2"] = "label_emb.0.2"
    return table


# -- OpenCLIP text tower <-> transformers CLIPTextModelWithProjection ----------------------------
def open_clip_to_hf(part: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower tensors (prefix stripped) as ``CLIPTextModelWithProjection`` keys.

    Raises:
        LdmCheckpointError: a key that is not part of the text tower.
    """
    out, unknown = {}, []
    for key, t in part.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = t
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = t
        elif key in ("ln_final.weight", "ln_final.bias"):
            out[f"text_model.final_layer_norm.{key.split('.')[1]}"] = t
        elif key == "text_projection":
            out["text_projection.weight"] = t.t().contiguous()
        elif key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            layer = int(key.split(".")[2])
            param = "weight" if key.endswith("weight") else "bias"
            for name, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{param}"] = chunk
        elif m and (leaf := dict(_OPEN_CLIP_LEAVES).get(m.group(2))):
            out[f"text_model.encoder.layers.{m.group(1)}.{leaf}.{m.group(3)}"] = t
        else:
            unknown.append(key)
    if unknown:
        raise LdmCheckpointError(f"OpenCLIP text encoder ({TE2_PREFIX}*): {len(unknown)} keys "
                                 f"are not part of its text tower, e.g. {sorted(unknown)[:6]}.")
    return out


def hf_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` tensors in OpenCLIP naming (q, k, v fused again).

    Raises:
        LdmCheckpointError: the projection or a key outside the text model.
    """
    sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v
          for k, v in state.items() if not k.endswith("position_ids")}
    if "text_projection.weight" not in sd:
        raise LdmCheckpointError("text_encoder_2 has no text_projection.weight: SDXL's second "
                                 "encoder is a CLIPTextModelWithProjection.")
    out = {"text_projection": sd.pop("text_projection.weight").t().contiguous()}
    check_text_keys(sd, len(indices(sd, "encoder.layers")), "text_encoder_2")
    inverse = {hf: oc for oc, hf in _OPEN_CLIP_LEAVES}
    for key, t in sd.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = t
        else:
            _, _, layer, rest = key.split(".", 3)
            leaf, param = rest.rsplit(".", 1)
            if leaf.startswith("self_attn.") and leaf[len("self_attn."):] in (
                    "q_proj", "k_proj", "v_proj"):
                if leaf == "self_attn.q_proj":
                    parts = [sd[f"encoder.layers.{layer}.self_attn.{n}_proj.{param}"]
                             for n in "qkv"]
                    out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(parts)
                continue
            out[f"transformer.resblocks.{layer}.{inverse[leaf]}.{param}"] = t
    return out


# -- architecture from shapes -------------------------------------------------------------------
def _text_config(te: Mapping[str, torch.Tensor], metadata, hint_key: str, act: str,
                 rules: list[str], what: str) -> dict:
    # CLIPTextModel (transformers 5) has no ``text_model.`` level, the projection model has.
    te = {(k[len("text_model."):] if k.startswith("text_model.") else k): v
          for k, v in te.items()}
    vocab, hidden = te["embeddings.token_embedding.weight"].shape
    hint = read_hint(metadata, hint_key)
    heads = int(hint) if hint is not None else max(1, int(hidden) // 64)
    rules.append(f"{what} num_attention_heads={heads}: "
                 + (f"from metadata {hint_key}" if hint is not None else "64-wide heads (CLIP)"))
    if hidden % heads:
        raise LdmCheckpointError(f"{what} hidden size {hidden} is not divisible by {heads} "
                                 f"heads; store the right value in metadata {hint_key}.")
    proj = te.get("text_projection.weight")
    cfg = {"vocab_size": int(vocab), "hidden_size": int(hidden),
           "intermediate_size": int(te["encoder.layers.0.mlp.fc1.weight"].shape[0]),
           "num_hidden_layers": len(indices(te, "encoder.layers")),
           "num_attention_heads": heads,
           "max_position_embeddings": int(
               te["embeddings.position_embedding.weight"].shape[0]),
           "hidden_act": act, "layer_norm_eps": 1e-5,
           "projection_dim": int(proj.shape[0]) if proj is not None else int(hidden)}
    if vocab == 49408:
        cfg.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return cfg


def _v_prediction(checkpoint, metadata, in_channels: int) -> tuple[str, str]:
    pred, why = _prediction_type(checkpoint, metadata, "sdxl", in_channels)
    if pred == "epsilon" and str((metadata or {}).get("ss_v_parameterization", "")).lower() \
            in _V_TRUE:
        return "v_prediction", "metadata ss_v_parameterization=True"
    return pred, why


def sdxl_to_diffusers(checkpoint: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> SdxlConversion:
    """Split an SDXL single-file checkpoint into diffusers / transformers state dicts.

    Args:
        checkpoint: tensor name -> tensor in the sgm layout (not modified).
        metadata: the file's safetensors metadata (prediction type, ``tsuika.*`` hints).

    Returns:
        ``SdxlConversion``; text-encoder keys follow transformers 5 (``CLIPTextModel``
        without ``text_model.``, ``CLIPTextModelWithProjection`` with it), ``info`` holds family,
        prediction_type, prediction_rule, zero_terminal_snr, rules and ignored_keys.

    Raises:
        LdmCheckpointError: a missing model, or keys that do not fit the inferred architecture.
    """
    keys = list(checkpoint)
    if not detect(keys):
        raise LdmCheckpointError("not an SDXL single file: it needs model.diffusion_model.*, "
                                 "conditioner.embedders.0.transformer.* and "
                                 "conditioner.embedders.1.model.transformer.*.")
    rules: list[str] = []
    unet_part = strip_prefix(checkpoint, UNET_PREFIX)
    if "label_emb.0.0.weight" not in unet_part:
        raise LdmCheckpointError("SDXL UNet without model.diffusion_model.label_emb.0.0.weight "
                                 "(the pooled-text / time-id embedding); the file is incomplete.")
    te1 = {k: v for k, v in strip_prefix(checkpoint, TE1_PREFIX).items()
           if TE1_PREFIX + k not in _IGNORED_TEXT}
    check_text_keys(te1, len(indices(te1, "encoder.layers")), f"CLIP-L ({TE1_PREFIX}*)")
    te2 = open_clip_to_hf({k: v for k, v in strip_prefix(checkpoint, TE2_PREFIX).items()
                           if TE2_PREFIX + k not in _IGNORED_TEXT})
    te1_cfg = _text_config(te1, metadata, META_TE1_HEADS, "quick_gelu", rules, "text_encoder_1")
    te2_cfg = _text_config(te2, metadata, META_TE2_HEADS, "gelu", rules, "text_encoder_2")
    unet_cfg = _infer_unet(unet_part, metadata, rules)
    width = te1_cfg["hidden_size"] + te2_cfg["hidden_size"]
    if unet_cfg["cross_attention_dim"] != width:
        raise LdmCheckpointError(f"the UNet's cross_attention_dim {unet_cfg['cross_attention_dim']}"
                                 f" is not the two text encoders' widths together ({width}).")
    adm = int(unet_part["label_emb.0.0.weight"].shape[1])
    time_dim, rest = divmod(adm - te2_cfg["projection_dim"], 6)
    if rest or time_dim <= 0:
        raise LdmCheckpointError(f"label_emb input width {adm} is not the pooled width "
                                 f"{te2_cfg['projection_dim']} plus six time-id embeddings.")
    unet_cfg.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                    projection_class_embeddings_input_dim=adm, addition_embed_type_num_heads=64)
    side = read_hint(metadata, "tsuika.unet_sample_size")
    unet_cfg["sample_size"] = side if isinstance(side, int) and side > 0 else 128
    vae_cfg = _infer_vae(strip_prefix(checkpoint, VAE_PREFIX), metadata, rules)
    vae_cfg.update(scaling_factor=VAE_SCALING, force_upcast=True,
                   sample_size=unet_cfg["sample_size"] * 8)
    pred, why = _v_prediction(checkpoint, metadata, unet_cfg["in_channels"])
    rules.append(f"prediction_type={pred}: {why}")

    unet_sd = _rename(unet_part, sdxl_unet_module_map(unet_cfg), "UNet")
    vae_sd = _rename(strip_prefix(checkpoint, VAE_PREFIX), vae_module_map(vae_cfg), "VAE")
    for k, v in vae_sd.items():  # the LDM VAE's attention is 1x1 convolutions
        if ".mid_block.attentions.0." in k and k.endswith(".weight") and v.ndim == 4:
            vae_sd[k] = v[:, :, 0, 0]
    used = {UNET_PREFIX + k for k in unet_part} | {
        k for k in keys if k.startswith((VAE_PREFIX, TE1_PREFIX, TE2_PREFIX))}
    ignored = sorted(k for k in keys if k not in used or k in _IGNORED_TEXT)
    for rule in rules:
        log.info("SDXL single-file config: %s", rule)
    info = {"family": "sdxl", "prediction_type": pred, "prediction_rule": why,
            "zero_terminal_snr": "ztsnr" in checkpoint, "rules": rules, "ignored_keys": ignored}
    return SdxlConversion(unet_sd, vae_sd, te1, te2, unet_cfg, vae_cfg, te1_cfg, te2_cfg, info)


def _rename(part: Mapping[str, torch.Tensor], module_map: dict[str, str], what: str) -> dict:
    inverse = {ldm: diff for diff, ldm in module_map.items()}
    out, unknown = {}, []
    for key, t in part.items():
        module, _, param = key.rpartition(".")
        if module in inverse:
            out[f"{inverse[module]}.{param}"] = t
        else:
            unknown.append(key)
    seen = {k.rpartition(".")[0] for k in out}
    missing = sorted(set(module_map) - seen)
    if unknown or missing:
        raise LdmCheckpointError(f"SDXL {what}: keys do not fit the inferred architecture "
                                 f"(unexpected {sorted(unknown)[:6]}, missing modules "
                                 f"{missing[:6]}).")
    return out


def diffusers_to_sdxl(unet_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor],
                      te1_sd: Mapping[str, torch.Tensor], te2_sd: Mapping[str, torch.Tensor],
                      unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], *,
                      prediction_type: str = "epsilon") -> dict[str, torch.Tensor]:
    """Assemble an SDXL single-file state dict (the layout CheckpointLoaderSimple reads).

    Tensors are shared where the layouts agree (OpenCLIP's fused attention and projection
    are new tensors).

    Args:
        unet_sd: ``UNet2DConditionModel.state_dict()`` of an SDXL UNet.
        vae_sd: ``AutoencoderKL.state_dict()``.
        te1_sd: ``CLIPTextModel.state_dict()`` (CLIP-L).
        te2_sd: ``CLIPTextModelWithProjection.state_dict()`` (OpenCLIP-G).
        unet_config: the UNet's config; drives the key table.
        vae_config: the VAE's config.
        prediction_type: ``"v_prediction"`` adds the ``v_pred`` marker ComfyUI reads.

    Raises:
        LdmCheckpointError: a key that does not belong to the configured model.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise LdmCheckpointError(f"prediction_type = {prediction_type!r}; choose 'epsilon' or "
                                 "'v_prediction'.")
    out: dict[str, torch.Tensor] = {}
    _translate(out, unet_sd, sdxl_unet_module_map(unet_config), UNET_PREFIX, "UNet")
    attention = frozenset(f"{side}.mid_block.attentions.0.{leaf}" for side in ("encoder", "decoder")
                          for leaf, _ in VAE_ATTENTION_LEAVES if leaf != "group_norm")
    _translate(out, vae_sd, vae_module_map(vae_config), VAE_PREFIX, "VAE", attention)
    te1 = {(k[len("text_model."):] if k.startswith("text_model.") else k): v
           for k, v in te1_sd.items() if not k.endswith("position_ids")}
    check_text_keys(te1, len(indices(te1, "encoder.layers")), "text_encoder_1")
    out.update({TE1_PREFIX + k: v for k, v in te1.items()})
    out.update({TE2_PREFIX + k: v for k, v in hf_to_open_clip(te2_sd).items()})
    if prediction_type == "v_prediction":
        out["v_pred"] = torch.tensor([])
    return out


def sdxl_metadata_hints(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                        te1_config: Any, te2_config: Any) -> dict[str, str]:
    """The ``tsuika.*`` metadata :func:`sdxl_to_diffusers` reads where shapes cannot tell."""
    from .ldm_unet_keys import config_metadata_hints

    hints = config_metadata_hints(unet_config, vae_config)

    def heads(cfg) -> str:
        return str(int(cfg["num_attention_heads"] if isinstance(cfg, Mapping)
                       else cfg.num_attention_heads))

    hints[META_TE1_HEADS] = heads(te1_config)
    hints[META_TE2_HEADS] = heads(te2_config)
    return hints
