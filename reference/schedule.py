"""Learning-rate schedule and time budget shared by the reference model's training stages."""

from __future__ import annotations

import math
import time


class LearningRate:
    """Linear warm-up, then cosine decay to zero over the run. Progress is the larger of the
    step count and the elapsed share of the time limit, so a run cut short by its time
    budget still anneals instead of stopping at a high rate.

    Args:
        opt: the optimiser whose groups get the rate.
        peak: the rate after warm-up.
        steps: planned steps.
        warmup: warm-up steps.
        deadline: ``time.perf_counter()`` value at which the run will stop, or ``None``.
    """

    def __init__(self, opt, peak: float, steps: int, warmup: int, deadline: float | None):
        self.opt, self.peak, self.steps, self.warmup = opt, peak, max(1, steps), max(1, warmup)
        self.start, self.deadline = time.perf_counter(), deadline

    def update(self, step: int) -> float:
        """Set and return the rate for ``step`` (1-based)."""
        progress = step / self.steps
        if self.deadline is not None:
            span = max(self.deadline - self.start, 1e-9)
            progress = max(progress, (time.perf_counter() - self.start) / span)
        rate = self.peak * min(1.0, step / self.warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, progress)))
        for group in self.opt.param_groups:
            group["lr"] = rate
        return rate


def out_of_time(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline
