"""A run's optimizer, and the option of taking each weight's step inside the backward pass.

Full fine-tuning holds a gradient for every trained weight until the optimizer steps: for
SD1.5's UNet in fp32 that is 3.4 GB, a quarter of the run's memory. ``StepInBackward`` steps
each tensor the moment its gradient is complete and frees that gradient at once, so only the
gradients of the layer being differentiated exist at any time. The update itself is the
same optimizer's (same state, same ``state_dict``, same learning-rate schedule); what
changes is that gradient clipping is per tensor (no global norm exists before the step) and
that one backward pass is one step (no gradient accumulation, no second backward per step).
"""

from __future__ import annotations

import torch

from .config import ConfigError, TsuikaConfig


def make_optimizer(config: TsuikaConfig, groups: list[dict],
                   device: torch.device) -> torch.optim.Optimizer:
    tr = config.train
    clean = [{"params": g["params"], "lr": g["lr"]} for g in groups if g["params"]]
    if tr.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("train.optimizer = 'adamw8bit' needs a CUDA device; use 'adamw'.")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("train.optimizer = 'adamw8bit' needs the bitsandbytes package "
                             "(pip install bitsandbytes); or use 'adamw'.") from e
        return bnb.optim.AdamW8bit(clean, weight_decay=tr.weight_decay)
    return torch.optim.AdamW(clean, weight_decay=tr.weight_decay,
                             fused=device.type in ("cuda", "cpu"))


def wants_step_in_backward(config: TsuikaConfig, trains_base_weights: bool,
                           distributed: bool, fp16: bool) -> bool:
    """Whether this run steps inside the backward pass (``train.optimizer_in_backward``).

    ``auto``: yes for methods that train the model's own weights (where the gradients are
    the model's size), when nothing needs whole-step gradients. ``on`` says what stands in
    the way instead of silently falling back.
    """
    choice = config.train.optimizer_in_backward
    if choice == "off":
        return False
    blockers = []
    if config.train.gradient_accumulation > 1:
        blockers.append(f"train.gradient_accumulation = {config.train.gradient_accumulation} "
                        "(needs whole-step gradients)")
    if distributed:
        blockers.append("a data-parallel run (gradients are averaged after the backward pass)")
    if fp16:
        blockers.append("fp16 mixed precision (its loss scaler checks all gradients first)")
    if choice == "on" and blockers:
        raise ConfigError("train.optimizer_in_backward = 'on' cannot be used with "
                          f"{'; '.join(blockers)}; set it to 'auto' or 'off'.")
    return not blockers and (choice == "on" or trains_base_weights)


class StepInBackward:
    """Steps ``optimizer`` for each parameter as soon as its gradient is accumulated.

    Use as a context manager around the training steps; leaving it removes the hooks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self._handles = []

    def __enter__(self) -> StepInBackward:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda param, group=group: self._step(group, param)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _step(self, group: dict, p: torch.Tensor) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        # The optimizer's own step, shown only this parameter: state, schedule and
        # state_dict stay exactly those of a normal run.
        solo = dict(group, params=[p])
        groups, self.optimizer.param_groups = self.optimizer.param_groups, [solo]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        p.grad = None
