"""LoHa (LyCORIS): ``delta W = alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)``, through peft's
LoHaConfig.

The Hadamard product of two rank-r products reaches rank r^2 with the parameters of two LoRAs.
Convolutions are adapted on their flattened ``(out, in * kh * kw)`` weight (no Tucker
``hada_t1`` / ``hada_t2``), so the file holds exactly the four ``hada_*`` matrices and
``alpha`` ComfyUI's, A1111's and LyCORIS's loaders read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ...config import NetworkConfig
from ...formats.kohya import module_tensors_of
from ...formats.lora_state import LohaWeights
from .base import ADAPTER, LayerTarget
from .lycoris_base import LycorisAlgorithm, cpu, patterns


class LohaAlgorithm(LycorisAlgorithm):
    """Hadamard product of two low-rank products (LyCORIS LoHa)."""

    name = "loha"
    algo = "loha"
    summary = ("LoHa: Hadamard product of two low-rank pairs (more expressive per parameter; "
               "3x3 convolutions too with network.conv_rank)")

    def peft_config(self, targets: Mapping[str, LayerTarget], net: NetworkConfig):
        from peft import LoHaConfig

        # init_weights=True: w2_b starts at zero, so training starts from the base model.
        return LoHaConfig(r=net.rank, alpha=net.alpha, target_modules=list(targets),
                          use_effective_conv2d=False, init_weights=True,
                          **patterns(targets, net))

    def is_trained(self, param_name: str) -> bool:
        return ".hada_" in param_name

    def adapted_layers(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        for name, m in module.named_modules():
            if ADAPTER in getattr(m, "hada_w1_a", {}):
                yield name, m

    def module_tensors(self, layer: torch.nn.Module,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        mats = {n: cpu(getattr(layer, f"hada_{n}")[ADAPTER], dtype)
                for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
        # peft's scaling is alpha / r with r = w1_b's rows: the loaders' alpha / rank.
        alpha = float(layer.scaling[ADAPTER]) * mats["w1_b"].shape[0]
        return module_tensors_of(LohaWeights(**mats, alpha=alpha))
