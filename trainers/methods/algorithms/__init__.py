"""LoRA-family algorithms: how the LoRA method adapts a layer and names the result.

One module per algorithm, one ``ALGORITHMS.register`` line here (``network.algorithm``'s
choices read the registry). The protocol is ``base.Algorithm``; LoHa, LoKr and DoRA share
``lycoris_base`` (LoRA's layers plus 3x3 convolutions, LyCORIS metadata).
"""

from __future__ import annotations

from ...registry import ALGORITHMS, RegistryError
from ..base import MethodError
from .base import Algorithm, LayerTarget, export_kohya
from .dora import DoraAlgorithm
from .locon import LoConAlgorithm
from .loha import LohaAlgorithm
from .lokr import LokrAlgorithm
from .lora import LoraAlgorithm

ALGORITHMS.register(LoraAlgorithm())
ALGORITHMS.register(LoConAlgorithm())
ALGORITHMS.register(LohaAlgorithm())
ALGORITHMS.register(LokrAlgorithm())
ALGORITHMS.register(DoraAlgorithm())


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``; a clear error lists the known ones."""
    try:
        return ALGORITHMS.get(name)
    except RegistryError as e:
        raise MethodError(str(e)) from None


__all__ = ["ALGORITHMS", "Algorithm", "LayerTarget", "export_kohya", "get_algorithm"]
