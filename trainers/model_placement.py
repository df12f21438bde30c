"""Where each part of the model lives during a run, and in which dtype.

Two decisions a run makes once, before its first step:

- **dtypes** (``ModelDtypes.for_run``): frozen weights compute in the run's compute dtype;
  base weights a method trains are stored as ``train.trained_weights`` says (fp32 masters
  under autocast, or bf16 with stochastic rounding); a model the run loads itself may keep
  its frozen weights narrower than it computes (``train.frozen_weights``: bf16 on a CPU
  computing in fp32), while a host's model stays in the host's dtypes.
- **placement** (``place_vae`` / ``place_unet_and_encoders``): the VAE alone on the device
  while it fills the latent cache (at 1024 px its activations beside an SDXL UNet would set
  the run's peak), then the UNet and the text encoders. Weights stored in another dtype than
  they compute in (narrow storage, or a host's fp16 text encoders shared with the run) stay as
  stored and compute a layer at a time (``device/stored_dtype.py``): a whole cast would be a
  second copy of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import TsuikaConfig
from .device import Precision, frozen_weights_dtype
from .device.stored_dtype import StoredDtype
from .families import ModelBundle
from .optimizers import trained_weights_dtype


@dataclass(frozen=True)
class ModelDtypes:
    """The dtypes of a run's UNet and text encoders.

    ``unet`` / ``text_encoders``: what they compute in (and are stored in unless ``stored``
    says otherwise); ``stored``: the narrower dtype frozen weights are kept in, or None.
    """

    unet: torch.dtype
    text_encoders: torch.dtype
    stored: torch.dtype | None = None

    @classmethod
    def for_run(cls, config: TsuikaConfig, precision: Precision, method,
                loads_model: bool) -> ModelDtypes:
        """The dtypes for ``method``; ``loads_model``: the run loads the model itself (not a
        host's)."""
        unet = text = precision.compute_dtype
        if method.trains_base_weights:
            unet = trained_weights_dtype(config, precision.compute_dtype)
            # A frozen text encoder is written back into the checkpoint: keep its precision.
            text = unet if method.trains_text_encoder(config) else torch.float32
            return cls(unet, text)
        stored = frozen_weights_dtype(config.train.frozen_weights, precision)
        return cls(unet, text, stored if loads_model and stored != unet else None)

    @property
    def load(self) -> torch.dtype:
        """The dtype to load the UNet and text encoders straight into (never fp32 first)."""
        if self.stored is not None:
            return self.stored
        return self.text_encoders if self.text_encoders == torch.float32 else self.unet


def move(module: torch.nn.Module, device, dtype=None) -> None:
    """``module`` to ``device`` (and ``dtype``) through torch's own ``.to()``: diffusers'
    override warns about fp32-kept modules these models lack."""
    torch.nn.Module.to(module, device=device, dtype=dtype)


def place_vae(bundle: ModelBundle, device: torch.device) -> None:
    """The VAE on the device in fp32, for the latent pass (half-precision SD VAEs are known
    to overflow; it only fills the cache)."""
    move(bundle.vae, device, torch.float32)


def place_unet_and_encoders(bundle: ModelBundle, device: torch.device, dtypes: ModelDtypes,
                            encoders_shared: bool, scope: contextlib.ExitStack,
                            ) -> list[StoredDtype]:
    """The UNet and the text encoders on the device, after the latent pass.

    Args:
        encoders_shared: the text encoders are a host's tensors (ComfyUI's, in its fp16)
            that no part of the run trains: they compute a layer at a time as stored
            (a whole cast is 3.1 GiB more for SDXL on a CPU, docs/BENCHMARKS.md).
        scope: where the per-layer casts are undone when the run ends or fails.

    Returns:
        The per-layer casts in place, so base weights a method unfreezes later can be
        released from them (``StoredDtype.release_trained``).
    """
    stored: list[StoredDtype] = []

    def compute_as_stored(module: torch.nn.Module, dtype: torch.dtype) -> None:
        move(module, device)
        stored.append(StoredDtype(module, dtype))
        scope.callback(stored[-1].remove)

    if dtypes.stored is None:
        move(bundle.unet, device, dtypes.unet)
    else:
        compute_as_stored(bundle.unet, dtypes.unet)
    for te in bundle.text_encoders:
        if encoders_shared or dtypes.stored is not None:
            compute_as_stored(te, dtypes.text_encoders)
        else:
            te.to(device, dtypes.text_encoders)
    return stored
