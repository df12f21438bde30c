"""Giving freed host memory back to the operating system.

glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from its heap, and
memory freed there stays in the process's resident set. Loading a model into another dtype, or
swapping a weight for a repacked copy, frees many such blocks at once; they would count in
peak memory again when the next allocations land elsewhere. ``malloc_trim`` hands free heap
pages back. Elsewhere (not glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def give_back_freed_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
