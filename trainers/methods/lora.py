"""LoRA-family adapters (LoRA, LoCon, ...) through peft, exported with kohya / LyCORIS names.

What differs between LoRA-family algorithms (which layers, which peft config, which file
tensors) is the algorithm's (``network.algorithm``, ``methods.algorithms``); this method does
what they share: inject per component, train the adapters in fp32, keep them in resumable
states, and write one kohya-named file through the one writer.
"""

from __future__ import annotations

import logging

import torch

from ..config import TsuikaConfig
from ..families.base import ModelBundle
from .algorithms import get_algorithm
from .algorithms.base import export_kohya, inject
from .base import MethodError, load_named_tensors

log = logging.getLogger(__name__)


class LoraMethod:
    """Adapters on the UNet (and optionally the text encoders), as ``network.algorithm`` says."""

    name = "lora"
    summary = "trains small adapters (a LoRA file; network.algorithm says which kind)"
    trains_base_weights = False
    uses_algorithms = True  # network.algorithm's options are checked at config validation

    def trains_text_encoder(self, config: TsuikaConfig) -> bool:
        return config.network.train_text_encoder

    def validate(self, config: TsuikaConfig, bundle: ModelBundle) -> None:
        net = config.network
        algorithm = get_algorithm(net.algorithm)
        targets = algorithm.targets("unet", bundle.unet, net)
        linear = [bundle.unet.get_submodule(p) for p in targets]
        smallest = min((min(m.in_features, m.out_features) for m in linear
                        if isinstance(m, torch.nn.Linear)), default=None)
        if smallest is None:
            raise MethodError("the UNet has no attention layers a LoRA could adapt.")
        if net.rank > smallest:
            raise MethodError(f"network.rank = {net.rank} is larger than the smallest adapted "
                              f"layer ({smallest} features); use network.rank <= {smallest}.")

    def prepare(self, config: TsuikaConfig, bundle: ModelBundle) -> list[dict]:
        net, tr = config.network, config.train
        algorithm = get_algorithm(net.algorithm)
        init = None
        if net.init_lora:  # the file's modules, ranks and alphas (config adopted them already)
            from ..init_lora import file_targets, read_init_lora

            init = read_init_lora(config, bundle)
        groups = []
        for comp, module in bundle.components.items():
            if comp != "unet" and not net.train_text_encoder:
                continue
            targets = file_targets(init, comp) if init is not None else None
            if targets == {}:
                continue  # the file adapts nothing in this component
            inject(algorithm, comp, module, net, targets)
            groups.append({"params": self._trainable(module, algorithm),
                           "lr": tr.learning_rate if comp == "unet" else
                           tr.text_encoder_lrs()[comp], "name": comp})
        if init is not None:
            from ..init_lora import load_init_weights

            load_init_weights(init, bundle.components)
        n = sum(p.numel() for g in groups for p in g["params"])
        log.info("%s: %d trainable parameters in %d groups", algorithm.name, n, len(groups))
        return groups

    @staticmethod
    def _trainable(module: torch.nn.Module, algorithm) -> list[torch.nn.Parameter]:
        params = []
        for name, p in module.named_parameters():
            if algorithm.is_trained(name):
                # Adapters train in fp32 even when the frozen weights are bf16/fp16.
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
        return params

    def trainable_state(self, bundle: ModelBundle) -> dict[str, torch.Tensor]:
        # Adapter parameters are exactly the ones that require grad: the base stays frozen.
        return {f"{comp}::{name}": p.detach().to("cpu").clone()
                for comp, module in bundle.components.items()
                for name, p in module.named_parameters() if p.requires_grad}

    def load_trainable_state(self, bundle: ModelBundle,
                             state: dict[str, torch.Tensor]) -> None:
        load_named_tensors(bundle, state, lambda name, p: p.requires_grad,
                           "network options (network.rank, conv_rank, algorithm, target or "
                           "train_text_encoder?)")

    def export(self, config: TsuikaConfig, bundle: ModelBundle,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Kohya-named tensors of every adapted layer (``<name>.lora_down.weight``,
        ``.lora_up.weight``, ``.alpha`` for LoRA / LoCon), through the one kohya writer."""
        return export_kohya(get_algorithm(config.network.algorithm), bundle.components, dtype)

    def file_metadata(self, config: TsuikaConfig, bundle: ModelBundle,
                      metadata: dict[str, str]) -> dict[str, str]:
        """The run's metadata plus the network's kohya fields (rank, alpha, conv) and what the
        algorithm says of itself (LyCORIS's ``ss_network_module`` / ``ss_network_args``)."""
        from ..formats.metadata import network_metadata

        algorithm = get_algorithm(config.network.algorithm)
        fields = algorithm.file_fields(config.network) if hasattr(algorithm, "file_fields") else {}
        return network_metadata(metadata, config, include_paths=config.output.metadata_paths,
                                **fields)
