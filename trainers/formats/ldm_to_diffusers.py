"""Original-layout (LDM) single-file checkpoint -> diffusers / transformers state dicts.

Pure dict in, dict out (file I/O lives in ``safetensors_io``); the architecture comes from
``ldm_config.infer_sd_configs``, the key tables from ``ldm_unet_keys``. Every LDM key must map
and diffusers must produce exactly the mapped keys, so nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import SimpleNamespace
from typing import NamedTuple

import torch

from .ldm_config import OPEN_CLIP_EXTRAS, SdConfigs, hf_clip_part, infer_sd_configs
from .ldm_unet_keys import (
    CLIP_OLD_PREFIX,
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    LdmCheckpointError,
    check_text_keys,
    strip_prefix,
    unet_module_map,
    vae_module_map,
)

log = logging.getLogger(__name__)


class LdmConversion(NamedTuple):
    """Result of :func:`ldm_to_diffusers`; unpacks as a 7-tuple."""

    unet: dict
    vae: dict
    text_encoder: dict
    unet_config: dict
    vae_config: dict
    text_encoder_config: dict
    info: dict


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
        named = {CLIP_PREFIX + k: v for k, v in hf_clip_part(part).items()}
        out, extra = convert_ldm_clip_checkpoint(named), 0
    else:
        dropped = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layers}."
        extras = tuple(OPEN_CLIP_PREFIX + e for e in OPEN_CLIP_EXTRAS)
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

