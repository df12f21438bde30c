"""Training methods: one module each, one small protocol (see ``base.Method``).

Adding a method (Textual Inversion, Hypernetwork, ...) is one module plus one
``METHODS.register`` line here; ``network.method``'s choices, the nodes' combos and the
training test matrix read the registry. LoRA-family algorithms (LoRA, LoCon, later LoHa /
LoKr / DoRA) are not methods: they sit behind the LoRA method in ``methods.algorithms``.
"""

from __future__ import annotations

from ..registry import METHODS, RegistryError
from .base import Method, MethodError
from .dreambooth import DreamBoothMethod
from .hypernetwork import HypernetworkMethod
from .lora import LoraMethod
from .textual_inversion import TextualInversionMethod

METHODS.register(LoraMethod())
METHODS.register(DreamBoothMethod())
METHODS.register(HypernetworkMethod())
METHODS.register(TextualInversionMethod())


def get_method(name: str) -> Method:
    """The method registered as ``name``; a clear error lists the known ones."""
    try:
        return METHODS.get(name)
    except RegistryError as e:
        raise MethodError(str(e)) from None


__all__ = ["METHODS", "Method", "MethodError", "get_method"]
