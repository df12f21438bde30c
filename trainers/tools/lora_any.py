"""A LoRA of any layout ``formats.lora_layouts.read_lora`` takes (kohya, LyCORIS LoCon,
diffusers/peft, ComfyUI-native) as kohya-named modules, so resize and LoRA-merge work on
every one of them and write kohya names.

Kohya files are read as they are (no model needed). diffusers/peft files name their module
paths, which become kohya names by rule. ComfyUI-native files name UNet modules in the LDM
layout: with a model given they are mapped through its UNet; without one through the stock
UNet of the LoRA's family (SD1.x or SDXL, from its keys and metadata), which is right for
LoRAs of the released models; a LoRA of another UNet needs its model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ..formats.lora_family import lora_family
from ..formats.lora_keys import COMPONENTS, kohya_name
from ..formats.lora_layouts import detect_format, read_lora
from ..formats.lora_state import LoraStateDict

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "families" / "configs"


def ldm_to_diffusers_map(unet_config: Mapping) -> dict[str, str] | None:
    """LDM -> diffusers UNet module paths of an SD1.x/SD2.x or SDXL UNet config; None for a
    UNet the single-file layouts do not describe."""
    from ..formats.ldm_unet_keys import unet_module_map
    from ..formats.sdxl_checkpoint import sdxl_unet_module_map

    for make in (unet_module_map, sdxl_unet_module_map):
        try:
            return {ldm: diff for diff, ldm in make(dict(unet_config)).items()}
        except ValueError:  # not this layout: try the next
            continue
    return None


def stock_unet_config(family: str) -> dict | None:
    """The released model's UNet config of ``family`` shipped with Tsuika, or None."""
    path = CONFIGS / family / "unet.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _comfy_family(tensors: Mapping[str, torch.Tensor], metadata) -> str:
    family, _ = lora_family(tensors, metadata)
    if family:
        return family
    return "sdxl" if any(k.startswith("text_encoders.clip_g.") for k in tensors) else "sd15"


def as_kohya_raw(lsd: LoraStateDict) -> LoraStateDict:
    """``lsd`` with each module path replaced by its kohya name after the component prefix
    (the form :func:`tools.lora_files.raw_kohya_tensors` writes back)."""
    out = LoraStateDict(metadata=dict(lsd.metadata))
    for (component, path), w in lsd.modules.items():
        name = kohya_name(component, path)
        out.add(component, name[len(COMPONENTS[component].prefix):], w, name)
    return out


def read_any_raw(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 bundle=None) -> LoraStateDict:
    """A LoRA of any known layout as kohya-named modules (see the module docstring).

    Args:
        tensors: the LoRA's tensors (a file's, or a LORA_MODEL's).
        metadata: its metadata.
        bundle: the model it is for (a ``ModelBundle``); checks every module exists and maps
            ComfyUI-native and LDM-named kohya UNet names through its UNet. None: no model.

    Raises:
        LoraFormatError: an unknown layout, leftover keys, unsupported parts.
        LoraKeyError: a module the model (or the stock UNet) does not have.
    """
    from .lora_files import read_kohya_raw, read_lora_for

    if bundle is not None:
        return as_kohya_raw(read_lora_for(bundle, dict(tensors), metadata))
    fmt = detect_format(tensors)
    if fmt.name == "kohya":
        return read_kohya_raw(tensors, metadata)
    ldm_map = None
    if fmt.name == "comfy":
        family = _comfy_family(tensors, metadata)
        config = stock_unet_config(family)
        ldm_map = ldm_to_diffusers_map(config) if config else None
        log.info("ComfyUI-native LoRA: UNet names mapped through the stock %s UNet", family)
    return as_kohya_raw(read_lora(dict(tensors), None, metadata=metadata,
                                  ldm_to_diffusers_module_map=ldm_map))
