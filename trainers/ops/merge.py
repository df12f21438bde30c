"""Fold LoRA weights into a model's own weights: ``W += strength * alpha / rank * up @ down``.

Pure tensor math on live modules (no file I/O): read a file with
``formats.lora_layouts.read_lora`` first. Used to score a trained LoRA on a fresh copy of the
base model, and the seam for the LoRA-merge and checkpoint-merge tools.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..formats.lora_layouts import LoraStateDict, LoraWeights


class MergeError(ValueError):
    """A LoRA that does not fit the model it is merged into."""


def lora_delta(weights: LoraWeights, shape: torch.Size) -> torch.Tensor:
    """The fp32 weight change of one module, shaped like its weight ``shape``.

    Linear: ``up (out, r) @ down (r, in)``. Convolution: ``down (r, in, kh, kw)`` and
    ``up (out, r, 1, 1)`` give ``(out, in, kh, kw)`` (the up projection is 1x1, as in every
    LoRA/LoCon layout Tsuika reads).
    """
    down = weights.down.float().flatten(1)
    up = weights.up.float().flatten(1)
    delta = (up @ down) * weights.scale
    if delta.numel() != torch.Size(shape).numel():
        raise MergeError(f"LoRA delta of {tuple(up.shape)} @ {tuple(down.shape)} does not fit "
                         f"a weight of shape {tuple(shape)}.")
    return delta.reshape(shape)


@torch.no_grad()
def merge_lora(models: Mapping[str, torch.nn.Module], lora: LoraStateDict,
               strength: float | Mapping[str, float] = 1.0, family: str | None = None) -> int:
    """Add ``lora`` into the weights of ``models`` in place; returns the modules changed.

    Args:
        models: ``{component: module}``, e.g. ``{"unet": unet, "text_encoder": te}``.
        lora: the LoRA, module paths as these models name them (``read_lora`` with a
            ``ModuleIndex`` of the same models gives that).
        strength: one multiplier, or one per component (``{"unet": 1.0,
            "text_encoder": 0.5}``; components not named get 1.0).
        family: the models' family (``"sdxl"``); None reads it from the text-encoder
            components of ``models`` when they include them.

    Raises:
        MergeError: a component or module the models lack, a shape that does not fit, or a
            LoRA made for another model family. Nothing is changed when it is raised.
    """
    from ..formats.lora_family import family_mismatch, lora_family, model_family_of

    refusal = family_mismatch(*lora_family((), lora.metadata, lora.components()),
                              family or model_family_of(models))
    if refusal:
        raise MergeError(refusal)
    targets = []
    for (component, path), weights in lora.modules.items():
        if component not in models:
            raise MergeError(f"the LoRA changes {component} but only {', '.join(models)} "
                             f"were given; pass the {component} model too.")
        try:
            module = models[component].get_submodule(path)
        except AttributeError:
            raise MergeError(f"{component} has no module {path!r}; the LoRA was trained for "
                             "another model.") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise MergeError(f"{component}.{path} has no weight to merge into.")
        if weights.up.shape[0] * weights.down[0].numel() != weight.numel():
            raise MergeError(f"LoRA {component}.{path} of {tuple(weights.up.shape)} @ "
                             f"{tuple(weights.down.shape)} does not fit a weight of shape "
                             f"{tuple(weight.shape)}.")
        targets.append((weight, weights, component))
    # Checked first, added one module at a time: only one fp32 delta is alive at once.
    for weight, weights, component in targets:
        scale = strength if isinstance(strength, (int, float)) else strength.get(component, 1.0)
        weight.add_((lora_delta(weights, weight.shape) * scale).to(weight.dtype))
    return len(targets)
