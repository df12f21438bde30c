"""How a host listens to training and steers it.

The loop knows nothing about ComfyUI, terminals or tests: it calls these hooks, and any host
(the ComfyUI nodes, the CLI's progress bar, a test) implements the ones it cares about.
``should_stop`` is polled once per step; returning True makes the loop save the weights and
a resumable state, then raise :class:`TrainingStopped` naming where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepInfo:
    """What the loop reports after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    seconds_per_step: float
    epoch: int


@dataclass
class SaveInfo:
    """A file or state folder the loop has just written."""

    step: int
    file_path: str | None = None
    state_dir: str | None = None
    final: bool = False


class TrainingStopped(RuntimeError):
    """The host asked the loop to stop; what was trained is saved at ``save``."""

    def __init__(self, message: str, save: SaveInfo):
        super().__init__(message)
        self.save = save


class Callbacks:
    """Base class: every hook does nothing. Subclass and override what you need."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Called once the model, data and method are ready (info: counts, sizes, config)."""

    def on_step(self, info: StepInfo) -> None:
        """Called after every optimizer step."""

    def on_sample(self, step: int, images: list, prompts: list[str]) -> None:
        """Called with PIL images sampled at ``step`` (before training: step 0)."""

    def on_save(self, info: SaveInfo) -> None:
        """Called after a LoRA file and/or a resumable state was written."""

    def on_message(self, text: str) -> None:
        """A human-readable note (skipped files, cache hits, warnings)."""

    def should_stop(self) -> bool:
        """Polled once per step; True stops the run gracefully (weights and state saved)."""
        return False
