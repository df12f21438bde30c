"""LoCon: LoRA on the linear layers plus the UNet's 3x3 convolutions (resnets, samplers).

The file is a LoRA file (kohya's ``lora_down`` / ``lora_up`` / ``alpha`` on conv layers too,
as kohya's and LyCORIS's LoCon write it); convolutions take ``network.conv_rank`` /
``network.conv_alpha``.
"""

from __future__ import annotations

import re

import torch

from ...config import ConfigError, NetworkConfig
from .base import LayerTarget
from .lora import LoraAlgorithm, matching, refuse_lokr_factor

UNET_CONV = re.compile(
    r".*(resnets\.\d+\.(conv1|conv2)|downsamplers\.0\.conv|upsamplers\.0\.conv)$")


class LoConAlgorithm(LoraAlgorithm):
    """LoRA whose UNet targets include the 3x3 convolutions."""

    name = "locon"
    summary = "LoRA on the UNet's 3x3 convolutions too (network.conv_rank / conv_alpha)"

    def check_options(self, net: NetworkConfig) -> None:
        refuse_lokr_factor(self.name, net)
        if not net.conv_rank:
            raise ConfigError("network.algorithm = 'locon' adapts convolutions with "
                              "network.conv_rank, which is 0; set network.conv_rank (e.g. 8) "
                              "or use network.algorithm = 'lora'.")

    def targets(self, component: str, module: torch.nn.Module,
                net: NetworkConfig) -> dict[str, LayerTarget]:
        found = super().targets(component, module, net)
        if component == "unet":
            conv = LayerTarget(net.conv_rank, net.conv_alpha)
            found.update({p: conv for p in matching(module, UNET_CONV, self.layer_types)})
        return found
