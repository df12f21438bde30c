"""LoKr (LyCORIS): ``delta W = scale * kron(w1, w2)``, through peft's LoKrConfig.

Each dimension is split into two factors (``network.lokr_factor``: -1 = as close to the
square root as the dimension allows, else the factor of the smaller side); ``w1`` is the
small ``(a, c)`` factor, kept whole, and ``w2`` the large ``(b, d)`` one, low-rank
(``w2_a @ w2_b``) when ``network.rank`` is below half its larger side, whole otherwise.
Scale is ``alpha / rank`` with a low-rank factor and 1 when both are whole: the rule ComfyUI
and LyCORIS apply when loading, so with whole factors the export folds peft's
``alpha / rank`` into ``lokr_w1`` and writes ``alpha = rank``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ...config import ConfigError, NetworkConfig
from ...formats.kohya import module_tensors_of
from ...formats.lora_state import LokrWeights
from .base import ADAPTER, LayerTarget
from .lycoris_base import LycorisAlgorithm, cpu, patterns

_PARTS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")


class LokrAlgorithm(LycorisAlgorithm):
    """Kronecker product of a small and a (low-rank) large factor (LyCORIS LoKr)."""

    name = "lokr"
    algo = "lokr"
    summary = ("LoKr: Kronecker product of two factors (smallest files; network.lokr_factor "
               "splits the dimensions; 3x3 convolutions too with network.conv_rank)")

    def check_options(self, net: NetworkConfig) -> None:
        super().check_options(net)
        if net.lokr_factor == 0:
            raise ConfigError("network.lokr_factor = 0 cannot split a dimension; use -1 "
                              "(automatic, near the square root) or a factor such as 4 or 8.")

    def peft_config(self, targets: Mapping[str, LayerTarget], net: NetworkConfig):
        from peft import LoKrConfig

        # init_weights=True: w1 starts at zero, so training starts from the base model.
        return LoKrConfig(r=net.rank, alpha=net.alpha, target_modules=list(targets),
                          decompose_factor=net.lokr_factor, use_effective_conv2d=False,
                          init_weights=True, **patterns(targets, net))

    def is_trained(self, param_name: str) -> bool:
        return ".lokr_" in param_name

    def adapted_layers(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        for name, m in module.named_modules():
            if ADAPTER in getattr(m, "lokr_w1", {}) or ADAPTER in getattr(m, "lokr_w1_a", {}):
                yield name, m

    def module_tensors(self, layer: torch.nn.Module,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        parts = {n: cpu(getattr(layer, f"lokr_{n}")[ADAPTER], dtype)
                 if ADAPTER in getattr(layer, f"lokr_{n}") else None for n in _PARTS}
        scaling = float(layer.scaling[ADAPTER])
        low = parts["w2_b"] if parts["w2_b"] is not None else parts["w1_b"]
        if low is None:
            # Both factors whole: loaders apply scale 1, so the scale goes into w1.
            w1 = layer.lokr_w1[ADAPTER].detach().float() * scaling
            parts["w1"] = w1.to("cpu", dtype)
            alpha = float(layer.r[ADAPTER])
        else:
            alpha = scaling * low.shape[0]
        return module_tensors_of(LokrWeights(**parts, alpha=alpha))

    def network_args(self, net: NetworkConfig) -> dict[str, str]:
        return {**super().network_args(net), "factor": str(net.lokr_factor)}
