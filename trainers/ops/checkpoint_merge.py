"""Checkpoint merge math: which ratio each weight gets, and the merge of one piece of a weight.

Pure functions on tensors (no file I/O): ``tools/checkpoint_merge.py`` streams files through
them a piece at a time. Keys are the original single-file layout's, which SD1.x, SD2.x and
SDXL share: ``model.diffusion_model.{input_blocks.N, middle_block, output_blocks.N, ...}``
for the UNet, ``cond_stage_model.*`` (SD1/SD2) or ``conditioner.embedders.*`` (SDXL) for the
text encoders, ``first_stage_model.*`` for the VAE.

Modes, with ``r`` the ratio a weight gets:

* ``weighted_sum``: ``(1 - r) * A + r * B``.
* ``add_difference``: ``A + r * (B - C)``.
* ``slerp``: spherical interpolation from A (r = 0) to B (r = 1) of the whole weight taken
  as one vector; nearly parallel weights fall back to the linear mix.

Per-block ratios are a readable string of ``name=value`` entries, separated by spaces or
commas; a bare number sets the default. Names, most specific first: ``in0`` ... / ``out0`` ...
(one UNet block) and ranges ``in0-3``; ``in``, ``mid``, ``out``; ``unet`` (every UNet weight,
time embedding and output included), ``te`` (the text encoders), ``vae``; ``default``. The
VAE is A's unless ``vae`` is named (merged VAEs rarely help and often hurt).
Example: ``"0.5 te=0 in0-5=0.2 out=0.8"``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

MODES = ("weighted_sum", "add_difference", "slerp")
UNET = "model.diffusion_model."
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")
VAE = "first_stage_model."
_ENTRY = re.compile(r"^(default|unet|te|vae|in|mid|out|(in|out)(\d+)(?:-(\d+))?)$")


class CheckpointMergeError(ValueError):
    """Options or checkpoints a merge cannot work with."""


@dataclass(frozen=True)
class BlockRatios:
    """The ratio of every weight, from a default and per-block entries.

    Attributes:
        default: the ratio of weights no entry names.
        parts: ``{"unet" | "te" | "vae" | "in" | "mid" | "out": ratio}``.
        blocks: ``{("in" | "out", index): ratio}``.
    """

    default: float = 0.5
    parts: dict[str, float] = field(default_factory=dict)
    blocks: dict[tuple[str, int], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, default: float = 0.5) -> BlockRatios:
        """Read ``"0.5 te=0 in0-5=0.2 out=0.8"`` (see the module docstring).

        Raises:
            CheckpointMergeError: an entry that is not ``name=number`` of a known name,
                naming the entry and the valid names.
        """
        parts: dict[str, float] = {}
        blocks: dict[tuple[str, int], float] = {}
        for entry in re.split(r"[\s,;]+", (text or "").strip()):
            if not entry:
                continue
            name, sep, value = entry.partition("=")
            if not sep:
                name, value = "default", name
            name = name.strip().lower()
            match = _ENTRY.match(name)
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if match is None or not math.isfinite(number):
                raise CheckpointMergeError(
                    f"block weights: {entry!r} is not 'name=number'; names are default, unet, "
                    "te, vae, in, mid, out, inN / outN (one block) or inN-M / outN-M, e.g. "
                    "'0.5 te=0 in0-5=0.2 out=0.8'.")
            if match.group(2):
                lo = int(match.group(3))
                hi = int(match.group(4)) if match.group(4) else lo
                if hi < lo:
                    raise CheckpointMergeError(f"block weights: range {name!r} runs backwards; "
                                               f"write {match.group(2)}{hi}-{lo}.")
                for index in range(lo, hi + 1):
                    blocks[(match.group(2), index)] = number
            elif name == "default":
                default = number
            else:
                parts[name] = number
        return cls(default, parts, blocks)

    def describe(self) -> str:
        entries = [f"{self.default:g}"] + [f"{k}={v:g}" for k, v in self.parts.items()]
        entries += [f"{side}{i}={v:g}" for (side, i), v in sorted(self.blocks.items())]
        return " ".join(entries)

    def ratio(self, key: str) -> float | None:
        """The ratio of the weight ``key``; None for a weight that is A's as it is (the VAE
        when ``vae`` is not named)."""
        part, block = classify(key)
        if block is not None and block in self.blocks:
            return self.blocks[block]
        if block is not None and block[0] in self.parts:
            return self.parts[block[0]]
        if part == "unet" and key.startswith(UNET + "middle_block.") and "mid" in self.parts:
            return self.parts["mid"]
        if part in self.parts:
            return self.parts[part]
        return None if part == "vae" else self.default


def classify(key: str) -> tuple[str, tuple[str, int] | None]:
    """``(part, block)`` of a single-file key: part ``unet`` / ``te`` / ``vae`` / ``other``,
    block ``("in" | "out", index)`` for the UNet's input and output blocks, else None."""
    if key.startswith(UNET):
        rest = key[len(UNET):]
        for side, name in (("in", "input_blocks."), ("out", "output_blocks.")):
            if rest.startswith(name):
                index = rest[len(name):].split(".", 1)[0]
                return "unet", (side, int(index)) if index.isdigit() else None
        return "unet", None
    if key.startswith(TEXT_PREFIXES):
        return "te", None
    if key.startswith(VAE):
        return "vae", None
    return "other", None


def check_mode(mode: str, has_c: bool) -> None:
    """Refuse an unknown mode, and add_difference without C (or C without it)."""
    if mode not in MODES:
        raise CheckpointMergeError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)}.")
    if mode == "add_difference" and not has_c:
        raise CheckpointMergeError("mode 'add_difference' computes A + ratio * (B - C): give "
                                   "checkpoint C (the model B was tuned from).")
    if mode != "add_difference" and has_c:
        raise CheckpointMergeError(f"mode {mode!r} merges two checkpoints; checkpoint C is only "
                                   "used by 'add_difference'.")


def merge_piece(mode: str, ratio: float, a: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor | None = None, slerp_angle: tuple[float, float] | None = None,
                ) -> torch.Tensor:
    """One piece of a merged weight, in fp32.

    Args:
        mode: one of :data:`MODES`.
        ratio: the weight's ratio.
        a / b / c: the same piece of each checkpoint's weight (c for add_difference).
        slerp_angle: for ``slerp``, :func:`slerp_coefficients` of the whole weight (a piece
            cannot know the angle between the whole weights).
    """
    a, b = a.float(), b.float()
    if mode == "weighted_sum":
        return torch.lerp(a, b, ratio)
    if mode == "add_difference":
        return a + ratio * (b - c.float())
    ca, cb = slerp_angle
    return a * ca + b * cb


def slerp_coefficients(dot: float, norm_a: float, norm_b: float, ratio: float
                       ) -> tuple[float, float]:
    """``(ca, cb)`` with ``slerp(A, B) = ca * A + cb * B`` for weights of these norms and dot
    product: the angle is that of the unit vectors; the length goes linearly from |A| to |B|.
    Nearly parallel (or zero) weights give the linear mix."""
    if norm_a == 0.0 or norm_b == 0.0:
        return 1.0 - ratio, ratio
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    theta = math.acos(cos)
    if theta < 1e-4:
        return 1.0 - ratio, ratio
    sin = math.sin(theta)
    length = (1.0 - ratio) * norm_a + ratio * norm_b
    ua = math.sin((1.0 - ratio) * theta) / sin / norm_a
    ub = math.sin(ratio * theta) / sin / norm_b
    return ua * length, ub * length  # the unit-sphere path at the interpolated length
