"""Kohya LoRA key names: the names ComfyUI, A1111/Forge and diffusers all map."""

from __future__ import annotations

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_",
            "text_encoder_1": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_name(component: str, module_path: str) -> str:
    """``lora_unet_down_blocks_0_..._to_q`` for a module path of ``component``.

    transformers 5's CLIPTextModel has no ``text_model`` level, but every loader expects
    ``lora_te_text_model_encoder_...``: the part is written explicitly.
    """
    if component not in PREFIXES:
        raise ValueError(f"unknown LoRA component {component!r}; known: {', '.join(PREFIXES)}.")
    if component.startswith("text_encoder") and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return PREFIXES[component] + module_path.replace(".", "_")
