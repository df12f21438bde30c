"""Low-rank approximation of weight differences: extract a LoRA from two models, resize a LoRA.

Pure tensor math (no file I/O). Both tools come down to one step per layer: a weight change
``delta`` (``tuned - base``, or a LoRA's own ``alpha / rank * up @ down``) is factored by SVD
and cut to a rank chosen by a :class:`RankRule`; the result is a canonical
:class:`~..formats.lora_state.LoraWeights` with ``alpha = rank`` (scale 1), so the file says
exactly the delta that was kept. Every layer reports the rank it got and the relative error
``||delta - approx||_F / ||delta||_F`` it left.

Rank rules (the dynamic ones as kohya's ``resize_lora.py`` names them, capped by ``rank``):

* ``fixed``: ``rank`` singular values.
* ``energy``: the fewest values whose sum is at least ``value`` of the sum of all of them
  (kohya's ``sv_cumulative``).
* ``frobenius``: the fewest values keeping ``value`` of the Frobenius norm, i.e.
  ``sqrt(sum kept s^2 / sum s^2) >= value`` (kohya's ``sv_fro``).
* ``sv_ratio``: every value at least ``s_max / value`` (kohya's ``sv_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..formats.lora_state import LoraStateDict, LoraWeights
from .merge import lora_delta

RANK_MODES = ("fixed", "energy", "frobenius", "sv_ratio")


class ExtractError(ValueError):
    """Options or models that an extraction or a resize cannot work with."""


@dataclass(frozen=True)
class RankRule:
    """How many singular values a layer keeps.

    Attributes:
        mode: one of :data:`RANK_MODES`.
        rank: the rank of ``fixed``; the largest rank of the dynamic modes.
        value: ``energy`` / ``frobenius``: the fraction kept, in (0, 1]; ``sv_ratio``: the
            largest ratio ``s_max / s`` kept, >= 1. Unused by ``fixed``.
    """

    mode: str = "fixed"
    rank: int = 16
    value: float = 0.0

    def __post_init__(self):
        if self.mode not in RANK_MODES:
            raise ExtractError(f"rank mode {self.mode!r} is unknown; choose one of "
                               f"{', '.join(RANK_MODES)}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ExtractError(f"rank = {self.rank!r} must be a whole number >= 1 (the rank of "
                               "'fixed', the largest rank of the dynamic modes).")
        if self.mode in ("energy", "frobenius") and not 0.0 < self.value <= 1.0:
            raise ExtractError(f"rank mode {self.mode!r} keeps a fraction: value = {self.value} "
                               "must be in (0, 1], e.g. 0.9.")
        if self.mode == "sv_ratio" and not (math.isfinite(self.value) and self.value >= 1.0):
            raise ExtractError(f"rank mode 'sv_ratio' keeps values down to s_max / value: value "
                               f"= {self.value} must be >= 1, e.g. 10.")

    def describe(self) -> str:
        if self.mode == "fixed":
            return f"fixed rank {self.rank}"
        return f"{self.mode} {self.value:g} (rank <= {self.rank})"


def choose_rank(s: torch.Tensor, rule: RankRule) -> int:
    """The rank ``rule`` keeps of the singular values ``s`` (descending), at least 1.

    Args:
        s: singular values, largest first.
        rule: the :class:`RankRule`.
    """
    cap = max(1, min(rule.rank, int(s.numel())))
    if rule.mode == "fixed" or float(s[0]) <= 0.0:
        return cap
    s = s.double()
    if rule.mode == "energy":
        kept = torch.cumsum(s, 0) / s.sum()
    elif rule.mode == "frobenius":
        kept = torch.sqrt(torch.cumsum(s * s, 0) / (s * s).sum())
    else:  # sv_ratio: the count of values >= s_max / value
        return max(1, min(cap, int((s >= s[0] / rule.value).sum())))
    # 1e-12: cumulative sums of a fraction that is reached exactly must count as reached.
    reached = int(torch.searchsorted(kept, torch.tensor(rule.value - 1e-12, dtype=kept.dtype)))
    return max(1, min(cap, reached + 1))


@dataclass(frozen=True)
class LayerReport:
    """What one layer's approximation kept.

    Attributes:
        component: the model part (``unet``, ``text_encoder``).
        path: the module path.
        rank: the rank it got.
        rel_error: ``||delta - approx||_F / ||delta||_F``.
        delta_norm: ``||delta||_F``.
    """

    component: str
    path: str
    rank: int
    rel_error: float
    delta_norm: float


def _clamp(up: torch.Tensor, down: torch.Tensor, quantile: float):
    """Clamp both factors to the ``quantile`` of their joint absolute values (kohya's
    ``clamp_quantile``: a few outliers otherwise set an fp16 file's range)."""
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    k = max(1, min(values.numel(), math.ceil(quantile * values.numel())))
    hi = values.kthvalue(k).values
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def low_rank(delta: torch.Tensor, rule: RankRule, clamp_quantile: float = 1.0
             ) -> tuple[LoraWeights, float]:
    """The LoRA that approximates one layer's ``delta`` and the relative error it leaves.

    Args:
        delta: ``(out, in)`` or a convolution's ``(out, in, kh, kw)``.
        rule: how many singular values to keep.
        clamp_quantile: in (0, 1]; below 1 the factors are clamped to that quantile of their
            absolute values (1 = no clamping, the exact truncated SVD).

    Returns:
        ``(LoraWeights(down, up, alpha=rank), rel_error)``; the singular values are split
        evenly (``sqrt(s)`` into each factor) so neither factor needs a wide number range.
    """
    if not 0.0 < clamp_quantile <= 1.0:
        raise ExtractError(f"clamp_quantile = {clamp_quantile} must be in (0, 1]; 1 turns "
                           "clamping off, kohya's default is 0.99.")
    if delta.ndim not in (2, 4):
        raise ExtractError(f"a weight change of shape {tuple(delta.shape)} is neither a linear "
                           "(2-D) nor a convolution (4-D) layer.")
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = choose_rank(s, rule)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    if clamp_quantile < 1.0:
        up, down = _clamp(up, down, clamp_quantile)
    norm = float(matrix.norm())
    error = float((matrix - up @ down).norm()) / norm if norm > 0 else 0.0
    if delta.ndim == 4:
        down = down.reshape(rank, *delta.shape[1:])
        up = up.reshape(delta.shape[0], rank, 1, 1)
    return LoraWeights(down.contiguous(), up.contiguous(), float(rank)), error


ModuleFilter = Callable[[str, str, torch.nn.Module], "RankRule | None"]


@torch.no_grad()
def extract_lora(base: Mapping[str, torch.nn.Module], tuned: Mapping[str, torch.nn.Module],
                 rule_for: ModuleFilter, *, clamp_quantile: float = 1.0,
                 min_relative_change: float = 1e-6, device: str | torch.device = "cpu",
                 ) -> tuple[LoraStateDict, list[LayerReport]]:
    """The LoRA that turns ``base`` into (an approximation of) ``tuned``.

    Args:
        base: ``{component: module}`` of the original model.
        tuned: the same components of the changed model (same architecture).
        rule_for: ``(component, path, module) -> RankRule`` for the layers to extract, None
            for layers left out (:func:`..tools.extract.layer_rules` gives the LoRA / LoCon
            targets).
        clamp_quantile: see :func:`low_rank`.
        min_relative_change: layers whose ``||delta|| <= min_relative_change * ||base||`` are
            left out (unchanged, or changed only by rounding).
        device: where the SVDs run.

    Returns:
        The LoRA (``alpha = rank`` per layer) and one :class:`LayerReport` per layer kept.

    Raises:
        ExtractError: a component missing from ``tuned`` or layers of different shapes.
    """
    lsd, reports = LoraStateDict(), []
    for component, base_model in base.items():
        if component not in tuned:
            raise ExtractError(f"the tuned model has no {component}; both models must have the "
                               f"same parts ({', '.join(base)}).")
        tuned_modules = dict(tuned[component].named_modules())
        for path, module in base_model.named_modules():
            rule = rule_for(component, path, module)
            if rule is None:
                continue
            other = tuned_modules.get(path)
            if other is None or other.weight.shape != module.weight.shape:
                shape = None if other is None else tuple(other.weight.shape)
                raise ExtractError(f"{component}.{path}: the models differ in architecture (base "
                                   f"weight {tuple(module.weight.shape)}, tuned {shape}); "
                                   "extract from two models of the same family and size.")
            delta = other.weight.to(device, torch.float32) - module.weight.to(device,
                                                                              torch.float32)
            base_norm = float(module.weight.float().norm())
            delta_norm = float(delta.norm())
            if delta_norm <= min_relative_change * base_norm or delta_norm == 0.0:
                continue
            weights, error = low_rank(delta, rule, clamp_quantile)
            weights = LoraWeights(weights.down.cpu(), weights.up.cpu(), weights.alpha)
            lsd.add(component, path, weights, f"extracted {component}.{path}")
            reports.append(LayerReport(component, path, weights.rank, error, delta_norm))
    return lsd, reports


@torch.no_grad()
def resize_lora(lora: LoraStateDict, rule: RankRule, *, clamp_quantile: float = 1.0,
                device: str | torch.device = "cpu") -> tuple[LoraStateDict, list[LayerReport]]:
    """``lora`` re-factored to the ranks ``rule`` chooses, each layer's error reported.

    A layer's delta is ``alpha / rank * up @ down``; its SVD is taken through QR of the two
    factors (``up = Qu Ru``, ``down^T = Qd Rd``, so ``delta = Qu (Ru Rd^T) Qd^T``): only a
    ``rank x rank`` matrix is decomposed, never the full ``out x in`` delta.

    Args:
        lora: the canonical LoRA (any layout ``read_lora`` takes).
        rule: the target rank (``fixed``) or the dynamic rule; a layer never grows.
        clamp_quantile: see :func:`low_rank`.
        device: where the decompositions run.
    """
    out, reports = LoraStateDict(metadata=dict(lora.metadata)), []
    for (component, path), weights in lora.modules.items():
        down = weights.down.to(device, torch.float32)
        up = weights.up.to(device, torch.float32).flatten(1)
        qu, ru = torch.linalg.qr(up)
        qd, rd = torch.linalg.qr(down.flatten(1).T)
        core = (ru @ rd.T) * weights.scale
        u, s, vh = torch.linalg.svd(core)
        layer_rule = RankRule(rule.mode, min(rule.rank, weights.rank), rule.value)
        rank = choose_rank(s, layer_rule)
        root = s[:rank].sqrt()
        new_up, new_down = (qu @ u[:, :rank]) * root, root[:, None] * (vh[:rank] @ qd.T)
        if clamp_quantile < 1.0:
            new_up, new_down = _clamp(new_up, new_down, clamp_quantile)
        total = float(s.norm())
        kept_err = float((core - (u[:, :rank] * s[:rank]) @ vh[:rank]).norm())
        if clamp_quantile < 1.0:  # the clamped factors no longer follow the SVD: measure them
            flat = torch.Size((up.shape[0], down.flatten(1).shape[1]))
            full = lora_delta(weights, flat)
            kept_err = float((full.to(device) - new_up @ new_down).norm())
        if weights.down.ndim == 4:
            new_down = new_down.reshape(rank, *weights.down.shape[1:])
            new_up = new_up.reshape(new_up.shape[0], rank, 1, 1)
        resized = LoraWeights(new_down.contiguous().cpu(), new_up.contiguous().cpu(), float(rank))
        out.add(component, path, resized, f"resized {component}.{path}")
        reports.append(LayerReport(component, path, rank, kept_err / total if total else 0.0,
                                   total))
    return out, reports


def summary(reports: list[LayerReport]) -> dict[str, float]:
    """Layers, mean / max rank and the delta-weighted relative error over all layers."""
    if not reports:
        return {"layers": 0, "mean_rank": 0.0, "max_rank": 0, "rel_error": 0.0}
    total = math.sqrt(sum(r.delta_norm ** 2 for r in reports))
    lost = math.sqrt(sum((r.rel_error * r.delta_norm) ** 2 for r in reports))
    return {"layers": len(reports), "mean_rank": sum(r.rank for r in reports) / len(reports),
            "max_rank": max(r.rank for r in reports),
            "rel_error": lost / total if total else 0.0}
