"""The ``model`` section: which base model trains."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import FAMILIES
from .fields import _Section, opt


@dataclass
class ModelConfig(_Section):
    SECTION = "model"
    path: str = opt("", "Base model: a diffusers folder or a single-file .safetensors "
                        "checkpoint (original layout, as kept in ComfyUI's models/checkpoints).")
    family: str = opt("auto", "Model family; 'auto' detects it from the weights.",
                      choices=FAMILIES.choices("auto"))
    prediction_type: str = opt("auto", "What the UNet predicts; 'auto' reads it from the model "
                                       "(scheduler config or checkpoint), never guesses.",
                               choices=("auto", "epsilon", "v_prediction"))
