"""The ``sample`` section: the preview images drawn during and after training."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import _Section, opt


@dataclass
class SampleConfig(_Section):
    SECTION = "sample"
    prompts: list = opt(None, "Prompts sampled during and after training (fixed seed).",
                        factory=list)
    every: int = opt(0, "Sample every N steps; 0 = only before and after training.", min=0)
    steps: int = opt(20, "Denoising steps per sample.", min=1, max=1000)
    guidance_scale: float = opt(7.0, "Classifier-free guidance scale of samples.",
                                min=0.0, max=50.0)
    seed: int = opt(0, "Seed of the sample images.", min=0, max=2**63 - 1)
    size: int = opt(0, "Sample side in pixels; 0 = data.resolution.", min=0, max=4096)
