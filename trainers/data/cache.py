"""A tensor cache on disk whose keys are hashes of what the tensors were computed from.

Latents and text embeddings are keyed by everything that determines them (image file hash,
model weights hash, bucket, crop, flip, ...), so a changed input can never hit a stale
entry and nothing ever needs invalidating. Entries are safetensors files (no pickle) under
``root/ab/abcdef....safetensors``, written to a temporary file and renamed into place, so a
crash or a second process never leaves a half-written entry under a real key. A file that
cannot be read anyway (disk trouble, manual edits) is a miss: it is removed and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

_KEY_VERSION = "tsuika-cache-v1"
_KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_METADATA_KEY = "tsuika_cache_key"


class ContentCache:
    """Content-keyed safetensors entries under one folder.

    Args:
        root: the cache folder (created on the first ``put``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(**parts) -> str:
        """A stable hex key for ``parts`` (order of the keyword arguments does not matter).

        Values may be str, int, float, bool, None, or tuples/lists of these (nested).
        ``1``, ``1.0``, ``True`` and ``"1"`` give different keys; a tuple and a list with
        the same items give the same key.

        Args:
            **parts: what the cached tensors depend on, e.g. ``image=sha, vae=hash,
                bucket=(512, 768), flip=False``.

        Raises:
            ValueError: no parts, or a value of another type (named in the message).
        """
        if not parts:
            raise ValueError("ContentCache.key() needs at least one part, e.g. image=<sha256>.")
        canonical = {name: _canonical(name, value) for name, value in sorted(parts.items())}
        blob = json.dumps([_KEY_VERSION, canonical], sort_keys=True, ensure_ascii=False,
                          separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        """Where the entry for ``key`` lives (``root/ab/<key>.safetensors``).

        Args:
            key: a key from ``ContentCache.key``.

        Raises:
            ValueError: ``key`` is not a key this class made (protects against path tricks).
        """
        if not isinstance(key, str) or not _KEY_PATTERN.match(key):
            raise ValueError(f"cache key {key!r} is not a 64-character lowercase hex digest; "
                             f"make keys with ContentCache.key(...).")
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key`` (on the CPU), or None when there is no valid entry.

        An unreadable, truncated or mismatched file is deleted with a warning and reported
        as a miss.

        Args:
            key: a key from ``ContentCache.key``.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                stored_key = (fh.metadata() or {}).get(_METADATA_KEY)
                if stored_key != key:
                    raise ValueError(f"entry is labelled {stored_key!r}")
                return {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            log.warning("cache entry %s is unreadable (%s); removing it and recomputing",
                        path, exc)
            _remove_quietly(path)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Store ``tensors`` under ``key`` atomically; returns the entry's path.

        Tensors are saved detached, on the CPU and contiguous; an existing entry for the same
        key is replaced (same key means same content).

        Args:
            key: a key from ``ContentCache.key``.
            tensors: name -> tensor; at least one.

        Raises:
            ValueError: empty dict, or a name that is not a string / value that is not a tensor.
        """
        path = self.path(key)
        if not tensors:
            raise ValueError("ContentCache.put: nothing to store (tensors is empty).")
        for name, value in tensors.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise ValueError(f"ContentCache.put: entry {name!r} must map a string to a "
                                 f"torch.Tensor, got {type(value).__name__}.")
        # clone() so two names viewing one storage still save (safetensors refuses shared memory)
        payload = {name: value.detach().to("cpu").contiguous().clone()
                   for name, value in tensors.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(payload, tmp, metadata={_METADATA_KEY: key})
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(Path(tmp))
            raise
        return path

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()


def _canonical(name: str, value):
    """``value`` as JSON with its type kept (so 1, 1.0, True and "1" stay distinct)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        return {"float": value.hex()}  # exact, and NaN/inf safe
    if isinstance(value, (tuple, list)):
        return [_canonical(name, item) for item in value]
    raise ValueError(f"ContentCache.key: part {name}={value!r} has type {type(value).__name__}; "
                     f"use str, int, float, bool, None or a tuple of these.")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s (%s)", path, exc)
