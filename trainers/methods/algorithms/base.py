"""The protocol of a LoRA-family algorithm, and the export every algorithm shares.

An algorithm answers four questions for the LoRA method:

- which layers: ``layer_types`` (the module types it can adapt) and ``targets`` (which
  layers of a component, each with its rank and alpha);
- how peft adapts them: ``peft_config`` (one peft config for a component; per-layer ranks
  and alphas go into its patterns, so linear and convolution layers can differ);
- what trains: ``is_trained`` (the adapter's parameter names) and ``adapted_layers``;
- how the file names it: ``module_tensors`` turns one adapted layer into its kohya /
  LyCORIS tensors (``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` for LoRA;
  ``hada_w1_a`` ... for LoHa), which :func:`formats.kohya.kohya_tensors` names. Reading
  files back is the formats' business (``formats.kohya``): an algorithm whose file keys
  the readers do not know brings its reader there.

Alpha is carried per layer as kohya means it (scale = alpha / rank) and written fp32.
``check_options`` refuses network options that make no sense for the algorithm, at config
validation time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ...config import NetworkConfig
from ...formats.kohya import kohya_tensors

ADAPTER = "default"  # the peft adapter name every algorithm injects under


@dataclass(frozen=True)
class LayerTarget:
    """One layer an algorithm adapts: its rank and alpha (scale = alpha / rank)."""

    rank: int
    alpha: float


class Algorithm(Protocol):
    """What a LoRA-family algorithm provides; see the module docstring."""

    name: str
    layer_types: tuple[type[torch.nn.Module], ...]

    def check_options(self, net: NetworkConfig) -> None:
        """Raise ``ConfigError`` naming the option when ``net`` does not fit the algorithm."""

    def targets(self, component: str, module: torch.nn.Module,
                net: NetworkConfig) -> dict[str, LayerTarget]:
        """``{module path: LayerTarget}`` of the layers of ``component`` to adapt."""

    def peft_config(self, targets: Mapping[str, LayerTarget], net: NetworkConfig) -> Any:
        """The peft config that adapts exactly ``targets`` with their ranks and alphas."""

    def is_trained(self, param_name: str) -> bool:
        """True for the parameters the adapter adds (what trains and what a state keeps)."""

    def adapted_layers(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        """``(module path, adapted layer)`` for every layer of ``module`` it adapted."""

    def module_tensors(self, layer: torch.nn.Module,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's file tensors by kohya / LyCORIS suffix (``lora_down.weight``,
        ``alpha``), on the CPU; weights in ``dtype``, alpha float32."""


def inject(algorithm: Algorithm, component: str, module: torch.nn.Module,
           net: NetworkConfig, targets: Mapping[str, LayerTarget] | None = None) -> int:
    """Adapt ``module`` (one component) as ``algorithm`` says, or exactly ``targets`` (the
    layers of a file trained on); returns the layer count."""
    from peft import inject_adapter_in_model

    if targets is None:
        targets = algorithm.targets(component, module, net)
    inject_adapter_in_model(algorithm.peft_config(targets, net), module, adapter_name=ADAPTER)
    return len(targets)


def export_kohya(algorithm: Algorithm, components: Mapping[str, torch.nn.Module],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every adapted layer of ``components`` as kohya-named tensors (the training export).

    Args:
        algorithm: the algorithm the layers were adapted with.
        components: ``{"unet": module, "text_encoder": module, ...}``.
        dtype: the weights' dtype in the file (alphas stay float32).
    """
    modules = {(comp, path): algorithm.module_tensors(layer, dtype)
               for comp, module in components.items()
               for path, layer in algorithm.adapted_layers(module)}
    return kohya_tensors(modules)
