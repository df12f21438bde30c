"""Which model family a LoRA was made for, and the refusal to apply it to another one.

An SD1.x LoRA on SDXL (or the reverse) fails late and obscurely: modules that do not exist,
shapes that do not fit, or — worst — modules whose names exist in both and silently take
the wrong weights. The file says what it is for: kohya / ModelSpec metadata
(``ss_base_model_version``, ``modelspec.architecture``), else its text-encoder prefixes
(``lora_te_`` is a one-encoder family, ``lora_te1_`` / ``lora_te2_`` SDXL's pair), read
against each family's ``FamilyFacts``. Families are looked up lazily (families import formats).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .lora_keys import COMPONENTS, component_of_kohya_name


def _families():
    from ..families import FAMILIES

    return list(FAMILIES.values())


def _by_name(name: str):
    return next((f for f in _families() if f.name == name), None)


def lora_family(keys: Iterable[str], metadata: Mapping[str, str] | None = None,
                components: Iterable[str] = ()) -> tuple[str | None, str]:
    """``(family name or None, why)`` of a LoRA from its metadata, else its components.

    Args:
        keys: the file's tensor names (kohya prefixes are read from them).
        metadata: its safetensors metadata.
        components: components already known (a read ``LoraStateDict``'s).
    """
    meta = metadata or {}
    version = str(meta.get("ss_base_model_version", "")).strip()
    arch = str(meta.get("modelspec.architecture", "")).strip()
    for family in _families():
        if version and version == family.facts.base_model_version:
            return family.name, f"ss_base_model_version = {version!r}"
        if arch and arch.split("/")[0] == family.facts.architecture:
            return family.name, f"modelspec.architecture = {arch!r}"
    found = set(components)
    for key in keys:
        component = component_of_kohya_name(key.split(".", 1)[0])
        if component is not None:
            found.add(component)
    encoders = {c for c in found if c != "unet" and c in COMPONENTS}
    if encoders:
        for family in _families():
            if encoders <= set(family.facts.text_encoders):
                return family.name, f"its text-encoder modules ({', '.join(sorted(encoders))})"
    return None, ""


def model_family_of(components: Iterable[str]) -> str | None:
    """The family whose text-encoder components are exactly those among ``components``
    (None when no text encoder is named: a UNet alone does not tell)."""
    encoders = {c for c in components if c != "unet"}
    if not encoders:
        return None
    for family in _families():
        if encoders == set(family.facts.text_encoders):
            return family.name
    return None


def family_mismatch(lora: str | None, why: str, model: str | None) -> str | None:
    """The refusal message when a ``lora`` family LoRA meets a ``model`` family model."""
    if lora is None or model is None or lora == model:
        return None
    a, b = _by_name(lora), _by_name(model)
    a_name = a.facts.display_name if a else lora
    b_name = b.facts.display_name if b else model
    return (f"this LoRA was made for {a_name} ({why}) but the model is {b_name}: a LoRA only "
            f"applies to the model family it was trained on. Use an {b_name} LoRA with this "
            f"model, or load an {a_name} model for this LoRA.")
