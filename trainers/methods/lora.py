"""LoRA (and LoCon on convolutions) through peft, exported with kohya key names."""

from __future__ import annotations

import logging
import re

import torch

from ..config import TsuikaConfig
from ..families.base import ModelBundle
from ..formats.lora_keys import kohya_name
from .base import MethodError, load_named_tensors

log = logging.getLogger(__name__)

ADAPTER = "default"

# Which layers a LoRA adapts. UNet: every linear layer of the transformer blocks plus their
# proj_in/proj_out (what kohya's LoRA targets, so files look like the ones users know);
# text encoder: attention and MLP projections.
UNET_LINEAR = re.compile(
    r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|"
    r"to_out\.0)|ff\.net\.(0\.proj|2)))$")
UNET_ATTENTION = re.compile(r".*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# LoCon: the 3x3 convolutions of the resnets and the down/up samplers.
UNET_CONV = re.compile(
    r".*(resnets\.\d+\.(conv1|conv2)|downsamplers\.0\.conv|upsamplers\.0\.conv)$")
TEXT_LINEAR = re.compile(
    r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def _targets(module: torch.nn.Module, pattern: re.Pattern) -> list[str]:
    return [n for n, m in module.named_modules()
            if pattern.match(n) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _lora_layers(module: torch.nn.Module):
    """(module path, peft LoRA layer) for every adapted layer of ``module``."""
    for name, m in module.named_modules():
        if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {}):
            yield name, m


class LoraMethod:
    """Low-rank adapters on the UNet (and optionally the text encoder)."""

    name = "lora"
    trains_base_weights = False

    def trains_text_encoder(self, config: TsuikaConfig) -> bool:
        return config.network.train_text_encoder

    def validate(self, config: TsuikaConfig, bundle: ModelBundle) -> None:
        net = config.network
        smallest = min((min(m.in_features, m.out_features) for n, m in
                        bundle.unet.named_modules() if isinstance(m, torch.nn.Linear)
                        and UNET_LINEAR.match(n)), default=None)
        if smallest is None:
            raise MethodError("the UNet has no attention layers a LoRA could adapt.")
        if net.rank > smallest:
            raise MethodError(f"network.rank = {net.rank} is larger than the smallest adapted "
                              f"layer ({smallest} features); use network.rank <= {smallest}.")

    def prepare(self, config: TsuikaConfig, bundle: ModelBundle) -> list[dict]:
        from peft import LoraConfig, inject_adapter_in_model

        net, tr = config.network, config.train
        groups = []
        unet_targets = _targets(bundle.unet, UNET_ATTENTION if net.target == "attention"
                                else UNET_LINEAR)
        conv_targets = _targets(bundle.unet, UNET_CONV) if net.conv_rank else []
        unet_cfg = LoraConfig(
            r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout,
            target_modules=unet_targets + conv_targets, init_lora_weights=True,
            rank_pattern={re.escape(t): net.conv_rank for t in conv_targets},
            alpha_pattern={re.escape(t): net.conv_alpha for t in conv_targets})
        inject_adapter_in_model(unet_cfg, bundle.unet, adapter_name=ADAPTER)
        groups.append({"params": self._trainable(bundle.unet), "lr": tr.learning_rate,
                       "name": "unet"})
        if net.train_text_encoder:
            for te in bundle.text_encoders:
                te_cfg = LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout,
                                    target_modules=_targets(te, TEXT_LINEAR),
                                    init_lora_weights=True)
                inject_adapter_in_model(te_cfg, te, adapter_name=ADAPTER)
                groups.append({"params": self._trainable(te), "lr": tr.text_encoder_lr,
                               "name": "text_encoder"})
        n = sum(p.numel() for g in groups for p in g["params"])
        log.info("LoRA: %d trainable parameters in %d groups", n, len(groups))
        return groups

    @staticmethod
    def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = []
        for name, p in module.named_parameters():
            if ".lora_" in name:
                # Adapters train in fp32 even when the frozen weights are bf16/fp16.
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
        return params

    def trainable_state(self, bundle: ModelBundle) -> dict[str, torch.Tensor]:
        return {f"{comp}::{name}": p.detach().to("cpu").clone()
                for comp, module in bundle.components.items()
                for name, p in module.named_parameters() if ".lora_" in name}

    def load_trainable_state(self, bundle: ModelBundle,
                             state: dict[str, torch.Tensor]) -> None:
        load_named_tensors(bundle, state, lambda name, p: ".lora_" in name,
                           "network options (network.rank, conv_rank, target or "
                           "train_text_encoder?)")

    def export(self, config: TsuikaConfig, bundle: ModelBundle,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Kohya-named tensors: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
        out: dict[str, torch.Tensor] = {}
        for comp, module in bundle.components.items():
            for path, layer in _lora_layers(module):
                name = kohya_name(comp, path)
                down = layer.lora_A[ADAPTER].weight.detach()
                up = layer.lora_B[ADAPTER].weight.detach()
                rank = down.shape[0]
                # peft keeps scaling = alpha / r; recover the alpha that was trained with.
                alpha = float(layer.scaling[ADAPTER]) * rank
                out[f"{name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
                out[f"{name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
                out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return out

    def file_metadata(self, config: TsuikaConfig, bundle: ModelBundle,
                      metadata: dict[str, str]) -> dict[str, str]:
        """The run's metadata plus the network's kohya fields (rank, alpha, conv)."""
        from ..formats.metadata import network_metadata

        return network_metadata(metadata, config, include_paths=config.output.metadata_paths)
