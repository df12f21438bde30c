"""diffusers / transformers state dicts -> an original-layout (LDM) single-file checkpoint.

What DreamBooth writes and the fixtures ship: the layout CheckpointLoaderSimple, A1111/Forge
and our own loader read. Pure dict in, dict out, through the same key tables
(``ldm_unet_keys``) as the other direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .ldm_unet_keys import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_ATTENTION_LEAVES,
    VAE_PREFIX,
    LdmCheckpointError,
    check_text_keys,
    indices,
    unet_module_map,
    vae_module_map,
)


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
