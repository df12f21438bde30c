"""Device and precision choices, made once per run from the config (no globals).

The package also holds what makes a given device run faster or leaner, apart from the
tensor math in ``trainers/ops/``: ``cpu_conv`` (frozen convolutions packed for oneDNN) and
``host_memory`` (handing freed heap pages back to the operating system).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "no": torch.float32}


@lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16
    autocast runs measurably faster than fp32 (docs/BENCHMARKS.md)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """Where and how a run computes.

    ``compute_dtype`` is what autocast uses and what frozen weights are stored in;
    trainable weights always stay fp32.
    """

    device: torch.device
    compute_dtype: torch.dtype

    @property
    def autocast(self) -> bool:
        return self.compute_dtype != torch.float32

    def context(self):
        """The autocast context of a forward pass (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype,
                              enabled=self.autocast)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train.device = {name!r} is not a device name; use 'auto', 'cpu' "
                         "or 'cuda'.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device = {name!r} but this torch has no CUDA device; use "
                         "'cpu' or 'auto'.")
    return dev


def resolve_precision(device: torch.device, mixed_precision: str) -> Precision:
    """Turn ``train.mixed_precision`` into a dtype for ``device``."""
    if mixed_precision == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "cpu" and cpu_has_bf16_matmul():
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
    else:
        dtype = DTYPES[mixed_precision]
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("train.mixed_precision = 'fp16' is not supported on the CPU; use "
                             "'bf16', 'no' or 'auto'.")
    log.info("device %s, compute dtype %s", device, dtype)
    return Precision(device=device, compute_dtype=dtype)


def frozen_weights_dtype(choice: str, precision: Precision) -> torch.dtype:
    """What frozen base weights are stored in (``train.frozen_weights``).

    ``auto`` stores them in bf16 where a CPU computes in fp32 (no bf16 matrix units): each
    layer casts its weights to fp32 as it runs, forward and backward, so the outputs are
    those of the bf16-rounded model computed in fp32 at half the weights' memory (on SDXL
    5 GB less). Elsewhere they stay in the compute dtype.
    """
    if choice == "bf16":
        return torch.bfloat16
    if (choice == "auto" and precision.device.type == "cpu"
            and precision.compute_dtype == torch.float32):
        return torch.bfloat16
    return precision.compute_dtype

