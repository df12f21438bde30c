"""How a run's gradients become weight updates: the optimizer over the method's parameter
groups, its learning-rate schedule, the fp16 gradient scaler, the moving average (EMA) of the
trained weights, and a resumed state copied into all of them.

The loop (``trainers/loop.py``) owns the order of a step: it computes the losses, calls
``scaler.scale(loss).backward()``, then :meth:`WeightUpdates.unscale_and_clip`, checks the
loss, and :meth:`WeightUpdates.apply`. Everything that outlives one step and goes into a saved
state is here.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TsuikaConfig
from .ema import Ema, check_ema_fits, resume_ema
from .families import ModelBundle
from .guards import resume_into
from .optimizers import StepInBackward, make_optimizer, wants_step_in_backward
from .state import TrainingState, load_resume

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """What a resumed state brings the loop besides the tensors: where it counts from."""

    folder: Path
    step: int
    losses: list[tuple]
    notes: list[str]  # warnings for the host (states skipped, dataset or seed changed, ...)


@dataclass
class WeightUpdates:
    """The optimizer, schedule, scaler and EMA of one run (see the module docstring).

    Attributes:
        in_backward: the optimizer steps inside the backward pass (``StepInBackward``):
            :meth:`apply` then only advances the schedule and the EMA.
        params: every trained tensor, in group order (clipping, the ranks' sync check).
    """

    optimizer: torch.optim.Optimizer
    lr_sched: object  # a torch LR scheduler built by diffusers' get_scheduler
    scaler: torch.amp.GradScaler
    ema: Ema | None
    in_backward: bool
    params: list[torch.Tensor]
    max_grad_norm: float

    @classmethod
    def for_run(cls, config: TsuikaConfig, groups: list[dict], bundle: ModelBundle,
                device: torch.device, compute_dtype: torch.dtype, trains_base_weights: bool,
                distributed: bool) -> WeightUpdates:
        """Build them for ``groups`` (the method's parameter groups).

        Args:
            config: the run's config (``train.optimizer``, ``lr_scheduler``, ``ema_decay``...).
            groups: ``method.prepare``'s parameter groups.
            bundle: the models (the EMA reads which component each tensor belongs to).
            device: where the run computes.
            compute_dtype: the run's compute dtype (fp16 turns the gradient scaler on).
            trains_base_weights: the method trains whole weights (full fine-tuning).
            distributed: the run is data-parallel (no stepping inside the backward pass).
        """
        tr = config.train
        optimizer = make_optimizer(config, groups, device)
        fp16 = compute_dtype == torch.float16
        from diffusers.optimization import get_scheduler

        # A warm-up asked of the constant schedule needs diffusers' warm-up variant.
        name = ("constant_with_warmup" if tr.lr_scheduler == "constant" and tr.lr_warmup_steps
                else tr.lr_scheduler)
        params = [p for g in groups for p in g["params"]]
        return cls(
            optimizer=optimizer,
            lr_sched=get_scheduler(name, optimizer, num_warmup_steps=tr.lr_warmup_steps,
                                   num_training_steps=tr.steps),
            scaler=torch.amp.GradScaler(device.type, enabled=fp16),
            ema=Ema.for_run(config, bundle, params),
            in_backward=wants_step_in_backward(config, trains_base_weights, distributed, fp16),
            params=params,
            max_grad_norm=tr.max_grad_norm)

    def messages(self) -> list[str]:
        """What the host is told about these choices at the start."""
        notes = []
        if self.ema is not None:
            notes.append(f"EMA (decay {self.ema.decay:g}) of {len(self.ema.shadow)} trained "
                         "tensors: the saved files and the previews use it")
        if self.in_backward:
            notes.append("optimizer steps inside the backward pass (gradients freed as they "
                         "are used; gradient clipping per tensor)")
        return notes

    def step_in_backward(self) -> contextlib.AbstractContextManager:
        """The hooks that step inside the backward pass, until the context closes."""
        if not self.in_backward:
            return contextlib.nullcontext()
        return StepInBackward(self.optimizer, self.max_grad_norm)

    def ema_applied(self) -> contextlib.AbstractContextManager:
        """The EMA in the model for the block (files, previews); nothing when EMA is off."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    # -- a step -----------------------------------------------------------------------------
    def unscale_and_clip(self) -> None:
        """Undo the fp16 loss scale on the gradients and clip them (``train.max_grad_norm``;
        stepping in the backward pass clips per tensor there instead)."""
        self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm and not self.in_backward:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def apply(self, step: int) -> None:
        """Update the weights (``step`` is the count after this update), the schedule and the
        EMA; free the gradients."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(step)

    def learning_rate(self) -> float:
        return self.lr_sched.get_last_lr()[0]

    # -- saved states -----------------------------------------------------------------------
    def state(self, step: int, trainable: dict, losses: list) -> TrainingState:
        """A resumable state at ``step``: ``trainable`` (the method's tensors) and all of the
        above."""
        ema = self.ema
        return TrainingState(step=step, trainable=trainable,
                             optimizer=self.optimizer.state_dict(),
                             scheduler=self.lr_sched.state_dict(),
                             info={"losses": losses, **({"ema": ema.options()} if ema else {})},
                             ema=ema.state_dict() if ema else None)

    def resume(self, config: TsuikaConfig, output_dir: Path, identity: dict, method,
               bundle: ModelBundle) -> Resumed | None:
        """Copy ``train.resume``'s state in: trained tensors, optimizer, schedule, EMA.

        Every tensor and optimizer moment is checked against what it goes into before any
        copy (``guards.resume_into``), so a refused state leaves the run as it was.

        Returns:
            None when the run does not resume; else where it resumes from.

        Raises:
            StateError: the state belongs to another run or does not fit this one.
        """
        resumed = load_resume(config.train.resume, output_dir, max_step=config.train.steps)
        if resumed is None:
            return None
        folder, st, notes = resumed
        check_ema_fits(self.ema, folder, st)  # before anything is copied
        notes = notes + resume_into(folder, st, config, identity, method, bundle,
                                    self.optimizer, self.lr_sched)
        notes += resume_ema(self.ema, folder, st)
        losses = [tuple(r) for r in st.info.get("losses", [])][:st.step]
        return Resumed(folder=folder, step=st.step, losses=losses, notes=notes)
