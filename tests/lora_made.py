"""A random LoRA on named layers of a loaded model: what the tool tests bake, extract back,
resize and load in ComfyUI."""

from __future__ import annotations

import torch

from tsuika.trainers.formats.lora_state import LoraStateDict, LoraWeights


def random_lora(bundle, paths, rank: int, seed: int, scale: float = 0.1,
                alpha: float | None = None) -> LoraStateDict:
    """A rank-``rank`` LoRA on ``paths`` (``(component, module path)``) of ``bundle``: down
    and up random with std ``scale`` (a convolution's down is 3x3 like the layer, its up
    1x1), ``alpha`` = ``rank`` unless given."""
    g = torch.Generator().manual_seed(seed)
    lsd = LoraStateDict()
    for comp, path in paths:
        w = bundle.components[comp].get_submodule(path).weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * scale
        up = torch.randn(w.shape[0], rank, *([1, 1] * (w.ndim == 4)), generator=g) * scale
        lsd.add(comp, path, LoraWeights(down, up, float(rank if alpha is None else alpha)),
                "test")
    return lsd
