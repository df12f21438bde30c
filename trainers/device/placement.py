"""Modules brought to the compute device only while they are used.

A run keeps on the accelerator what every step needs (the UNet, the adapters) and moves the
rest off once its work is cached: the VAE after the latent cache is filled, the text encoders
after every caption is encoded (``train.offload_text_encoders``). Previews need them again
for a moment; :func:`modules_on` brings them and puts them back where they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same place when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == \
        (b.index if b.index is not None else current)


def module_device(module: torch.nn.Module) -> torch.device | None:
    """Where the module's first parameter (or buffer) lives; None for an empty module."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


@contextlib.contextmanager
def modules_on(device: torch.device, modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Each module on ``device`` inside the block, and back where it was after it (also when
    the block raises). Modules already there are not touched."""
    moved = []
    for m in modules:
        home = module_device(m)
        if home is not None and not same_device(home, device):
            torch.nn.Module.to(m, device=device)
            moved.append((m, home))
    try:
        yield
    finally:
        for m, home in moved:
            torch.nn.Module.to(m, device=home)
