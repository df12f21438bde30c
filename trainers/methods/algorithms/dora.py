"""DoRA: LoRA's update with the weight's magnitude trained apart, through peft's
``LoraConfig(use_dora=True)``: ``W' = m * (W + alpha / rank * up @ down) / ||W + ...||``.

peft keeps one magnitude per output channel (the norm runs over each output row), as
LyCORIS's default ``wd_on_out``; the file writes it as ``dora_scale`` of shape
``(out, 1)`` (``(out, 1, 1, 1)`` on convolutions) beside the LoRA keys, which is the shape
LyCORIS writes and ComfyUI reads as a per-output magnitude (a 1-D magnitude broadcasts
wrongly in ComfyUI's loader).

ComfyUI (0.3.x, and open upstream as Comfy-Org/ComfyUI#15458) divides a per-output
magnitude by the norm of ``W`` rather than of ``W + delta W``, so in ComfyUI a DoRA file
applies ``m * (W + delta W) / ||W||``: equal to the trained weights at the start, apart by
``||W + delta W|| / ||W||`` per channel as training moves them (``tests/test_real_host.py``
pins both readings). ``ops.merge`` applies DoRA as trained.
"""

from __future__ import annotations

import torch

from ...config import NetworkConfig
from .base import ADAPTER
from .lora import LoraAlgorithm
from .lycoris_base import LycorisAlgorithm, cpu


class DoraAlgorithm(LycorisAlgorithm):
    """Weight-decomposed LoRA (magnitude and direction trained apart)."""

    name = "dora"
    algo = "locon"  # LyCORIS writes DoRA as its LoRA ("locon") with dora_wd
    has_input_dropout = True
    summary = ("DoRA: LoRA with the weights' per-channel magnitude trained apart (3x3 "
               "convolutions too with network.conv_rank)")

    def peft_config(self, targets, net: NetworkConfig):
        config = LoraAlgorithm.peft_config(self, targets, net)
        config.use_dora = True
        return config

    def is_trained(self, param_name: str) -> bool:
        return ".lora_" in param_name  # lora_A / lora_B and lora_magnitude_vector

    def module_tensors(self, layer: torch.nn.Module,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = LoraAlgorithm.module_tensors(self, layer, dtype)
        weight = layer.get_base_layer().weight
        magnitude = layer.lora_magnitude_vector[ADAPTER].weight
        tensors["dora_scale"] = cpu(magnitude, dtype).reshape(
            weight.shape[0], *[1] * (weight.ndim - 1)).contiguous()
        return tensors

    def network_args(self, net: NetworkConfig) -> dict[str, str]:
        return {**super().network_args(net), "dora_wd": "True"}
