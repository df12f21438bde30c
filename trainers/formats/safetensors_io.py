"""Reading and writing safetensors files: atomic, never overwriting unless asked."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                     overwrite: bool = False) -> Path:
    """Write ``tensors`` atomically (temp file in the same folder, then rename).

    Args:
        path: destination ``.safetensors`` file.
        tensors: name -> tensor (made contiguous, moved to the CPU).
        metadata: string -> string safetensors metadata.
        overwrite: replace an existing file; otherwise an existing file is an error.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow "
                              "overwriting it.")
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise ValueError(f"safetensors metadata values must be strings; got {bad}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; pickled checkpoints are refused."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for a foreign file
        raise ValueError(f"{path} is not a safetensors file ({e}); Tsuika never unpickles "
                         ".ckpt/.pt files: convert it to .safetensors first.") from e
    return tensors, metadata
