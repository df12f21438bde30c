"""LoRA file layouts (kohya, diffusers/peft, ComfyUI-native) <-> one in-memory form.

The canonical form is a :class:`LoraStateDict`: ``(component, module path) ->
LoraWeights(down, up, alpha)`` where the module path is the diffusers / transformers one and
the update of a module is ``alpha / rank * up @ down``. Each layout is a small class in the
explicit :data:`FORMATS` list with ``detect(keys)``, ``read(...)`` and (kohya, peft)
``write(lsd)``. Readers take every key they understand off a pool and raise on whatever is
left, so nothing in a file is ignored silently. Alpha is carried per module, never assumed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .lora_keys import (
    COMPONENTS,
    LoraKeyError,
    ModuleIndex,
    canonical_path,
    component_of_kohya_name,
    flat_index,
    kohya_name,
)

log = logging.getLogger(__name__)

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON LoraConfig per component
# Key fragments (after the module path) of adapter types this reader refuses, by name.
_UNSUPPORTED_PARTS = {
    ".lora_mid.": "LoCon/LyCORIS Tucker-decomposed convolution (lora_mid)",
    ".hada_": "LoHa (hada_*)", ".lokr_": "LoKr (lokr_*)", ".dora_scale": "DoRA (dora_scale)",
    ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)", ".oft_": "OFT (oft_*)",
    ".lora_embedding_": "LoRA on embeddings (lora_embedding_*)",
}


class LoraFormatError(ValueError):
    """A LoRA file or state dict that cannot be read or written as asked."""


@dataclass
class LoraWeights:
    """One adapted module: ``delta W = alpha / rank * up @ down``.

    Attributes:
        down: ``(rank, in)`` or, for a convolution, ``(rank, in, kh, kw)``.
        up: ``(out, rank)`` or ``(out, rank, 1, 1)``.
        alpha: the trained alpha (scale = alpha / rank).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self):
        if isinstance(self.alpha, torch.Tensor):
            self.alpha = self.alpha.float().item()
        self.alpha = float(self.alpha)
        check_lora_weights(self.down, self.up, self.alpha, "LoraWeights")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, where: str) -> None:
        """Raise :class:`LoraFormatError` naming ``where`` unless shapes and alpha fit."""
        check_lora_weights(self.down, self.up, self.alpha, where)


def check_lora_weights(down, up, alpha: float, where: str) -> None:
    """Raise :class:`LoraFormatError` naming ``where`` unless ``down`` / ``up`` / ``alpha``
    form a linear or convolution LoRA with equal ranks and a finite alpha > 0."""
    if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise LoraFormatError(f"{where}: down and up must be tensors.")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraFormatError(f"{where}: down {tuple(down.shape)} / up {tuple(up.shape)} are "
                              "neither linear (2-D, 2-D) nor convolution (4-D, 4-D) LoRA.")
    if down.shape[0] != up.shape[1]:
        raise LoraFormatError(f"{where}: rank mismatch, down {tuple(down.shape)} has rank "
                              f"{down.shape[0]} but up {tuple(up.shape)} has rank {up.shape[1]}.")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFormatError(f"{where}: convolution up {tuple(up.shape)} must be 1x1.")
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoraFormatError(f"{where}: alpha = {alpha} must be a finite number > 0.")


@dataclass
class LoraStateDict:
    """A LoRA in canonical form.

    Attributes:
        modules: ``{(component, module path): LoraWeights}``; paths as the diffusers /
            transformers model names them (text encoders without ``text_model.`` unless the
            model has that level).
        metadata: string metadata carried with the file.
    """

    modules: dict[tuple[str, str], LoraWeights] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.modules})

    def add(self, component: str, path: str, weights: LoraWeights, where: str) -> None:
        if (component, path) in self.modules:
            raise LoraFormatError(f"{where}: module {component}:{path} appears twice (two key "
                                  "spellings of the same module in one file).")
        weights.check(where)
        self.modules[(component, path)] = weights


class _KeyPool:
    """The keys a reader has not consumed yet; leftovers are an error."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], fmt: str):
        self.left = dict(tensors)
        self.fmt = fmt

    def take(self, key: str) -> torch.Tensor:
        return self.left.pop(key)

    def finish(self) -> None:
        if not self.left:
            return
        keys = sorted(self.left)
        more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
        raise LoraFormatError(
            f"{len(keys)} key(s) of this {self.fmt} LoRA were not understood: "
            f"{', '.join(keys[:10])}{more}. The file holds parts Tsuika does not read; "
            "nothing was loaded rather than loading it partly.")


def _refuse_unsupported(keys: Iterable[str], fmt: str) -> None:
    for fragment, what in _UNSUPPORTED_PARTS.items():
        hits = [k for k in keys if fragment in k]
        if hits:
            raise LoraFormatError(f"this {fmt} file uses {what} (e.g. {hits[0]!r}, {len(hits)} "
                                  "keys), which Tsuika's LoRA reader does not support yet; use "
                                  "a plain LoRA file.")


def _split(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    """``(module part, role)`` of a key ending in one of ``suffixes`` (suffix -> role)."""
    for suffix, role in suffixes.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _assemble(pool: _KeyPool, groups: Mapping[tuple[str, str], Mapping[str, str]],
              lsd: LoraStateDict, fmt: str, default_alpha=None) -> None:
    """Build LoraWeights from ``{(component, path): {role: key}}`` and take the keys."""
    for (component, path), roles in groups.items():
        where = f"{fmt} module {component}:{path}"
        if "down" not in roles or "up" not in roles:
            have = ", ".join(sorted(roles.values()))
            raise LoraFormatError(f"{where}: needs both a down and an up weight; found only "
                                  f"{have}.")
        down, up = pool.take(roles["down"]), pool.take(roles["up"])
        if "alpha" in roles:
            alpha_t = pool.take(roles["alpha"])
            if alpha_t.numel() != 1:
                raise LoraFormatError(f"{where}: alpha {roles['alpha']!r} has shape "
                                      f"{tuple(alpha_t.shape)}; it must be a single number.")
            alpha = float(alpha_t.float().item())
        elif default_alpha is not None:
            alpha = default_alpha(component, path, down.shape[0])
        else:
            alpha = float(down.shape[0])  # the loaders' rule for a missing alpha: scale 1
        check_lora_weights(down, up, alpha, where)
        lsd.add(component, path, LoraWeights(down, up, alpha), where)


# -- kohya ------------------------------------------------------------------------------------
class KohyaFormat:
    """``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""

    name = "kohya"
    _SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}

    def detect(self, keys: Iterable[str]) -> bool:
        return any(component_of_kohya_name(k) is not None for k in keys)

    def read(self, tensors, metadata=None, module_index: ModuleIndex | None = None, *,
             ldm_to_diffusers_module_map=None, **_unused) -> LoraStateDict:
        if module_index is None:
            raise LoraFormatError("reading a kohya LoRA needs the model's module paths ('_' in "
                                  "kohya names is ambiguous): pass module_index="
                                  "ModuleIndex.from_models({'unet': unet, 'text_encoder': te}).")
        _refuse_unsupported(tensors, self.name)
        pool = _KeyPool(tensors, self.name)
        ldm_map = _normalise_ldm_map(ldm_to_diffusers_module_map) or {}
        ldm_names = flat_index("unet", ldm_map)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for key in tensors:
            split = _split(key, self._SUFFIXES)
            if split is None or component_of_kohya_name(split[0]) is None:
                continue
            name, role = split
            if name in ldm_names:  # kohya names in LDM module naming (lora_unet_input_blocks_)
                component = "unet"
                path = module_index.resolve("unet", ldm_map[ldm_names[name]])
            else:
                component, path = module_index.from_kohya(name)
            groups.setdefault((component, path), {})[role] = key
        lsd = LoraStateDict(metadata=dict(metadata or {}))
        _assemble(pool, groups, lsd, self.name)
        pool.finish()
        return lsd

    def write(self, lsd: LoraStateDict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        owner: dict[str, tuple[str, str]] = {}
        for (component, path), w in sorted(lsd.modules.items()):
            name = kohya_name(component, path)
            if owner.setdefault(name, (component, path)) != (component, path):
                raise LoraFormatError(f"modules {owner[name]} and {(component, path)} both get "
                                      f"the kohya name {name!r}.")
            tensors[f"{name}.lora_down.weight"] = w.down.contiguous()
            tensors[f"{name}.lora_up.weight"] = w.up.contiguous()
            # float32 so an alpha like 0.1 survives; the loaders read it with .item().
            tensors[f"{name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        # diffusers uses this key as the LoraConfig and refuses it next to kohya alphas.
        metadata = {k: v for k, v in lsd.metadata.items() if k != ADAPTER_METADATA_KEY}
        return tensors, metadata


# -- diffusers / peft -------------------------------------------------------------------------
PEFT_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder."}  # SDXL: text_encoder_2.
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up",
                  ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha"}
_PEFT_MARKERS = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight")
# Old diffusers attention-processor LoRA: <block>.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _peft_pattern_value(patterns: Mapping[str, float], path: str):
    # peft's rank/alpha pattern rule: the pattern matches the path or a dotted suffix of it.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def _adapter_config(metadata: Mapping[str, str], component: str) -> dict | None:
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"metadata {ADAPTER_METADATA_KEY} is not valid JSON ({e}); the "
                              "file is damaged.") from e
    prefix = f"{component}."
    scoped = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    if scoped:
        return scoped
    return data if "lora_alpha" in data else None  # a single-model adapter file


class PeftFormat:
    """diffusers / peft: ``unet.<path>.lora_A.weight`` / ``lora_B.weight``.

    Also reads old diffusers ``<path>.lora.down.weight`` / ``.lora.up.weight`` (+ ``.alpha``)
    and processor-style ``...processor.to_q_lora.down.weight``, and raw peft keys (with or
    without ``base_model.model.``) whose component comes from ``component=`` or the index.
    Alpha comes from diffusers' ``lora_adapter_metadata``, else ``.alpha`` keys, else rank.
    """

    name = "peft"

    @staticmethod
    def _strip(key: str) -> str:
        return key[len("base_model.model."):] if key.startswith("base_model.model.") else key

    def detect(self, keys: Iterable[str]) -> bool:
        for key in keys:
            if (key.startswith(("diffusion_model.", "text_encoders."))
                    or component_of_kohya_name(key) is not None):
                continue  # the other layouts' keys; the layouts stay disjoint
            if key.endswith(_PEFT_MARKERS) or _PROCESSOR.search(key):
                return True
        return False

    def _locate(self, body: str, component: str | None, module_index: ModuleIndex | None):
        for comp, prefix in PEFT_PREFIXES.items():
            if body.startswith(prefix):
                return comp, body[len(prefix):]
        if component is not None:
            return component, body
        if module_index is not None:
            owners = [c for c in module_index.components
                      if body in module_index.paths(c)
                      or COMPONENTS[c].root and COMPONENTS[c].root + body in module_index.paths(c)]
            if len(owners) == 1:
                return owners[0], body
        raise LoraFormatError(f"peft key for module {body!r} does not say which model part it "
                              f"belongs to (no {' / '.join(PEFT_PREFIXES.values())} prefix); "
                              "pass component='unet' or 'text_encoder', or a module_index that "
                              "contains it.")

    def read(self, tensors, metadata=None, module_index: ModuleIndex | None = None, *,
             component: str | None = None, **_unused) -> LoraStateDict:
        _refuse_unsupported(tensors, self.name)
        pool = _KeyPool(tensors, self.name)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for key in tensors:
            body = self._strip(key)
            m = _PROCESSOR.search(body)
            if m:
                leaf = "to_out.0" if m.group(1) == "to_out" else m.group(1)
                split = (f"{body[:m.start()]}.{leaf}", "down" if m.group(2) == "down" else "up")
            else:
                split = _split(body, _PEFT_SUFFIXES)
            if split is None:
                continue
            comp, path = self._locate(split[0], component, module_index)
            path = (module_index.resolve(comp, path) if module_index is not None
                    else canonical_path(comp, path))
            groups.setdefault((comp, path), {})[split[1]] = key
        configs = {c: _adapter_config(metadata, c) for c in {c for c, _ in groups}}

        def alpha_from_config(comp: str, path: str, rank: int) -> float:
            cfg = configs.get(comp)
            if not cfg:
                return float(rank)  # peft/diffusers without alpha: scale 1
            alpha = _peft_pattern_value(cfg.get("alpha_pattern") or {}, path)
            alpha = float(cfg.get("lora_alpha", rank) if alpha is None else alpha)
            # rsLoRA scales by alpha / sqrt(r); the same update under alpha' / r:
            return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha

        lsd = LoraStateDict(metadata=dict(metadata or {}))
        _assemble(pool, groups, lsd, self.name, default_alpha=alpha_from_config)
        pool.finish()
        return lsd

    def write(self, lsd: LoraStateDict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        adapter_meta: dict[str, object] = {}
        for comp in lsd.components():
            if comp not in PEFT_PREFIXES:
                raise LoraFormatError(f"component {comp!r} has no diffusers prefix; known: "
                                      f"{', '.join(PEFT_PREFIXES)}.")
            # Keys keep the text_model. level: diffusers drops it for models without it, and
            # ComfyUI maps diffusers text-encoder keys only in that spelling.
            prefix, root = PEFT_PREFIXES[comp], COMPONENTS[comp].root
            for key, value in to_peft_state_dict(lsd, comp).items():
                key = key if not root or key.startswith(root) else root + key
                tensors[prefix + key] = value
            for k, v in peft_config_kwargs(lsd, comp).items():
                adapter_meta[prefix + k] = v
        metadata = dict(lsd.metadata)
        metadata[ADAPTER_METADATA_KEY] = json.dumps(adapter_meta, sort_keys=True)
        return tensors, metadata


# -- ComfyUI native ---------------------------------------------------------------------------
COMFY_TEXT_ENCODERS = {"clip_l": "text_encoder"}  # SDXL: clip_l -> text_encoder_1, clip_g -> _2


class ComfyFormat:
    """ComfyUI's own LoRA files (Train LoRA + Save LoRA, LoRA extraction): LDM module names.

    ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight`` and
    ``text_encoders.clip_l.transformer.text_model.encoder...q_proj.lora_down.weight``. UNet
    paths need ``ldm_to_diffusers_module_map`` (LDM module path, relative to
    ``diffusion_model.``, -> diffusers module path). ComfyUI also stores full differences
    (``.diff`` / ``.diff_b``) for norms and biases; a LoRA cannot hold them, so they are an
    error unless ``drop_weight_diffs=True``.
    """

    name = "comfy"
    _SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down",
                 ".lora_B.weight": "up", ".alpha": "alpha"}
    _DIFFS = (".diff", ".diff_b")

    def detect(self, keys: Iterable[str]) -> bool:
        return any(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys)

    def _locate(self, body: str, ldm_map: Mapping[str, str] | None) -> tuple[str, str]:
        if body.startswith("diffusion_model."):
            ldm_path = body[len("diffusion_model."):]
            if ldm_map is None:
                raise LoraFormatError(
                    "reading a ComfyUI-native LoRA needs the LDM -> diffusers UNet module map: "
                    "pass ldm_to_diffusers_module_map (LDM module path -> diffusers module path "
                    "for this UNet).")
            if ldm_path not in ldm_map:
                raise LoraKeyError(f"ComfyUI LoRA module diffusion_model.{ldm_path} is not in "
                                   "the LDM -> diffusers map; the LoRA was made for a different "
                                   "UNet or the map is incomplete.")
            return "unet", ldm_map[ldm_path]
        parts = body.split(".", 3)  # text_encoders.<clip>.transformer.<path>
        if len(parts) == 4 and parts[2] == "transformer" and parts[1] in COMFY_TEXT_ENCODERS:
            return COMFY_TEXT_ENCODERS[parts[1]], parts[3]
        raise LoraFormatError(f"ComfyUI LoRA module {body!r}: unknown model part; known text "
                              f"encoders: {', '.join(COMFY_TEXT_ENCODERS)}.")

    def read(self, tensors, metadata=None, module_index: ModuleIndex | None = None, *,
             ldm_to_diffusers_module_map: Mapping[str, str] | None = None,
             drop_weight_diffs: bool = False, **_unused) -> LoraStateDict:
        _refuse_unsupported(tensors, self.name)
        ldm_map = _normalise_ldm_map(ldm_to_diffusers_module_map)
        pool = _KeyPool(tensors, self.name)
        diffs = [k for k in tensors if k.endswith(self._DIFFS)]
        if diffs and not drop_weight_diffs:
            raise LoraFormatError(f"this ComfyUI LoRA also holds {len(diffs)} full weight "
                                  f"differences (e.g. {diffs[0]!r}: trained norms/biases) that "
                                  "a LoRA cannot represent; pass drop_weight_diffs=True to read "
                                  "the LoRA part without them.")
        for key in diffs:
            pool.take(key)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for key in tensors:
            split = _split(key, self._SUFFIXES)
            if split is None or not self.detect([split[0]]):
                continue
            comp, path = self._locate(split[0], ldm_map)
            path = (module_index.resolve(comp, path) if module_index is not None
                    else canonical_path(comp, path))
            groups.setdefault((comp, path), {})[split[1]] = key
        lsd = LoraStateDict(metadata=dict(metadata or {}))
        _assemble(pool, groups, lsd, self.name)
        pool.finish()
        return lsd


def _normalise_ldm_map(ldm_map: Mapping[str, str] | None) -> dict[str, str] | None:
    """Keys relative to ``diffusion_model.`` (full-checkpoint prefixes are accepted)."""
    if ldm_map is None:
        return None
    out = {}
    for key, value in ldm_map.items():
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


# -- registry and entry points ----------------------------------------------------------------
FORMATS: list = [KohyaFormat(), PeftFormat(), ComfyFormat()]


def get_format(name: str):
    """The format called ``name``; a clear error listing the known ones."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise LoraFormatError(f"LoRA format {name!r} is unknown; known formats: "
                          f"{', '.join(f.name for f in FORMATS)}.")


def detect_format(keys: Iterable[str]):
    """The one format whose ``detect`` accepts ``keys``.

    Raises:
        LoraFormatError: no format or several formats match (the message lists them).
    """
    keys = list(keys)
    hits = [fmt for fmt in FORMATS if fmt.detect(keys)]
    if len(hits) == 1:
        return hits[0]
    sample = ", ".join(sorted(keys)[:5]) or "(no keys)"
    known = ", ".join(f.name for f in FORMATS)
    if not hits:
        raise LoraFormatError(f"not a LoRA layout Tsuika knows (keys like {sample}); known "
                              f"formats: {known}.")
    raise LoraFormatError(f"the keys match several LoRA formats ({', '.join(f.name for f in hits)}"
                          f"; keys like {sample}); a file must use one layout. Known: {known}.")


def read_lora(path_or_tensors, module_index: ModuleIndex | None = None, *,
              metadata: Mapping[str, str] | None = None, format: str | None = None,
              component: str | None = None,
              ldm_to_diffusers_module_map: Mapping[str, str] | None = None,
              drop_weight_diffs: bool = False) -> LoraStateDict:
    """Read a LoRA file or state dict of any known layout, consuming every key.

    Args:
        path_or_tensors: a ``.safetensors`` path, or ``{key: tensor}``.
        module_index: the model's module paths (required for kohya; for peft/comfy it checks
            every module exists and picks the model's spelling of text-encoder paths).
        metadata: metadata of a state dict passed in memory (a file brings its own).
        format: force a layout by name instead of detecting it.
        component: model part of raw peft keys that carry no ``unet.`` / ``text_encoder.``.
        ldm_to_diffusers_module_map: LDM -> diffusers UNet module paths (comfy files, kohya
            files in LDM naming).
        drop_weight_diffs: read a ComfyUI file's LoRA part and drop its ``.diff`` keys.

    Raises:
        LoraFormatError: unknown/ambiguous layout, unsupported parts, leftover keys, bad shapes.
        LoraKeyError: a module that the model does not have.
    """
    if isinstance(path_or_tensors, Mapping):
        tensors, file_meta = dict(path_or_tensors), dict(metadata or {})
    else:
        from .safetensors_io import load_safetensors

        tensors, file_meta = load_safetensors(path_or_tensors)
        file_meta.update(metadata or {})
    fmt = get_format(format) if format else detect_format(tensors)
    lsd = fmt.read(tensors, file_meta, module_index, component=component,
                   ldm_to_diffusers_module_map=ldm_to_diffusers_module_map,
                   drop_weight_diffs=drop_weight_diffs)
    log.info("read %d LoRA modules (%s layout)", len(lsd.modules), fmt.name)
    return lsd


def write_lora(lsd: LoraStateDict, format: str = "kohya"
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of ``lsd`` in the layout ``format``, for ``save_safetensors``.

    Args:
        lsd: the LoRA.
        format: a writable format name (``kohya`` or ``peft``).
    """
    fmt = get_format(format)
    if not hasattr(fmt, "write"):
        writable = ", ".join(f.name for f in FORMATS if hasattr(f, "write"))
        raise LoraFormatError(f"Tsuika reads but does not write the {format!r} layout; "
                              f"writable: {writable}.")
    return fmt.write(lsd)


def to_kohya(lsd: LoraStateDict, dtype: torch.dtype | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` in kohya layout, ready for ``save_safetensors``.

    Args:
        lsd: the LoRA.
        dtype: cast the up/down weights (e.g. ``torch.float16``); alphas stay float32.
    """
    tensors, metadata = write_lora(lsd, "kohya")
    if dtype is not None:
        tensors = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in tensors.items()}
    return tensors, metadata


# -- live peft models ---------------------------------------------------------------------------
_PEFT_SD_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}


def from_peft_state_dict(component: str, peft_sd: Mapping[str, torch.Tensor],
                         alpha: float | Mapping[str, float],
                         metadata: Mapping[str, str] | None = None) -> LoraStateDict:
    """Canonical form of what ``peft.get_peft_model_state_dict(model)`` returns.

    Args:
        component: the model part (``"unet"``, ``"text_encoder"``).
        peft_sd: ``{<path>.lora_A.weight | <path>.lora_B.weight: tensor}`` (a
            ``base_model.model.`` prefix is accepted).
        alpha: one alpha for every module, or ``{module path: alpha}`` (see
            :func:`peft_alphas`); kohya semantics, scale = alpha / rank.
        metadata: metadata to carry.
    """
    if component not in COMPONENTS:
        raise LoraKeyError(f"unknown LoRA component {component!r}; known: "
                           f"{', '.join(COMPONENTS)}.")
    _refuse_unsupported(peft_sd, "peft")
    pool = _KeyPool(peft_sd, "peft state dict")
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in peft_sd:
        split = _split(PeftFormat._strip(key), _PEFT_SD_SUFFIXES)
        if split is not None:
            groups.setdefault((component, split[0]), {})[split[1]] = key

    def alpha_of(comp: str, path: str, rank: int) -> float:
        if not isinstance(alpha, Mapping):
            return float(alpha)
        if path not in alpha:
            raise LoraFormatError(f"no alpha given for {comp} module {path!r}; pass an alpha "
                                  "for every adapted module (peft_alphas(model) lists them).")
        return float(alpha[path])

    lsd = LoraStateDict(metadata=dict(metadata or {}))
    _assemble(pool, groups, lsd, "peft", default_alpha=alpha_of)
    pool.finish()
    return lsd


def to_peft_state_dict(lsd: LoraStateDict, component: str) -> dict[str, torch.Tensor]:
    """``{<path>.lora_A.weight, <path>.lora_B.weight}`` of one component, for
    ``peft.set_peft_model_state_dict``; build the matching ``LoraConfig`` from
    :func:`peft_config_kwargs` so the alphas are the trained ones."""
    out: dict[str, torch.Tensor] = {}
    for (comp, path), w in lsd.modules.items():
        if comp == component:
            out[f"{path}.lora_A.weight"] = w.down
            out[f"{path}.lora_B.weight"] = w.up
    return out


def _most_common(values: list) -> object:
    return max(sorted(set(values)), key=values.count)


def peft_config_kwargs(lsd: LoraStateDict, component: str) -> dict:
    """``LoraConfig`` keyword arguments that reproduce one component's ranks and alphas.

    ``r`` / ``lora_alpha`` are the most common values; modules that differ get exact
    ``rank_pattern`` / ``alpha_pattern`` entries. ``target_modules`` lists every path.
    """
    items = sorted((p, w) for (c, p), w in lsd.modules.items() if c == component)
    if not items:
        raise LoraFormatError(f"the LoRA has no {component} modules; it has: "
                              f"{', '.join(lsd.components()) or 'none'}.")
    r = _most_common([w.rank for _, w in items])
    lora_alpha = _most_common([w.alpha for _, w in items])
    return {
        "r": r, "lora_alpha": lora_alpha,
        "rank_pattern": {re.escape(p): w.rank for p, w in items if w.rank != r},
        "alpha_pattern": {re.escape(p): w.alpha for p, w in items if w.alpha != lora_alpha},
        "target_modules": [p for p, _ in items],
    }


def peft_alphas(model, adapter_name: str = "default") -> dict[str, float]:
    """``{module path: alpha}`` of a peft-adapted model, in kohya semantics (scale * rank).

    Recovering alpha from peft's ``scaling`` keeps ``alpha_pattern`` and rsLoRA right.

    Args:
        model: a module with peft LoRA layers injected (or a ``PeftModel``).
        adapter_name: the adapter to read.
    """
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        ranks = getattr(module, "r", None)
        if not isinstance(scaling, dict) or adapter_name not in scaling or not ranks:
            continue
        path = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        out[path] = float(scaling[adapter_name]) * int(ranks[adapter_name])
    return out
