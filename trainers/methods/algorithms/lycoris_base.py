"""What LoHa, LoKr and DoRA share: LoRA's layers plus, with ``network.conv_rank``, the UNet's
3x3 convolutions (LyCORIS's ``conv_dim``), per-layer rank / alpha patterns for peft, and the
``lycoris.kohya`` metadata LyCORIS-aware tools read (``ss_network_args`` ``algo``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ...config import ConfigError, NetworkConfig
from .base import LayerTarget
from .locon import UNET_CONV
from .lora import LoraAlgorithm, matching, refuse_lokr_factor


def cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A trained tensor as the file stores it: detached, on the CPU, in ``dtype``."""
    return t.detach().to("cpu", dtype)


def patterns(targets: Mapping[str, LayerTarget], net: NetworkConfig) -> dict:
    """peft's ``rank_pattern`` / ``alpha_pattern`` for the layers whose rank or alpha is not
    the config's (peft matches a pattern against the end of the module path)."""
    return {"rank_pattern": {re.escape(p): t.rank for p, t in targets.items()
                             if t.rank != net.rank},
            "alpha_pattern": {re.escape(p): t.alpha for p, t in targets.items()
                              if t.alpha != net.alpha}}


class LycorisAlgorithm(LoraAlgorithm):
    """LoRA's targets, plus the UNet's 3x3 convolutions when ``network.conv_rank`` > 0."""

    name = ""
    algo = ""  # the ``algo`` LyCORIS writes into ss_network_args
    has_input_dropout = False  # peft's LoHa / LoKr have no dropout on the layer input

    def check_options(self, net: NetworkConfig) -> None:
        if self.name != "lokr":
            refuse_lokr_factor(self.name, net)
        if net.dropout and not self.has_input_dropout:
            raise ConfigError(f"network.dropout = {net.dropout} is LoRA's dropout on the layer "
                              f"input, which {self.name} does not have; set network.dropout "
                              "= 0.")

    def targets(self, component: str, module: torch.nn.Module,
                net: NetworkConfig) -> dict[str, LayerTarget]:
        found = super().targets(component, module, net)
        if component == "unet" and net.conv_rank:
            conv = LayerTarget(net.conv_rank, net.conv_alpha)
            found.update({p: conv for p in matching(module, UNET_CONV, self.layer_types)})
        return found

    def network_args(self, net: NetworkConfig) -> dict[str, str]:
        """LyCORIS's network args for this run (strings, as its command line gives them)."""
        args = {"algo": self.algo}
        if net.conv_rank:
            args.update(conv_dim=str(net.conv_rank), conv_alpha=str(net.conv_alpha))
        return args

    def file_fields(self, net: NetworkConfig) -> dict:
        """What the file's metadata says of the algorithm (``formats.metadata``'s fields)."""
        return {"network_module": "lycoris.kohya", "network_args": self.network_args(net)}
