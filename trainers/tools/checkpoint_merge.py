"""Merge single-file checkpoints streamed piece by piece: never a whole model in memory.

Inputs are read with plain positional reads (no memory map, whose touched pages would count
as the process's memory), each weight in pieces of at most :data:`PIECE` elements; the
output header is written first (shapes are known from the inputs' headers) and each merged
piece is appended as it is made, into a temporary file renamed into place at the end. Peak
memory is a few pieces, whatever the checkpoints' size (``benchmarks/merge_memory.py``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import give_default_permissions
from ..formats.safetensors_io import _DTYPE_NAMES, _STORED, _fsync_dir
from ..ops.checkpoint_merge import (
    BlockRatios,
    CheckpointMergeError,
    check_mode,
    merge_piece,
    slerp_coefficients,
)
from .lora_files import _check_output, file_dtype, provenance

log = logging.getLogger(__name__)

PIECE = 1 << 22  # elements per piece: 16 MB in fp32


class TensorFile:
    """A safetensors file's header, and its tensors read in pieces without a memory map.

    Args:
        path: the ``.safetensors`` file.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; check the file name.")
        self._fh = open(self.path, "rb")  # noqa: SIM115  (closed by close())
        size = os.fstat(self._fh.fileno()).st_size
        try:
            length = int.from_bytes(self._fh.read(8), "little")
            if not 0 < length <= min(size - 8, 100 << 20):
                raise ValueError("header length out of range")
            header = json.loads(self._fh.read(length))
            self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None)
                                                         or {}).items()}
            self.entries = {}
            for key, info in header.items():
                start, end = (int(o) for o in info["data_offsets"])
                dtype = _STORED[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                if end - start != dtype.itemsize * _numel(shape) or 8 + length + end > size:
                    raise ValueError(f"tensor {key!r} has the wrong size")
                self.entries[key] = (dtype, shape, 8 + length + start)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError,
                UnicodeDecodeError) as e:
            self._fh.close()
            raise ValueError(f"{self.path.name} is not a readable safetensors checkpoint ({e}); "
                             "give a .safetensors file (Tsuika never unpickles .ckpt).") from e

    def pieces(self, key: str, piece: int = PIECE) -> Iterator[torch.Tensor]:
        """The tensor's elements, flat, ``piece`` at a time, in its stored dtype."""
        dtype, shape, offset = self.entries[key]
        total = _numel(shape)
        for first in range(0, total, piece):
            count = min(piece, total - first)
            raw = torch.empty(count * dtype.itemsize, dtype=torch.uint8)
            got = os.preadv(self._fh.fileno(), [raw.numpy()], offset + first * dtype.itemsize)
            if got != raw.numel():
                raise ValueError(f"{self.path.name}: tensor {key!r} is cut short.")
            yield raw.view(dtype)

    def close(self) -> None:
        self._fh.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class MergeResult:
    path: Path
    merged: int
    copied: int
    headline: str


def _plan(a: TensorFile, b: TensorFile, c: TensorFile | None, ratios: BlockRatios):
    """``[(key, ratio or None)]`` after checking every shared key's shape, before any work."""
    plan, only_a = [], []
    for key, (dtype, shape, _) in a.entries.items():
        ratio = ratios.ratio(key) if dtype.is_floating_point else None
        others = [f for f in (b, c) if f is not None]
        if ratio is not None and any(key not in f.entries for f in others):
            only_a.append(key)
            ratio = None
        for f in others:
            if ratio is not None and f.entries[key][1] != shape:
                raise CheckpointMergeError(
                    f"{key}: shape {list(shape)} in {a.path.name} but {list(f.entries[key][1])} "
                    f"in {f.path.name}; merge checkpoints of the same architecture.")
        plan.append((key, ratio))
    if not any(key in b.entries for key in a.entries):
        raise CheckpointMergeError(f"{a.path.name} and {b.path.name} share no weights; they "
                                   "are not checkpoints of one architecture.")
    if only_a:
        log.warning("%d weights are only in %s and were copied from it (e.g. %s)",
                    len(only_a), a.path.name, only_a[0])
    return plan, only_a


def _slerp_angle(a, b, key, ratio):
    dot = na = nb = 0.0
    for pa, pb in zip(a.pieces(key), b.pieces(key)):
        pa, pb = pa.double(), pb.double()
        dot += float(pa @ pb)
        na += float(pa @ pa)
        nb += float(pb @ pb)
    return slerp_coefficients(dot, na ** 0.5, nb ** 0.5, ratio)


def merge_checkpoints(path_a, path_b, out_path, *, mode: str = "weighted_sum",
                      ratios: BlockRatios | str | float = 0.5, path_c=None,
                      save_dtype: str | None = None, overwrite: bool = False) -> MergeResult:
    """Merge checkpoints A and B (and C for add_difference) into one single-file checkpoint.

    Args:
        path_a / path_b / path_c: single-file ``.safetensors`` checkpoints of one architecture
            (C only for ``add_difference``). Weights only in A are copied; the VAE is A's
            unless the ratios name ``vae``.
        out_path: the checkpoint to write (an existing file only with ``overwrite``).
        mode: ``weighted_sum`` / ``add_difference`` / ``slerp``.
        ratios: a :class:`BlockRatios`, its string form (``"0.5 te=0 in0-5=0.2"``) or one
            number.
        save_dtype: ``fp16`` / ``bf16`` / ``fp32``; None keeps A's dtype per weight.
        overwrite: replace an existing ``out_path``.

    Raises:
        CheckpointMergeError: bad options, or checkpoints of different architectures (checked
            for every weight before anything is written).
    """
    check_mode(mode, path_c is not None)
    if not isinstance(ratios, BlockRatios):
        ratios = BlockRatios.parse(str(ratios))
    out_dtype = file_dtype(save_dtype) if save_dtype else None
    _check_output(out_path, overwrite)
    files = [TensorFile(p) for p in (path_a, path_b, path_c) if p is not None]
    a, b = files[0], files[1]
    c = files[2] if len(files) > 2 else None
    try:
        plan, _ = _plan(a, b, c, ratios)
        dtypes = {}
        for key, _ in plan:
            stored = a.entries[key][0]
            dtypes[key] = out_dtype if (out_dtype and stored.is_floating_point
                                        and len(a.entries[key][1]) > 0) else stored
        meta = dict(a.metadata)
        meta.update(provenance(
            "merge", {k: p for k, p in (("a", path_a), ("b", path_b), ("c", path_c)) if p},
            {"mode": mode, "ratios": ratios.describe(), "save_dtype": save_dtype}))
        merged = _write(Path(out_path), plan, dtypes, meta, a, b, c, mode, overwrite)
    finally:
        for f in files:
            f.close()
    copied = len(plan) - merged
    headline = (f"merged {merged} weights ({mode}, ratios {ratios.describe()}), {copied} "
                f"copied from {Path(str(path_a)).name}")
    return MergeResult(Path(out_path), merged, copied, headline)


def _write(path: Path, plan, dtypes, meta, a, b, c, mode, overwrite) -> int:
    order = sorted(plan, key=lambda kr: (-dtypes[kr[0]].itemsize, kr[0]))
    header: dict = {"__metadata__": meta}
    offset = 0
    for key, _ in order:
        size = _numel(a.entries[key][1]) * dtypes[key].itemsize
        header[key] = {"dtype": _DTYPE_NAMES[dtypes[key]], "shape": list(a.entries[key][1]),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp, merged = Path(tmp_name), 0
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for key, ratio in order:
                if ratio is None:
                    for piece in a.pieces(key):
                        fh.write(piece.to(dtypes[key]).view(torch.uint8).numpy().data)
                    continue
                angle = _slerp_angle(a, b, key, ratio) if mode == "slerp" else None
                sources = [a.pieces(key), b.pieces(key)] + ([c.pieces(key)] if c else [])
                for pieces in zip(*sources):
                    out = merge_piece(mode, ratio, pieces[0], pieces[1],
                                      pieces[2] if c else None, angle)
                    fh.write(out.to(dtypes[key]).view(torch.uint8).numpy().data)
                merged += 1
            fh.flush()
            os.fsync(fh.fileno())
        give_default_permissions(tmp)
        if path.exists() and not overwrite:  # appeared while merging: never replace it
            raise FileExistsError(f"{path} appeared while merging; the merge was not saved "
                                  "over it. Choose another output.")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return merged
