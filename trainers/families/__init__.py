"""Model families: what differs between SD1.x, SDXL, ... behind one small interface.

A family knows how to load its models (diffusers folder or single-file checkpoint), encode
captions into the UNet's conditioning, and which components a LoRA can target. The loop and
the methods only talk to this interface, so a new family (SDXL: two text encoders, pooled
embeddings, time ids) is one new module plus one ``FAMILIES.register`` line here;
``model.family``'s choices read the registry.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..device.host_memory import give_back_freed_memory
from ..registry import FAMILIES, RegistryError
from .base import Family, FamilyFacts, ModelBundle, ModelLoadError
from .sd15 import Sd15Family
from .sdxl import SdxlFamily

FAMILIES.register(Sd15Family())
FAMILIES.register(SdxlFamily())


def get_family(name: str) -> Family:
    """The family registered as ``name``; a clear error lists the known ones."""
    try:
        return FAMILIES.get(name)
    except RegistryError as e:
        raise ModelLoadError(str(e)) from None


def family_facts(name: str) -> FamilyFacts:
    """The facts of the family registered as ``name``, or whose kohya
    ``ss_base_model_version`` is ``name`` (metadata written by other tools names that)."""
    for family in FAMILIES.values():
        if name in (family.name, family.facts.base_model_version):
            return family.facts
    known = [n for f in FAMILIES.values() for n in (f.name, f.facts.base_model_version)]
    raise ValueError(f"base_model_version = {name!r} is unknown; known: {', '.join(known)}.")


def family_for_host_model(host_model: str) -> Family | None:
    """The family that reads a host's model of kind ``host_model`` (ComfyUI's model-config
    class name, e.g. ``"SD15"``), or None when no family does."""
    for family in FAMILIES.values():
        if host_model in family.facts.host_models:
            return family
    return None


def detect_family(path: str | Path) -> Family:
    """The family whose ``detect`` accepts the model at ``path``."""
    for family in FAMILIES.values():
        if family.detect(Path(path)):
            return family
    raise ModelLoadError(f"model.path = {str(path)!r} is not a model Tsuika can train yet "
                         f"(supported families: {', '.join(FAMILIES)}); it must be a diffusers "
                         "folder or a single-file .safetensors checkpoint of one of them.")


def load_model(path: str | Path, family: str = "auto", prediction_type: str = "auto",
               dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a base model for training.

    Args:
        path: a diffusers folder or a single-file ``.safetensors`` checkpoint.
        family: a name from ``FAMILIES`` or ``"auto"``.
        prediction_type: ``"auto"`` reads it from the model; or force ``epsilon`` /
            ``v_prediction``.
        dtype: what the UNet and text encoders are stored in once loaded (the VAE stays
            fp32). Loading straight into a run's compute dtype means an fp16 file never
            exists in memory as fp32 as well (peak memory of a load is about the file plus
            its largest module in ``dtype``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model.path = {str(path)!r} does not exist; give a diffusers "
                             "folder or a .safetensors checkpoint.")
    fam = detect_family(p) if family == "auto" else get_family(family)
    bundle = fam.load(p, prediction_type=prediction_type, dtype=dtype)
    give_back_freed_memory()  # the file's tensors as stored, freed once converted
    return bundle


__all__ = ["FAMILIES", "Family", "FamilyFacts", "ModelBundle", "ModelLoadError",
           "detect_family", "family_facts", "family_for_host_model", "get_family", "load_model"]
