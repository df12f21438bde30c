"""The protocol every training method implements."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..config import TsuikaConfig
from ..families.base import ModelBundle


class MethodError(ValueError):
    """A method cannot be applied with these options to this model."""


class Method(Protocol):
    """Prepare a model for training, name what trains, and turn it into a file.

    ``prepare`` changes the bundle's modules in place (adds adapters, unfreezes weights) and
    returns the optimizer's parameter groups. ``export`` returns the tensors and metadata of
    the file users load elsewhere (the writer converts its floating tensors to
    ``output.save_dtype`` one at a time); ``trainable_state`` / ``load_trainable_state`` are
    the exact trained weights, as stored, that a resumable state keeps; ``file_metadata``
    adds what the method's file says of itself to the run's method-neutral metadata
    (``formats.metadata.training_metadata``): a LoRA its network fields, a checkpoint its
    architecture hints.

    ``trains_base_weights``: the method trains the model's own weights (full fine-tuning),
    so the loop stores them as ``train.trained_weights`` says instead of in the compute dtype,
    and steps the optimizer inside the backward pass by default.
    """

    name: str
    trains_base_weights: bool

    def validate(self, config: TsuikaConfig, bundle: ModelBundle) -> None: ...

    def prepare(self, config: TsuikaConfig, bundle: ModelBundle) -> list[dict]: ...

    def trains_text_encoder(self, config: TsuikaConfig) -> bool: ...

    def trainable_state(self, bundle: ModelBundle) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, bundle: ModelBundle,
                             state: dict[str, torch.Tensor]) -> None: ...

    def export(self, config: TsuikaConfig, bundle: ModelBundle,
               dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def file_metadata(self, config: TsuikaConfig, bundle: ModelBundle,
                      metadata: dict[str, str]) -> dict[str, str]: ...


def load_named_tensors(bundle: ModelBundle, state: dict[str, torch.Tensor],
                       trained: Callable[[str, torch.nn.Parameter], bool], options: str) -> None:
    """Copy a resumable state's ``component::parameter`` tensors into the parameters that
    ``trained(name, param)`` selects.

    Every tensor is checked (present, same shape) before the first copy: a state made with
    other ``options`` (named in the error) changes nothing. ``copy_`` would otherwise
    broadcast a rank-1 tensor into a rank-4 parameter.

    Args:
        bundle: the model the state is loaded into.
        state: ``component::parameter`` -> tensor.
        trained: selects the parameters the state holds.
        options: the options that decide which tensors exist, for the error message.

    Raises:
        MethodError: a tensor is missing, extra, or of another shape.
    """
    wanted = dict(state)
    pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for comp, module in bundle.components.items():
        for name, p in module.named_parameters():
            key = f"{comp}::{name}"
            if not trained(name, p):
                continue
            if key not in wanted:
                raise MethodError(f"the saved state has no tensor for {key}; it was made with "
                                  f"different {options}.")
            saved = wanted.pop(key)
            if not isinstance(saved, torch.Tensor) or saved.shape != p.shape:
                shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else saved
                raise MethodError(f"the saved tensor {key} has shape {shape}, this run's "
                                  f"parameter has {tuple(p.shape)}; it was made with "
                                  f"different {options}.")
            pairs.append((p, saved))
    if wanted:
        raise MethodError(f"the saved state has {len(wanted)} tensors this run does not train "
                          f"(e.g. {next(iter(wanted))}); it was made with different {options}.")
    for p, saved in pairs:
        p.data.copy_(saved.to(p.device, p.dtype))
