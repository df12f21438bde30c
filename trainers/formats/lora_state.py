"""The canonical in-memory LoRA every layout reads into, and the helpers readers share.

A :class:`LoraStateDict` maps ``(component, module path) -> LoraWeights(down, up, alpha)``;
the module path is the diffusers / transformers one and the update of a module is
``alpha / rank * up @ down``. Readers take every key they understand off a :class:`KeyPool`
and raise on whatever is left, so nothing in a file is ignored silently. Alpha is carried per
module, never assumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

# Key fragments (after the module path) of adapter types the readers refuse, by name.
UNSUPPORTED_PARTS = {
    ".lora_mid.": "LoCon/LyCORIS Tucker-decomposed convolution (lora_mid)",
    ".hada_": "LoHa (hada_*)", ".lokr_": "LoKr (lokr_*)", ".dora_scale": "DoRA (dora_scale)",
    ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)", ".oft_": "OFT (oft_*)",
    ".lora_embedding_": "LoRA on embeddings (lora_embedding_*)",
}


class LoraFormatError(ValueError):
    """A LoRA file or state dict that cannot be read or written as asked."""


@dataclass
class LoraWeights:
    """One adapted module: ``delta W = alpha / rank * up @ down``.

    Attributes:
        down: ``(rank, in)`` or, for a convolution, ``(rank, in, kh, kw)``.
        up: ``(out, rank)`` or ``(out, rank, 1, 1)``.
        alpha: the trained alpha (scale = alpha / rank).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self):
        if isinstance(self.alpha, torch.Tensor):
            self.alpha = self.alpha.float().item()
        self.alpha = float(self.alpha)
        check_lora_weights(self.down, self.up, self.alpha, "LoraWeights")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, where: str) -> None:
        """Raise :class:`LoraFormatError` naming ``where`` unless shapes and alpha fit."""
        check_lora_weights(self.down, self.up, self.alpha, where)


def check_lora_weights(down, up, alpha: float, where: str) -> None:
    """Raise :class:`LoraFormatError` naming ``where`` unless ``down`` / ``up`` / ``alpha``
    form a linear or convolution LoRA with equal ranks and a finite alpha > 0."""
    if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise LoraFormatError(f"{where}: down and up must be tensors.")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraFormatError(f"{where}: down {tuple(down.shape)} / up {tuple(up.shape)} are "
                              "neither linear (2-D, 2-D) nor convolution (4-D, 4-D) LoRA.")
    if down.shape[0] != up.shape[1]:
        raise LoraFormatError(f"{where}: rank mismatch, down {tuple(down.shape)} has rank "
                              f"{down.shape[0]} but up {tuple(up.shape)} has rank {up.shape[1]}.")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFormatError(f"{where}: convolution up {tuple(up.shape)} must be 1x1.")
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoraFormatError(f"{where}: alpha = {alpha} must be a finite number > 0.")


@dataclass
class LoraStateDict:
    """A LoRA in canonical form.

    Attributes:
        modules: ``{(component, module path): LoraWeights}``; paths as the diffusers /
            transformers model names them (text encoders without ``text_model.`` unless the
            model has that level).
        metadata: string metadata carried with the file.
    """

    modules: dict[tuple[str, str], LoraWeights] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.modules})

    def add(self, component: str, path: str, weights: LoraWeights, where: str) -> None:
        if (component, path) in self.modules:
            raise LoraFormatError(f"{where}: module {component}:{path} appears twice (two key "
                                  "spellings of the same module in one file).")
        weights.check(where)
        self.modules[(component, path)] = weights


class KeyPool:
    """The keys a reader has not consumed yet; leftovers are an error."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], fmt: str):
        self.left = dict(tensors)
        self.fmt = fmt

    def take(self, key: str) -> torch.Tensor:
        return self.left.pop(key)

    def finish(self) -> None:
        if not self.left:
            return
        keys = sorted(self.left)
        more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
        raise LoraFormatError(
            f"{len(keys)} key(s) of this {self.fmt} LoRA were not understood: "
            f"{', '.join(keys[:10])}{more}. The file holds parts Tsuika does not read; "
            "nothing was loaded rather than loading it partly.")


def refuse_unsupported(keys: Iterable[str], fmt: str) -> None:
    for fragment, what in UNSUPPORTED_PARTS.items():
        hits = [k for k in keys if fragment in k]
        if hits:
            raise LoraFormatError(f"this {fmt} file uses {what} (e.g. {hits[0]!r}, {len(hits)} "
                                  "keys), which Tsuika's LoRA reader does not support yet; use "
                                  "a plain LoRA file.")


def split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    """``(module part, role)`` of a key ending in one of ``suffixes`` (suffix -> role)."""
    for suffix, role in suffixes.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def assemble(pool: KeyPool, groups: Mapping[tuple[str, str], Mapping[str, str]],
              lsd: LoraStateDict, fmt: str, default_alpha=None) -> None:
    """Build LoraWeights from ``{(component, path): {role: key}}`` and take the keys."""
    for (component, path), roles in groups.items():
        where = f"{fmt} module {component}:{path}"
        if "down" not in roles or "up" not in roles:
            have = ", ".join(sorted(roles.values()))
            raise LoraFormatError(f"{where}: needs both a down and an up weight; found only "
                                  f"{have}.")
        down, up = pool.take(roles["down"]), pool.take(roles["up"])
        if "alpha" in roles:
            alpha_t = pool.take(roles["alpha"])
            if alpha_t.numel() != 1:
                raise LoraFormatError(f"{where}: alpha {roles['alpha']!r} has shape "
                                      f"{tuple(alpha_t.shape)}; it must be a single number.")
            alpha = float(alpha_t.float().item())
        elif default_alpha is not None:
            alpha = default_alpha(component, path, down.shape[0])
        else:
            alpha = float(down.shape[0])  # the loaders' rule for a missing alpha: scale 1
        check_lora_weights(down, up, alpha, where)
        lsd.add(component, path, LoraWeights(down, up, alpha), where)


def normalise_ldm_map(ldm_map: Mapping[str, str] | None) -> dict[str, str] | None:
    """Keys relative to ``diffusion_model.`` (full-checkpoint prefixes are accepted)."""
    if ldm_map is None:
        return None
    out = {}
    for key, value in ldm_map.items():
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out

