"""safetensors files: atomic writes, no overwriting unless asked, never unpickling."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..files import give_default_permissions

# A safetensors file starts with an 8-byte little-endian header length, then a JSON header.
_HEADER_LEN_BYTES = 8
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
# Pickled PyTorch files: a zip archive (torch >= 1.6) or a raw pickle stream (protocol 2+).
_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _check_metadata(metadata: Mapping | None, path: Path) -> dict[str, str] | None:
    if metadata is None:
        return None
    bad = {repr(k): type(v).__name__ for k, v in metadata.items()
           if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"metadata for {path}: safetensors metadata keys and values must be "
                        f"strings; these are not: {bad}. Convert them (json.dumps for "
                        "structured values).")
    return dict(metadata)


# What the safetensors header calls each dtype.
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _code


def _check_tensors(tensors: Mapping[str, torch.Tensor], path: Path,
                   dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """Each tensor's dtype as written; refuses what safetensors cannot hold."""
    out: dict[str, torch.dtype] = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor names written to {path} must be strings; got {key!r}.")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key!r} written to {path} is a {type(value).__name__}, not a "
                            "torch.Tensor.")
        # Scalars (a LoRA's alpha) keep their dtype: converting them saves nothing and
        # would only round them.
        convert = dtype is not None and value.is_floating_point() and value.dim() > 0
        written = dtype if convert else value.dtype
        if written not in _DTYPE_NAMES:
            raise TypeError(f"{key!r} written to {path} has dtype {written}, which safetensors "
                            "cannot store.")
        out[key] = written
    return out


def _write_tensors(fh, tensors: Mapping[str, torch.Tensor], dtypes: dict[str, torch.dtype],
                   metadata: dict[str, str] | None) -> None:
    """The safetensors layout, one tensor converted and written at a time.

    An 8-byte little-endian header length, a JSON header (dtype, shape and byte range of each
    tensor, then ``__metadata__``) padded with spaces to 8 bytes, then the tensors' bytes.
    Widest dtypes first, so every tensor starts aligned to its element size. Converting as
    it writes means a whole model saved in another dtype never exists twice in memory.
    """
    order = sorted(tensors, key=lambda k: (-dtypes[k].itemsize, k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        size = tensors[key].numel() * dtypes[key].itemsize
        header[key] = {"dtype": _DTYPE_NAMES[dtypes[key]],
                       "shape": list(tensors[key].shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    fh.write(len(raw).to_bytes(_HEADER_LEN_BYTES, "little"))
    fh.write(raw)
    for key in order:
        t = tensors[key].detach().to("cpu", dtypes[key]).contiguous()
        if t.numel():
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder for this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(path, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None,
                     overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``tensors`` atomically: a temp file in the same folder, fsync, then rename.

    A crash mid-write leaves the old file (or nothing), never a truncated one.

    Args:
        path: destination ``.safetensors`` file; its folder is created.
        tensors: name -> tensor (any device and layout; tensors may share memory).
        metadata: string -> string safetensors metadata.
        overwrite: replace an existing file; otherwise an existing file is an error.
        dtype: write floating tensors (not 0-d scalars) in this dtype, converting one at a
            time.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        TypeError: a metadata value or a tensor is of the wrong type.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path ending in .safetensors.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another file name or pass "
                              "overwrite=True to replace it.")
    meta = _check_metadata(metadata, path)
    dtypes = _check_tensors(tensors, path, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, "wb") as fh:
            _write_tensors(fh, tensors, dtypes, meta)
            fh.flush()
            os.fsync(fh.fileno())
        give_default_permissions(tmp)  # mkstemp made it owner-only
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _check_is_safetensors(path: Path) -> None:
    """Raise a clear error unless ``path`` starts like a safetensors file."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_LEN_BYTES + 1)
    size = int.from_bytes(head[:_HEADER_LEN_BYTES], "little") if len(head) > 8 else 0
    valid = len(head) > _HEADER_LEN_BYTES and 0 < size <= _MAX_HEADER and head[8:9] == b"{"
    # A safetensors header length such as 640 (0x0280) starts with the bytes of a pickle
    # protocol mark, so a valid header is recognised first.
    if not valid and head.startswith(_PICKLE_MAGICS):
        raise ValueError(f"{path} is a pickled PyTorch file (.ckpt/.pt/.bin), not safetensors. "
                         "Tsuika never unpickles files because unpickling can run arbitrary "
                         "code; convert it to .safetensors with a tool you trust and load that.")
    if not valid:
        raise ValueError(f"{path} is not a safetensors file (no safetensors header); give a "
                         ".safetensors file.")


DtypeChoice = torch.dtype | Callable[[str], torch.dtype] | None

# safetensors' dtype names (little-endian data)
_STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path, device: str = "cpu", dtype: DtypeChoice = None,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``.

    Args:
        path: a ``.safetensors`` file.
        device: where the tensors are loaded.
        dtype: when given (a dtype, or a function of the tensor name giving one), floating
            tensors are converted to it one at a time as they are read, with plain reads
            instead of a memory map: peak memory is the converted tensors plus the largest
            one as stored, not the whole file as well (a memory-mapped fp32 SD1.5 file loaded
            into bf16 counted 3.4 GB of mapped pages on top of the 1.7 GB result).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a pickle (refused) or not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    path = _checked_file(path)
    if dtype is not None:
        return _read_converting(path, dtype, device)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path} is a damaged or incomplete safetensors file ({e}); write it "
                         "again or download it again.") from e
    return tensors, metadata


def check_safetensors(path) -> list[str]:
    """Check that ``path`` is a whole safetensors file, reading its header only (every
    tensor inside the file, the file no shorter than they need); returns the tensor names.

    Raises:
        FileNotFoundError, IsADirectoryError, ValueError: as :func:`load_safetensors`.
    """
    return _from_header(path, lambda f: list(f.keys()))


def safetensors_metadata(path) -> dict[str, str]:
    """The metadata of a safetensors file, reading its header only (a checkpoint is GBs).

    Raises:
        FileNotFoundError, IsADirectoryError, ValueError: as :func:`load_safetensors`.
    """
    return _from_header(path, lambda f: dict(f.metadata() or {}))


def _from_header(path, read):
    """``read(f)`` of the file opened without reading its tensors; a damaged file is a
    ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    path = _checked_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path} is a damaged or incomplete safetensors file ({e}); write it "
                         "again or download it again.") from e


def _checked_file(path) -> Path:
    """``path`` as a Path, once it is an existing file that is not a pickle."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the file name and folder.")
    if not path.is_file():
        raise IsADirectoryError(f"{path} is a folder; give a .safetensors file.")
    _check_is_safetensors(path)
    return path


def _read_converting(path: Path, dtype: DtypeChoice, device: str,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    def damaged(why: str) -> ValueError:
        return ValueError(f"{path} is a damaged or incomplete safetensors file ({why}); write "
                          "it again or download it again.")

    from ..device.host_memory import give_back_freed_memory

    tensors: dict[str, torch.Tensor] = {}
    since_trim = 0
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        header_len = int.from_bytes(fh.read(_HEADER_LEN_BYTES), "little")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise damaged(f"unreadable header: {e}") from e
        metadata = header.pop("__metadata__", None) or {}
        base = _HEADER_LEN_BYTES + header_len
        try:
            entries = []
            for name, info in header.items():
                start, end = (int(o) for o in info["data_offsets"])
                entries.append((name, info["dtype"], [int(d) for d in info["shape"]],
                                (start, end)))
            entries.sort(key=lambda e: e[3][0])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise damaged(f"malformed tensor entry in the header: {e!r}") from e
        for name, stored_name, shape, (start, end) in entries:
            stored = _STORED.get(stored_name)
            if stored is None:
                raise damaged(f"tensor {name!r} has dtype {stored_name!r}, which Tsuika "
                              f"does not read; supported: {', '.join(_STORED)}")
            numel = 1
            for d in shape:
                numel *= d
            if not 0 <= start <= end or base + end > size or \
                    end - start != numel * stored.itemsize:
                raise damaged(f"tensor {name!r} lies outside the file or has the wrong size")
            raw = torch.empty(end - start, dtype=torch.uint8)
            fh.seek(base + start)
            if fh.readinto(raw.numpy()) != end - start:
                raise damaged(f"tensor {name!r} is cut short")
            t = raw.view(stored).reshape(shape)
            if t.is_floating_point():
                t = t.to(dtype(name) if callable(dtype) else dtype)
            tensors[name] = t.to(device) if device != "cpu" else t
            since_trim += end - start
            if since_trim > 256 << 20:  # the stored-dtype buffers freed so far, back to the OS
                del raw
                give_back_freed_memory()
                since_trim = 0
    return tensors, {str(k): str(v) for k, v in metadata.items()}
