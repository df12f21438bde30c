"""An exponential moving average (EMA) of the trained weights, for every method.

The EMA is a second copy of exactly the tensors the optimizer trains (a LoRA's adapters, a
hypernetwork's layers; for DreamBooth the whole UNet, and the text encoder when it trains),
kept in fp32 on the device the weights live on. After every ``train.ema_every``-th
optimizer step past ``train.ema_start_step`` it moves towards the weights:
``ema = decay * ema + (1 - decay) * weights``; up to the start step it equals the weights.

The weights themselves keep training as they are (the optimizer and a resumed run never see
the EMA); the saved file and the sample previews use the EMA (:meth:`Ema.applied` swaps it
into the model for that moment and back), resumable states keep both, and the file's
metadata says which weights it holds (:func:`ema_metadata`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from .state import EMA_FILE, StateError

log = logging.getLogger(__name__)

# What the file's metadata says its weights are (``tsuika.weights``).
WEIGHTS_KEY = "tsuika.weights"


class EmaError(ValueError):
    """A saved EMA does not fit the weights this run trains."""


def named_trained(bundle, params: list[torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """``{"component::parameter": p}`` of ``params``, named as the methods' resumable states
    name them; a parameter outside the bundle's components is ``param.<index>``.

    Args:
        bundle: the model (its ``components``).
        params: the trained parameters, in the optimizer's order.
    """
    names: dict[int, str] = {}
    for comp, module in bundle.components.items():
        for name, p in module.named_parameters():
            names.setdefault(id(p), f"{comp}::{name}")
    return {names.get(id(p), f"param.{i}"): p for i, p in enumerate(params)}


class Ema:
    """The moving average of ``params``.

    Args:
        params: ``name -> trained parameter`` (:func:`named_trained`).
        decay: weight of the old average per update, in (0, 1).
        start_step: up to this optimizer step the average equals the weights.
        every: average every N-th step after ``start_step``.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float,
                 start_step: int = 0, every: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay = {decay!r} must be between 0 and 1 (exclusive).")
        self.params = params
        self.decay, self.start_step, self.every = float(decay), int(start_step), int(every)
        # fp32 whatever the weights' dtype: a bf16 average loses updates of (1 - decay) * w
        # smaller than its rounding step.
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}
        self.step = 0

    @classmethod
    def for_run(cls, config, bundle, params: list[torch.nn.Parameter]) -> Ema | None:
        """The EMA ``config.train`` asks for, over ``params``; None when ``ema_decay`` is 0."""
        tr = config.train
        if not tr.ema_decay:
            return None
        ema = cls(named_trained(bundle, params), tr.ema_decay, tr.ema_start_step, tr.ema_every)
        log.info("EMA of %d trained tensors (%d values, fp32), decay %g",
                 len(ema.shadow), sum(t.numel() for t in ema.shadow.values()), ema.decay)
        return ema

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Follow the weights after optimizer step ``step`` (1 = the first step)."""
        self.step = step
        if step <= self.start_step:
            for k, p in self.params.items():
                self.shadow[k].copy_(p.detach())
        elif (step - self.start_step) % self.every == 0:
            weight = 1.0 - self.decay
            for k, p in self.params.items():
                self.shadow[k].lerp_(p.detach().float(), weight)

    @property
    def averaging(self) -> bool:
        """Whether the EMA differs from the weights yet (a step past ``start_step``)."""
        return self.step > self.start_step

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA in the model's parameters for the block (the file, the previews), the
        trained weights back after it. The weights' own tensors are set aside, never
        overwritten, so a state taken before the block still holds them."""
        kept = {}
        try:
            for k, p in self.params.items():
                kept[k] = p.data
                s = self.shadow[k]
                p.data = s if s.dtype == p.dtype else s.to(p.dtype)
            yield
        finally:
            for k, data in kept.items():
                self.params[k].data = data

    @torch.no_grad()
    def copy_to(self) -> None:
        """Put the EMA into the weights for good (at the end of a run: the model in memory
        then holds what the file holds)."""
        for k, p in self.params.items():
            p.copy_(self.shadow[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average's tensors (fp32, on the CPU) for a resumable state."""
        return {k: t.detach().to("cpu").clone() for k, t in self.shadow.items()}

    def check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Refuse a saved average that does not fit the weights this run trains.

        Raises:
            EmaError: a tensor is missing, extra or of another shape.
        """
        missing = [k for k in self.shadow if k not in state]
        extra = [k for k in state if k not in self.shadow]
        if missing or extra:
            name = (missing or extra)[0]
            raise EmaError(f"the saved EMA {'lacks' if missing else 'has an extra'} tensor "
                           f"{name}; it was made with other network options.")
        for k, t in self.shadow.items():
            if state[k].shape != t.shape:
                raise EmaError(f"the saved EMA tensor {k} has shape {tuple(state[k].shape)}, "
                               f"this run trains {tuple(t.shape)}.")

    def load_state_dict(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Continue from a state's average at ``step`` (checked first: nothing is copied
        from a state that does not fit).

        Raises:
            EmaError: see :meth:`check_state`.
        """
        self.check_state(state)
        for k, t in self.shadow.items():
            t.copy_(state[k].to(t.device, t.dtype))
        self.step = step

    def reset(self, step: int) -> None:
        """Start the average from the weights as they are at ``step``."""
        for k, p in self.params.items():
            self.shadow[k].copy_(p.detach())
        self.step = step

    def options(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "every": self.every}


def check_ema_fits(ema: Ema | None, folder: Path, state) -> None:
    """Refuse a resumable state whose moving average does not fit this run's, before
    anything of the state is copied.

    Raises:
        StateError: naming the folder and the tensor.
    """
    if ema is None or state.ema is None:
        return
    try:
        ema.check_state(state.ema)
    except EmaError as e:
        raise StateError(f"state {str(folder)!r}: {EMA_FILE} does not fit this run: {e} "
                         "Resume with the options it was saved with, or start without "
                         "train.resume.") from e


def resume_ema(ema: Ema | None, folder: Path, state) -> list[str]:
    """Continue ``ema`` from a resumed state (checked by :func:`check_ema_fits`); returns
    warnings for the user.

    Args:
        ema: this run's average (None: EMA off).
        folder: the state's folder (named in the warnings).
        state: the loaded ``TrainingState``.
    """
    if ema is None:
        return [f"{folder} holds a moving average (EMA) of the weights; train.ema_decay = 0, "
                "so it is left unused and the files hold the trained weights"] \
            if state.ema is not None else []
    if state.ema is None:
        ema.reset(state.step)
        return [f"{folder} was saved without EMA; the average starts from its weights at "
                f"step {state.step}"]
    notes = []
    saved = state.info.get("ema")
    if isinstance(saved, dict) and saved != ema.options():
        notes.append(f"the EMA options changed since {folder} was saved ({saved} -> "
                     f"{ema.options()}); the average continues with the new ones")
    ema.load_state_dict(state.ema, state.step)
    return notes


def ema_metadata(config, step: int) -> dict[str, str]:
    """What a saved file says of its weights: ``tsuika.weights`` is ``ema`` (the moving
    average) or ``raw`` (the optimizer's weights: EMA off, or not started by ``step``), and
    with EMA on its options.

    Args:
        config: the run's config.
        step: the step the file is saved at.
    """
    tr = config.train
    if not tr.ema_decay:
        return {WEIGHTS_KEY: "raw"}
    return {WEIGHTS_KEY: "ema" if step > tr.ema_start_step else "raw",
            "tsuika.ema_decay": str(tr.ema_decay),
            "tsuika.ema_start_step": str(tr.ema_start_step),
            "tsuika.ema_every": str(tr.ema_every)}
