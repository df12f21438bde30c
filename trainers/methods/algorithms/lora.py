"""LoRA: ``delta W = alpha / rank * up @ down`` on linear layers, through peft's LoraConfig.

Which layers: the UNet's transformer blocks (every linear layer plus proj_in / proj_out, as
kohya's LoRA targets, so files look like the ones users know; or only to_q/k/v/out with
``network.target = 'attention'``) and the text encoders' attention and MLP projections.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch

from ...config import ConfigError, NetworkConfig
from ...formats.kohya import lora_module_tensors
from .base import ADAPTER, LayerTarget

UNET_LINEAR = re.compile(
    r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|"
    r"to_out\.0)|ff\.net\.(0\.proj|2)))$")
UNET_ATTENTION = re.compile(r".*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_LINEAR = re.compile(r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|"
                         r"mlp\.(fc1|fc2))$")


def matching(module: torch.nn.Module, pattern: re.Pattern,
             types: tuple[type[torch.nn.Module], ...]) -> list[str]:
    """Paths of the sub-modules of ``module`` of one of ``types`` whose path matches."""
    return [n for n, m in module.named_modules() if pattern.match(n) and isinstance(m, types)]


def refuse_lokr_factor(algorithm: str, net: NetworkConfig) -> None:
    """``network.lokr_factor`` shapes LoKr only: refused elsewhere rather than ignored."""
    if net.lokr_factor != -1:
        raise ConfigError(f"network.lokr_factor = {net.lokr_factor} applies to network.algorithm "
                          f"= 'lokr' only, not {algorithm!r}; set network.lokr_factor = -1 or "
                          "network.algorithm = 'lokr'.")


class LoraAlgorithm:
    """Low-rank adapters on linear layers."""

    name = "lora"
    summary = "low-rank adapters on linear layers"
    # Conv2d too: SD1.x's proj_in / proj_out are 1x1 convolutions (a LoRA on them is the
    # same kohya down/up pair).
    layer_types = (torch.nn.Linear, torch.nn.Conv2d)

    def check_options(self, net: NetworkConfig) -> None:
        refuse_lokr_factor(self.name, net)
        if net.conv_rank:
            raise ConfigError(f"network.conv_rank = {net.conv_rank} adapts 3x3 convolutions, "
                              "which is LoCon: set network.algorithm = 'locon' (or "
                              "network.conv_rank = 0).")

    def targets(self, component: str, module: torch.nn.Module,
                net: NetworkConfig) -> dict[str, LayerTarget]:
        if component == "unet":
            pattern = UNET_ATTENTION if net.target == "attention" else UNET_LINEAR
        else:
            pattern = TEXT_LINEAR
        layer = LayerTarget(net.rank, net.alpha)
        return {p: layer for p in matching(module, pattern, self.layer_types)}

    def peft_config(self, targets: Mapping[str, LayerTarget], net: NetworkConfig):
        from peft import LoraConfig

        # The most common rank / alpha is the config's; layers that differ get exact
        # patterns (peft matches a pattern against the end of the module path).
        return LoraConfig(
            r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout,
            target_modules=list(targets), init_lora_weights=True,
            rank_pattern={re.escape(p): t.rank for p, t in targets.items() if t.rank != net.rank},
            alpha_pattern={re.escape(p): t.alpha for p, t in targets.items()
                           if t.alpha != net.alpha})

    def is_trained(self, param_name: str) -> bool:
        return ".lora_" in param_name

    def adapted_layers(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        for name, m in module.named_modules():
            if ADAPTER in getattr(m, "lora_A", {}):
                yield name, m

    def module_tensors(self, layer: torch.nn.Module,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        # peft keeps scaling = alpha / r (alpha / sqrt(r) with rsLoRA): the kohya alpha is
        # the one that gives the same update under alpha / r.
        alpha = float(layer.scaling[ADAPTER]) * down.shape[0]
        return lora_module_tensors(down.to("cpu", dtype), up.to("cpu", dtype), alpha)
