"""Data-parallel runs: the accelerate launcher's processes, and the check that every one ended
with the same weights."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def accelerator_if_launched():
    """An accelerate Accelerator when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    # On a machine without CUDA, accelerate only goes multi-process (gloo) when told cpu=True.
    return Accelerator(cpu=not torch.cuda.is_available())


def check_ranks_in_sync(acc, params):
    """Every process must end with the same weights; say so (or fail) explicitly."""
    local = torch.stack([p.detach().float().sum() for p in params]).sum().reshape(1)
    gathered = acc.gather(local.to(acc.device))
    spread = float(gathered.max() - gathered.min())
    if spread > 1e-5 * max(1.0, float(gathered.abs().max())):
        raise RuntimeError(f"data-parallel ranks diverged: weight checksums {gathered.tolist()}")
    log.info("ranks in sync: %d processes, weight checksum %.6f", acc.num_processes,
             float(gathered[0]))
