"""Merge LoRAs into one LoRA (pure tensor math on canonical LoRAs, no file I/O).

Methods, each with one weight per LoRA:

* ``concat``: the ranks side by side (``down = [d1; d2]``, ``up = [w1 s1 u1, w2 s2 u2]``),
  exactly ``sum w_i * delta_i`` at rank ``r1 + r2``.
* ``svd``: the same sum cut to a rank by :class:`~.extract.RankRule` (SVD of each delta).
* ``ties`` / ``dare_linear`` / ``dare_ties``: peft's task-vector merges
  (``peft.utils.merge_utils``) on each layer's full delta with ``density``, then cut to a
  rank as ``svd`` does. DARE drops values at random: ``seed`` makes it repeatable.

Layers only some LoRAs have are merged from those that have them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..formats.lora_state import LoraStateDict, LoraWeights
from .extract import ExtractError, LayerReport, RankRule, low_rank, resize_lora
from .merge import lora_delta

METHODS = ("concat", "svd", "ties", "dare_linear", "dare_ties")


def _check(loras: Sequence[LoraStateDict], weights: Sequence[float], method: str,
           density: float) -> None:
    if method not in METHODS:
        raise ExtractError(f"LoRA merge method {method!r} is unknown; choose one of "
                           f"{', '.join(METHODS)}.")
    if len(loras) < 2 or len(weights) != len(loras):
        raise ExtractError(f"merging needs two or more LoRAs and one weight each; got "
                           f"{len(loras)} LoRAs and {len(weights)} weights.")
    if method in ("ties", "dare_linear", "dare_ties") and not 0.0 < density <= 1.0:
        raise ExtractError(f"density = {density} must be in (0, 1] (the fraction of each "
                           "delta's values kept), e.g. 0.5.")


def _shape(w: LoraWeights) -> torch.Size:
    return torch.Size((w.up.shape[0], *w.down.shape[1:]))


def concat_loras(loras: Sequence[LoraStateDict], weights: Sequence[float]) -> LoraStateDict:
    """The exact weighted sum as one LoRA whose rank per layer is the sum of the ranks.

    Raises:
        ExtractError: one layer with different shapes in two LoRAs.
    """
    out = LoraStateDict()
    for key in sorted({k for lora in loras for k in lora.modules}):
        have = [(lora.modules[key], w) for lora, w in zip(loras, weights) if key in lora.modules]
        if len({_shape(m) for m, _ in have}) > 1:
            raise ExtractError(f"{key[0]}:{key[1]} has different shapes in the LoRAs "
                               f"({', '.join(str(tuple(_shape(m))) for m, _ in have)}); they "
                               "were made for different models.")
        down = torch.cat([m.down.float() for m, _ in have])
        up = torch.cat([m.up.float() * (m.scale * w) for m, w in have], dim=1)
        out.add(key[0], key[1], LoraWeights(down, up, float(down.shape[0])), "merged LoRA")
    return out


def _task_merge(method: str, deltas: list[torch.Tensor], weights: list[float],
                density: float) -> torch.Tensor:
    from peft.utils import merge_utils

    w = torch.tensor(weights, dtype=torch.float32)
    if method == "ties":
        return merge_utils.ties(deltas, w, density)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, w, density)
    return merge_utils.dare_ties(deltas, w, density)


def merge_loras(loras: Sequence[LoraStateDict], weights: Sequence[float], method: str = "concat",
                rule: RankRule | None = None, *, density: float = 0.5, seed: int = 0,
                ) -> tuple[LoraStateDict, list[LayerReport]]:
    """Merge ``loras`` with ``weights`` by ``method`` (see the module docstring).

    Args:
        loras: canonical LoRAs of one model.
        weights: one multiplier per LoRA.
        method: one of :data:`METHODS`.
        rule: the rank rule of every method but ``concat`` (default: fixed, the largest
            input rank).
        density: the fraction of values TIES / DARE keep.
        seed: DARE's random drops.

    Returns:
        The merged LoRA and, per layer, its rank and relative error against the method's own
        full-rank result (0 for ``concat``).
    """
    _check(loras, weights, method, density)
    summed = concat_loras(loras, weights)
    if method == "concat":
        return summed, [LayerReport(c, p, w.rank, 0.0, 0.0) for (c, p), w in
                        summed.modules.items()]
    if rule is None:
        rule = RankRule("fixed", max(w.rank for lora in loras for w in lora.modules.values()))
    if method == "svd":
        return resize_lora(summed, rule)
    out, reports = LoraStateDict(), []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for key in summed.modules:
            have = [(lora.modules[key], w) for lora, w in zip(loras, weights)
                    if key in lora.modules]
            shape = _shape(have[0][0])
            deltas = [lora_delta(m, shape) for m, _ in have]
            merged = _task_merge(method, deltas, [w for _, w in have], density)
            layer, error = low_rank(merged, rule)
            out.add(key[0], key[1], layer, f"{method} merge")
            reports.append(LayerReport(key[0], key[1], layer.rank, error,
                                       float(merged.norm())))
    return out, reports
