"""Training methods: one module each, one small protocol (see ``base.Method``).

The UI's method choices come from ``METHODS``; adding a method (Textual Inversion,
DreamBooth, Hypernetwork, a LoRA variant) is one module plus one line here.
"""

from __future__ import annotations

from .base import Method, MethodError
from .dreambooth import DreamBoothMethod
from .lora import LoraMethod

METHODS: dict[str, Method] = {m.name: m for m in (LoraMethod(), DreamBoothMethod())}


def get_method(name: str) -> Method:
    """The method registered as ``name``; a clear error lists the known ones."""
    if name not in METHODS:
        raise MethodError(f"network.method = {name!r} is not supported; known methods: "
                          f"{', '.join(METHODS)}.")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodError", "get_method"]
