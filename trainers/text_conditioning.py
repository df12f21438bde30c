"""The text conditioning of a run's captions: computed once per caption where it cannot change.

When no text encoder is trained and every caption is fixed (no tag shuffling or dropout, no
caption the method makes up per step), a caption's conditioning is the same at every step:
it is computed the first time and kept. With ``train.offload_text_encoders`` all captions are
encoded before the first step and the encoders then leave the accelerator for the rest of the
run (SDXL's two are 1.6 GB in bf16); previews bring them back for a moment
(``device.placement.modules_on``), and the run's end puts them back where they were.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

from .device.placement import module_device, modules_on, same_device

log = logging.getLogger(__name__)

ENCODE_BATCH = 16  # captions per encoder call when encoding them all up front


class TextConditioning:
    """Each caption's conditioning (``family.encode_text``'s dict), cached when allowed.

    Args:
        family, bundle: what encodes (``family.encode_text(bundle, captions, device)``).
        device: where the conditioning is used.
        cacheable: the captions' conditioning cannot change during the run (encoders frozen,
            captions fixed); False encodes every call, with gradients where enabled.
    """

    def __init__(self, family, bundle, device: torch.device, cacheable: bool):
        self.family, self.bundle, self.device = family, bundle, device
        self.cacheable = cacheable
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        self.offloaded = False
        self._parked = contextlib.ExitStack()  # the encoders' way back (restore)

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The batch's conditioning, one row per caption, in order."""
        if not self.cacheable:
            return self.family.encode_text(self.bundle, list(captions), self.device)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            if self.offloaded:  # encode_all() saw every caption the data can produce
                raise RuntimeError(f"caption {missing[0]!r} was not encoded before the text "
                                   "encoders were moved off the device; set "
                                   "train.offload_text_encoders = false and report this.")
            self._encode(missing)
        return {k: torch.cat([self.cache[c][k] for c in captions]) for k in self.cache[captions[0]]}

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> None:
        enc = self.family.encode_text(self.bundle, captions, self.device)
        for i, c in enumerate(captions):
            self.cache[c] = {k: v[i:i + 1].detach() for k, v in enc.items()}

    def encode_all(self, captions: Sequence[str]) -> int:
        """Encode every caption not cached yet (in batches); returns how many were new."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.cache]
        for i in range(0, len(todo), ENCODE_BATCH):
            self._encode(todo[i:i + ENCODE_BATCH])
        return len(todo)

    def offload(self, to: torch.device = torch.device("cpu")) -> int:
        """Move the text encoders to ``to`` (when they are elsewhere) until :meth:`restore`;
        returns the bytes moved. Only after :meth:`encode_all` has seen every caption."""
        encoders = self.bundle.text_encoders
        moved = sum(p.numel() * p.element_size() for te in encoders
                    if (home := module_device(te)) is not None and not same_device(home, to)
                    for p in te.parameters())
        self._parked.enter_context(modules_on(to, encoders))
        self.offloaded = True
        return moved

    def restore(self) -> None:
        """The encoders back where :meth:`offload` found them."""
        self._parked.close()
        self.offloaded = False
