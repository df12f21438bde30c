"""DreamBooth: train the UNet's own weights (and optionally the text encoder's), save a checkpoint.

The result is a single-file checkpoint in the family's original layout (SD1:
``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``; SDXL:
``conditioner.embedders.0/1`` for its two text encoders), written by the family's
``checkpoint_tensors`` / ``checkpoint_metadata``: what ComfyUI's CheckpointLoaderSimple,
A1111/Forge and our own loader read. Prior preservation (class images trained beside the
instance images) is the loop's and the data's business, not the method's: it works the same
for every method.

Trained weights are fp32 master copies (the forward pass runs in the compute dtype under
autocast) or, with ``train.trained_weights = bf16`` (the default where the compute dtype is
bf16), bf16 weights updated with stochastic rounding (``optimizers.AdamWBf16``). A frozen
text encoder stays fp32, so the checkpoint writes it and the VAE back at the file's own
precision, not rounded through bf16.
"""

from __future__ import annotations

import logging

import torch

from ..config import TsuikaConfig
from ..families.base import ModelBundle
from .base import MethodError, load_named_tensors

log = logging.getLogger(__name__)


class DreamBoothMethod:
    """Full fine-tuning of the UNet (and the text encoder with network.train_text_encoder)."""

    name = "dreambooth"
    summary = "fine-tunes the UNet's own weights (a whole checkpoint)"
    trains_base_weights = True

    def trains_text_encoder(self, config: TsuikaConfig) -> bool:
        return config.network.train_text_encoder

    def validate(self, config: TsuikaConfig, bundle: ModelBundle) -> None:
        from ..families import get_family

        if not hasattr(get_family(bundle.family), "checkpoint_tensors"):
            raise MethodError(f"network.method = 'dreambooth' cannot write {bundle.family!r} "
                              "checkpoints yet; use network.method = 'lora'.")
        if bundle.family == "sd15" and bundle.unet.config.get("cross_attention_dim") == 1024:
            raise MethodError("network.method = 'dreambooth' cannot write SD2 checkpoints yet "
                              "(their text encoder layout); use network.method = 'lora'.")

    def _trained(self, config: TsuikaConfig, bundle: ModelBundle) -> dict[str, torch.nn.Module]:
        comps = {"unet": bundle.unet}
        if self.trains_text_encoder(config):
            comps.update({k: v for k, v in bundle.components.items() if k != "unet"})
        return comps

    def prepare(self, config: TsuikaConfig, bundle: ModelBundle) -> list[dict]:
        tr = config.train
        groups = []
        for comp, module in self._trained(config, bundle).items():
            params = []
            for p in module.parameters():
                # In the dtype the loop stored them in (train.trained_weights): fp32 masters
                # under autocast, or bf16 updated with stochastic rounding.
                p.requires_grad_(True)
                params.append(p)
            groups.append({"params": params, "name": comp,
                           "lr": tr.learning_rate if comp == "unet" else tr.text_encoder_lr})
        log.info("DreamBooth: %d trainable parameters in %d groups",
                 sum(p.numel() for g in groups for p in g["params"]), len(groups))
        return groups

    def trainable_state(self, bundle: ModelBundle) -> dict[str, torch.Tensor]:
        # Not cloned: the state is written at once, and a copy of a whole UNet was the
        # run's memory peak.
        return {f"{comp}::{name}": p.detach().to("cpu")
                for comp, module in bundle.components.items()
                for name, p in module.named_parameters() if p.requires_grad}

    def load_trainable_state(self, bundle: ModelBundle,
                             state: dict[str, torch.Tensor]) -> None:
        load_named_tensors(bundle, state, lambda name, p: p.requires_grad,
                           "options (network.train_text_encoder?)")

    def export(self, config: TsuikaConfig, bundle: ModelBundle,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The whole model in the original single-file layout: the modules' own tensors,
        which the writer converts to ``dtype`` one at a time (a converted copy of the whole
        model would be the run's memory peak)."""
        from ..families import get_family

        ldm = get_family(bundle.family).checkpoint_tensors(bundle)
        return {k: v.detach() for k, v in ldm.items()}

    def file_metadata(self, config: TsuikaConfig, bundle: ModelBundle,
                      metadata: dict[str, str]) -> dict[str, str]:
        """A checkpoint's metadata: the training record plus the architecture hints our
        loader reads where shapes cannot tell (heads, norm groups)."""
        from ..families import get_family

        meta = dict(metadata)
        meta.update(get_family(bundle.family).checkpoint_metadata(bundle))
        return meta
