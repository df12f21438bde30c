"""LoRA-family algorithms: how the LoRA method adapts a layer and names the result.

One module per algorithm, one ``ALGORITHMS.register`` line here (``network.algorithm``'s
choices read the registry). The protocol is ``base.Algorithm``; LoHa, LoKr and DoRA (peft
has all three) are each one more module and one more line.
"""

from __future__ import annotations

from ...registry import ALGORITHMS, RegistryError
from ..base import MethodError
from .base import Algorithm, LayerTarget, export_kohya
from .locon import LoConAlgorithm
from .lora import LoraAlgorithm

ALGORITHMS.register(LoraAlgorithm())
ALGORITHMS.register(LoConAlgorithm())


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``; a clear error lists the known ones."""
    try:
        return ALGORITHMS.get(name)
    except RegistryError as e:
        raise MethodError(str(e)) from None


__all__ = ["ALGORITHMS", "Algorithm", "LayerTarget", "export_kohya", "get_algorithm"]
