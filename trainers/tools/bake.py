"""Bake a LoRA into a checkpoint: ``W += strength * delta`` for every layer it adapts, written
as one single-file checkpoint (the layout Load Checkpoint reads).

The model is loaded through its family and written back through the same single-file export
DreamBooth uses, so a family that DreamBooth can save can be baked into.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..formats.metadata import training_metadata
from ..formats.safetensors_io import save_safetensors
from ..ops.merge import merge_lora
from .lora_files import _check_output, file_dtype, provenance, read_lora_for

log = logging.getLogger(__name__)


@dataclass
class BakeResult:
    path: Path
    modules: int
    headline: str


def bake_into_bundle(bundle, lora, strength_unet: float = 1.0, strength_text: float = 1.0) -> int:
    """Fold ``lora`` (a canonical LoRA read against ``bundle``) into ``bundle``'s weights.

    Args:
        bundle: a loaded ``ModelBundle``; its modules are changed in place.
        lora: the ``LoraStateDict`` (see :func:`.lora_files.read_lora_for`).
        strength_unet: multiplier of the UNet's delta.
        strength_text: multiplier of every text encoder's delta.

    Returns:
        The number of layers changed.
    """
    strengths = {c: (strength_unet if c == "unet" else strength_text) for c in bundle.components}
    return merge_lora(bundle.components, lora, strengths)


def single_file_tensors(bundle, dtype) -> tuple[dict, dict[str, str]]:
    """The bundle in the family's single-file layout, and the architecture hints our loader
    reads (heads, norm groups), through DreamBooth's export (the one single-file writer)."""
    from ..methods import get_method

    method = get_method("dreambooth")
    tensors = method.export(None, bundle, dtype)
    return tensors, method.file_metadata(None, bundle, {})


def bake_file(checkpoint, lora_path, out_path, *, strength_unet: float = 1.0,
              strength_text: float = 1.0, save_dtype: str = "fp16",
              overwrite: bool = False) -> BakeResult:
    """Write ``checkpoint`` with ``lora_path`` baked in, as a single-file checkpoint.

    Args:
        checkpoint: the base model (single file or diffusers folder).
        lora_path: a LoRA file of any layout ``read_lora`` takes.
        out_path: the ``.safetensors`` checkpoint to write.
        strength_unet / strength_text: the LoRA's strength on the UNet / text encoders.
        save_dtype: ``fp32`` / ``fp16`` / ``bf16`` for the checkpoint's weights.
        overwrite: replace an existing ``out_path``.

    Raises:
        ValueError: a LoRA that does not fit the model (names the module), bad options.
    """
    from ..families import load_model

    dtype = file_dtype(save_dtype)
    _check_output(out_path, overwrite)
    bundle = load_model(checkpoint)
    lora = read_lora_for(bundle, lora_path)
    changed = bake_into_bundle(bundle, lora, strength_unet, strength_text)
    tensors, hints = single_file_tensors(bundle, dtype)
    meta = training_metadata(base_model_version=bundle.family, base_model_name=str(checkpoint),
                             prediction_type=bundle.prediction_type)
    meta.update(hints)
    meta.update(provenance("bake", {"checkpoint": checkpoint, "lora": lora_path},
                           {"strength_unet": strength_unet, "strength_text": strength_text,
                            "save_dtype": save_dtype}))
    path = save_safetensors(out_path, tensors, meta, overwrite=overwrite, dtype=dtype)
    headline = (f"baked {changed} LoRA layers into {Path(str(checkpoint)).name} (UNet "
                f"{strength_unet:g}, text {strength_text:g}) -> {path.name}")
    return BakeResult(path, changed, headline)
