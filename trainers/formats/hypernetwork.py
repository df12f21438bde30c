"""Hypernetwork files: A1111's layout, as Tsuika's safetensors file and as the ``.pt`` that
ComfyUI's HypernetworkLoader and A1111 read.

The layout (A1111's ``Hypernetwork.save``): for every context width ``dim`` two modules, one
for the keys (index 0) and one for the values (1), each a ``torch.nn.Sequential`` named
``linear`` whose Linear and LayerNorm layers hold the tensors (``linear.0.weight``,
``linear.0.bias``, ``linear.2.weight`` ...; activations and dropout sit between them and
hold none), plus the options that rebuild it: ``layer_structure``, ``activation_func``,
``is_layer_norm``, ``use_dropout``, ``activate_output``, ``last_layer_dropout``,
``weight_initialization``.

Two files carry it:

- ``<name>.safetensors`` (written by the training run, read by :func:`read_hypernetwork`):
  flat tensor names ``"<dim>.<0|1>.linear.<i>.<weight|bias>"`` and the options as string
  metadata (``hypernetwork.*`` keys).
- ``<name>.pt`` (:func:`write_comfy_pt`): what ComfyUI's HypernetworkLoader reads. Its
  loader (``comfy_extras/nodes_hypernetwork.py``) indexes the loaded object by *integer*
  width (``sd[768][0]``) and reads the options as top-level non-tensor values
  (``sd.get('activation_func')``). A safetensors file holds only string-named tensors: every
  key fails its ``int(key)`` test and the patch it builds is empty, so a safetensors
  hypernetwork loads without error and changes nothing. The ``.pt`` therefore holds only
  plain containers (dict, tuple), ints, strings, bools, floats and tensors: ComfyUI reads it
  with ``torch.load(weights_only=True)`` (its ``safe_load``), which rebuilds exactly those
  types and runs no code; :func:`read_comfy_pt` reads it the same way.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_io import load_safetensors, save_safetensors

_KEY = re.compile(r"^(\d+)\.([01])\.(linear\.\d+\.(?:weight|bias))$")
_META = "hypernetwork."
# Option name in the file -> its type, as A1111 writes them.
_BOOL_FIELDS = ("is_layer_norm", "use_dropout", "activate_output", "last_layer_dropout")


class HypernetworkFormatError(ValueError):
    """A file is not a hypernetwork in the layout this module reads."""


@dataclass
class HypernetworkFile:
    """A hypernetwork in memory.

    Attributes:
        modules: ``{dim: (keys_state_dict, values_state_dict)}`` with A1111's names.
        layer_structure: width multiples, first and last 1.
        activation_func, is_layer_norm, use_dropout, activate_output, last_layer_dropout,
        weight_initialization: the options A1111 and ComfyUI rebuild the modules from.
        metadata: the rest of the safetensors metadata (training record).
    """

    modules: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str = "linear"
    is_layer_norm: bool = False
    use_dropout: bool = False
    activate_output: bool = False
    last_layer_dropout: bool = False
    weight_initialization: str = "Normal"
    metadata: dict | None = None

    def options(self) -> dict:
        return {"layer_structure": list(self.layer_structure),
                "activation_func": self.activation_func, "is_layer_norm": self.is_layer_norm,
                "use_dropout": self.use_dropout, "activate_output": self.activate_output,
                "last_layer_dropout": self.last_layer_dropout,
                "weight_initialization": self.weight_initialization}


def flat_tensors(hn: HypernetworkFile) -> dict[str, torch.Tensor]:
    """The safetensors names of ``hn``'s tensors (``"768.0.linear.0.weight"`` ...)."""
    return {f"{dim}.{i}.{name}": t for dim, pair in hn.modules.items()
            for i, sd in enumerate(pair) for name, t in sd.items()}


def options_metadata(hn: HypernetworkFile) -> dict[str, str]:
    """The options as safetensors metadata (``hypernetwork.<option>``, JSON values)."""
    return {f"{_META}{k}": json.dumps(v) for k, v in hn.options().items()}


def detect(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
           ) -> bool:
    """Whether ``tensors`` (a safetensors file's) is a hypernetwork in our layout."""
    return bool(tensors) and all(_KEY.match(k) for k in tensors)


def from_flat(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
              where: str = "the file") -> HypernetworkFile:
    """Rebuild a :class:`HypernetworkFile` from flat names and ``hypernetwork.*`` metadata.

    Raises:
        HypernetworkFormatError: a name outside the layout, a width without both modules,
            or an option of the wrong type.
    """
    modules: dict[int, tuple[dict, dict]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise HypernetworkFormatError(f"{where}: tensor {key!r} is not a hypernetwork "
                                          "tensor ('<width>.<0|1>.linear.<i>.weight|bias').")
        pair = modules.setdefault(int(m.group(1)), (OrderedDict(), OrderedDict()))
        pair[int(m.group(2))][m.group(3)] = t
    if not modules:
        raise HypernetworkFormatError(f"{where} holds no hypernetwork tensors.")
    for dim, (k, v) in modules.items():
        if not k or k.keys() != v.keys():
            raise HypernetworkFormatError(f"{where}: width {dim} lacks its keys or values "
                                          "module (or they differ in layers).")
    meta = dict(metadata or {})
    options = {}
    for key in list(meta):
        if key.startswith(_META):
            try:
                options[key[len(_META):]] = json.loads(meta.pop(key))
            except json.JSONDecodeError as e:
                raise HypernetworkFormatError(f"{where}: metadata {key} is not JSON "
                                              f"({e}).") from e
    hn = HypernetworkFile(modules=dict(sorted(modules.items())), metadata=meta)
    return _apply_options(hn, options, where)


def _apply_options(hn: HypernetworkFile, options: Mapping, where: str) -> HypernetworkFile:
    for key in _BOOL_FIELDS:
        if key in options:
            if not isinstance(options[key], bool):
                raise HypernetworkFormatError(f"{where}: {key} = {options[key]!r} is not "
                                              "true/false.")
            setattr(hn, key, options[key])
    if "activation_func" in options:
        if not isinstance(options["activation_func"], str):
            raise HypernetworkFormatError(f"{where}: activation_func = "
                                          f"{options['activation_func']!r} is not a name.")
        hn.activation_func = options["activation_func"]
    if options.get("layer_structure") is not None:
        try:
            hn.layer_structure = tuple(float(x) for x in options["layer_structure"])
        except (TypeError, ValueError):
            raise HypernetworkFormatError(f"{where}: layer_structure = "
                                          f"{options['layer_structure']!r} is not a list of "
                                          "numbers.") from None
    if isinstance(options.get("weight_initialization"), str):
        hn.weight_initialization = options["weight_initialization"]
    return hn


def write_hypernetwork(path, hn: HypernetworkFile, metadata: Mapping[str, str] | None = None,
                       overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``hn`` as Tsuika's safetensors file (atomically).

    Args:
        path: a ``.safetensors`` path.
        hn: the hypernetwork.
        metadata: training metadata to add (strings).
        overwrite: replace an existing file.
        dtype: the tensors' dtype in the file (None: as they are).
    """
    meta = {**dict(metadata or {}), **options_metadata(hn)}
    return save_safetensors(path, flat_tensors(hn), meta, overwrite=overwrite, dtype=dtype)


def read_hypernetwork(path) -> HypernetworkFile:
    """Read Tsuika's safetensors hypernetwork, or a ``.pt`` one (:func:`read_comfy_pt`).

    Raises:
        HypernetworkFormatError: not a hypernetwork in A1111's layout.
    """
    path = Path(path)
    if path.suffix.lower() in (".pt", ".pth"):
        return read_comfy_pt(path)
    tensors, metadata = load_safetensors(path)
    return from_flat(tensors, metadata, where=str(path))


def comfy_dict(hn: HypernetworkFile, dtype: torch.dtype | None = None) -> dict:
    """The object ComfyUI's HypernetworkLoader and A1111 expect from ``torch.load``:
    ``{dim: (keys_sd, values_sd), "activation_func": ..., ...}``."""
    def conv(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()

    out: dict = {dim: tuple(OrderedDict((k, conv(t)) for k, t in sd.items()) for sd in pair)
                 for dim, pair in hn.modules.items()}
    out.update(hn.options())
    out["layer_structure"] = [float(x) for x in hn.layer_structure]
    name = (hn.metadata or {}).get("ss_output_name")
    if name:
        out["name"] = name
    step = (hn.metadata or {}).get("ss_steps")
    if step and step.isdigit():
        out["step"] = int(step)
    return out


def write_comfy_pt(path, hn: HypernetworkFile, overwrite: bool = False,
                   dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the ``.pt`` ComfyUI's HypernetworkLoader reads (atomically: temp file, rename).

    Args:
        path: the ``.pt`` path (``models/hypernetworks/<name>.pt`` for ComfyUI).
        hn: the hypernetwork.
        overwrite: replace an existing file.
        dtype: the tensors' dtype (ComfyUI casts them to the model's).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow "
                              "overwriting.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(comfy_dict(hn, dtype), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_comfy_pt(path) -> HypernetworkFile:
    """Read an A1111 / ComfyUI ``.pt`` hypernetwork with ``weights_only=True`` (no code runs).

    Raises:
        HypernetworkFormatError: it cannot be read that way, or is not a hypernetwork.
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on files it refuses
        raise HypernetworkFormatError(f"{path} cannot be read as a plain-data .pt "
                                      f"({type(e).__name__}); only files holding tensors, "
                                      "numbers, strings and containers are read.") from e
    if not isinstance(sd, dict):
        raise HypernetworkFormatError(f"{path} holds a {type(sd).__name__}, not a dict.")
    flat: dict[str, torch.Tensor] = {}
    for dim, pair in sd.items():
        if not isinstance(dim, int):
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise HypernetworkFormatError(f"{path}: width {dim} is not a (keys, values) pair.")
        for i, module in enumerate(pair):
            for name, t in dict(module).items():
                if not isinstance(t, torch.Tensor):
                    raise HypernetworkFormatError(f"{path}: {dim}.{i}.{name} is not a tensor.")
                flat[f"{dim}.{i}.{name}"] = t
    hn = from_flat(flat, {}, where=str(path))
    return _apply_options(hn, {k: v for k, v in sd.items() if isinstance(k, str)}, str(path))
