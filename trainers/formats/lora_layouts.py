"""LoRA file layouts (kohya, diffusers/peft, ComfyUI-native) <-> one in-memory form.

Each layout is a module with a ``detect(keys)`` / ``read(...)`` class: ``formats.kohya``
(also the one writer, :func:`formats.kohya.kohya_tensors`), ``formats.peft_layout``,
``formats.comfy_lora``; the canonical form is ``formats.lora_state.LoraStateDict``. This
module is the explicit list of layouts and the entry points that pick one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from .comfy_lora import ComfyFormat
from .kohya import KohyaFormat
from .lora_family import family_mismatch, lora_family, model_family_of
from .lora_keys import ModuleIndex
from .lora_state import LoraFormatError, LoraStateDict, LoraWeights, check_lora_weights
from .peft_layout import ADAPTER_METADATA_KEY, PeftFormat

log = logging.getLogger(__name__)

FORMATS: list = [KohyaFormat(), PeftFormat(), ComfyFormat()]


def get_format(name: str):
    """The format called ``name``; a clear error listing the known ones."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise LoraFormatError(f"LoRA format {name!r} is unknown; known formats: "
                          f"{', '.join(f.name for f in FORMATS)}.")


def detect_format(keys: Iterable[str]):
    """The one format whose ``detect`` accepts ``keys``.

    Raises:
        LoraFormatError: no format or several formats match (the message lists them).
    """
    keys = list(keys)
    hits = [fmt for fmt in FORMATS if fmt.detect(keys)]
    if len(hits) == 1:
        return hits[0]
    sample = ", ".join(sorted(keys)[:5]) or "(no keys)"
    known = ", ".join(f.name for f in FORMATS)
    if not hits:
        raise LoraFormatError(f"not a LoRA layout Tsuika knows (keys like {sample}); known "
                              f"formats: {known}.")
    raise LoraFormatError(f"the keys match several LoRA formats ({', '.join(f.name for f in hits)}"
                          f"; keys like {sample}); a file must use one layout. Known: {known}.")


def read_lora(path_or_tensors, module_index: ModuleIndex | None = None, *,
              metadata: Mapping[str, str] | None = None, format: str | None = None,
              component: str | None = None,
              ldm_to_diffusers_module_map: Mapping[str, str] | None = None,
              drop_weight_diffs: bool = False,
              model_family: str | None = None) -> LoraStateDict:
    """Read a LoRA file or state dict of any known layout, consuming every key.

    Args:
        path_or_tensors: a ``.safetensors`` path, or ``{key: tensor}``.
        module_index: the model's module paths (required for kohya; for peft/comfy it checks
            every module exists and picks the model's spelling of text-encoder paths).
        metadata: metadata of a state dict passed in memory (a file brings its own).
        format: force a layout by name instead of detecting it.
        component: model part of raw peft keys that carry no ``unet.`` / ``text_encoder.``.
        ldm_to_diffusers_module_map: LDM -> diffusers UNet module paths (comfy files, kohya
            files in LDM naming).
        drop_weight_diffs: read a ComfyUI file's LoRA part and drop its ``.diff`` keys.
        model_family: the family of the model it is for (``"sdxl"``); None reads it from
            ``module_index``'s text-encoder components when it has them.

    Raises:
        LoraFormatError: unknown/ambiguous layout, unsupported parts, leftover keys, bad shapes,
            a LoRA of another model family (the message names both).
        LoraKeyError: a module that the model does not have.
    """
    if isinstance(path_or_tensors, Mapping):
        tensors, file_meta = dict(path_or_tensors), dict(metadata or {})
    else:
        from .safetensors_io import load_safetensors

        tensors, file_meta = load_safetensors(path_or_tensors)
        file_meta.update(metadata or {})
    if model_family is None and module_index is not None:
        model_family = model_family_of(module_index.components)
    refusal = family_mismatch(*lora_family(tensors, file_meta), model_family)
    if refusal:  # before reading: the wrong family's keys would fail with a vaguer message
        raise LoraFormatError(refusal)
    fmt = get_format(format) if format else detect_format(tensors)
    lsd = fmt.read(tensors, file_meta, module_index, component=component,
                   ldm_to_diffusers_module_map=ldm_to_diffusers_module_map,
                   drop_weight_diffs=drop_weight_diffs)
    log.info("read %d LoRA modules (%s layout)", len(lsd.modules), fmt.name)
    return lsd


__all__ = ["ADAPTER_METADATA_KEY", "FORMATS", "ComfyFormat", "KohyaFormat", "LoraFormatError",
           "LoraStateDict", "LoraWeights", "PeftFormat", "check_lora_weights", "detect_format",
           "get_format", "read_lora"]
