"""Fold LoRA-family weights into a model's own weights: ``W += strength * delta W``.

``delta W`` is LoRA's ``alpha / rank * up @ down``, LoHa's ``alpha / rank * (w1_a @ w1_b) *
(w2_a @ w2_b)`` or LoKr's ``scale * kron(w1, w2)``; with DoRA's ``dora_scale`` the merged
weight is ``m * (W + delta W) / ||W + delta W||`` (the norm per output channel for an
``(out, 1)`` magnitude, per input channel for ``(1, in)``), and ``strength`` blends it with
``W`` as ComfyUI does.

Pure tensor math on live modules (no file I/O): read a file with
``formats.lora_layouts.read_lora`` first. Used to score a trained LoRA on a fresh copy of the
base model, and the seam for the LoRA-merge and checkpoint-merge tools.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..formats.lora_layouts import LoraStateDict, LoraWeights
from ..formats.lora_state import LohaWeights, LokrWeights, ModuleWeights


class MergeError(ValueError):
    """A LoRA that does not fit the model it is merged into."""


def lora_delta(weights: ModuleWeights, shape: torch.Size) -> torch.Tensor:
    """The fp32 weight change of one module before DoRA, shaped like its weight ``shape``.

    Linear LoRA: ``up (out, r) @ down (r, in)``. Convolution: ``down (r, in, kh, kw)`` and
    ``up (out, r, 1, 1)`` give ``(out, in, kh, kw)`` (the up projection is 1x1, as in every
    LoRA/LoCon layout Tsuika reads). LoHa and LoKr as the module docstring says.
    """
    if isinstance(weights, LoraWeights):
        delta = weights.up.float().flatten(1) @ weights.down.float().flatten(1)
        what = f"{tuple(weights.up.shape)} @ {tuple(weights.down.shape)}"
    elif isinstance(weights, LohaWeights):
        delta = ((weights.w1_a.float() @ weights.w1_b.float())
                 * (weights.w2_a.float() @ weights.w2_b.float()))
        what = f"LoHa {tuple(delta.shape)}"
    elif isinstance(weights, LokrWeights):
        w1, w2 = weights.factors()
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
        what = f"LoKr kron {tuple(w1.shape)} x {tuple(w2.shape)}"
    else:
        raise MergeError(f"cannot merge {type(weights).__name__}.")
    if delta.numel() != torch.Size(shape).numel() or delta.shape[0] != shape[0]:
        raise MergeError(f"LoRA delta of {what} does not fit a weight of shape {tuple(shape)}.")
    return (delta * weights.scale).reshape(shape)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor,
                dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight ``m * (W + delta) / ||W + delta||`` in fp32.

    Args:
        weight: the module's weight ``W``.
        delta: the adapter's change (:func:`lora_delta`), shaped like ``weight``.
        dora_scale: the magnitude ``m``: ``(out, 1[, 1, 1])`` normalises each output channel
            (peft's DoRA, LyCORIS's default), ``(1, in[, 1, 1])`` each input channel (LyCORIS
            ``wd_on_out=False``, A1111's reading).
    """
    adapted = weight.float() + delta
    ones = [1] * (adapted.ndim - 1)
    if dora_scale.shape[0] == adapted.shape[0] and dora_scale.shape[1] == 1:
        norm = adapted.flatten(1).norm(dim=1).reshape(adapted.shape[0], *ones)
    else:
        cols = adapted.transpose(0, 1)
        norm = cols.flatten(1).norm(dim=1).reshape(cols.shape[0], *ones).transpose(0, 1)
    return adapted * (dora_scale.float().reshape(norm.shape) / norm)


def module_change(weights: ModuleWeights, weight: torch.Tensor) -> torch.Tensor:
    """The fp32 change one module makes to ``weight`` at strength 1 (DoRA included).

    Args:
        weights: the module's adapter weights.
        weight: the module's current weight.
    """
    delta = lora_delta(weights, weight.shape)
    if weights.dora_scale is None:
        return delta
    return dora_weight(weight, delta, weights.dora_scale) - weight.float()


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
        try:
            lora_delta(weights, weight.shape)
        except MergeError as e:
            raise MergeError(f"{component}.{path}: {e}") from None
        targets.append((weight, weights, component))
    # Checked first, added one module at a time: only one fp32 delta is alive at once.
    for weight, weights, component in targets:
        scale = strength if isinstance(strength, (int, float)) else strength.get(component, 1.0)
        weight.add_((module_change(weights, weight) * scale).to(weight.dtype))
    return len(targets)
