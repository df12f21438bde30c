"""Extract a LoRA from two models, resize a LoRA file, bake a LoRA into a checkpoint.

Models are read through the family registry (``families.load_model``), so every family that
can be loaded works here; LoRA files through ``formats.lora_layouts.read_lora`` (kohya,
LyCORIS, diffusers/peft and ComfyUI-native layouts). Output LoRAs have kohya names
(``formats.kohya.kohya_tensors``) and ``alpha = rank`` per layer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.kohya import LORA_SUFFIXES, kohya_tensors, lora_module_tensors
from ..formats.lora_keys import COMPONENTS, ModuleIndex, component_of_kohya_name
from ..formats.lora_state import LoraFormatError, LoraStateDict, LoraWeights, refuse_unsupported
from ..formats.metadata import path_name, training_metadata
from ..formats.safetensors_io import load_safetensors, save_safetensors
from ..methods.algorithms.locon import UNET_CONV
from ..methods.algorithms.lora import TEXT_LINEAR, UNET_LINEAR
from ..ops.extract import LayerReport, RankRule, extract_lora, resize_lora, summary

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOOL_KEY = "tsuika.tool"


def file_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``fp32`` / ``fp16`` / ``bf16``; a clear error otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"save_dtype = {name!r} is unknown; choose one of "
                         f"{', '.join(DTYPES)}.") from None


def layer_rules(rule: RankRule, conv_rule: RankRule | None = None, text_encoder: bool = True):
    """``rule_for`` of :func:`ops.extract.extract_lora` for the layers Tsuika's LoRA trains.

    Args:
        rule: for the UNet's transformer linear layers (and 1x1 projections) and the text
            encoders' attention / MLP projections.
        conv_rule: for the UNet's 3x3 convolutions (LoCon); None leaves them out.
        text_encoder: extract the text encoders too.
    """
    def rule_for(component: str, path: str, module: torch.nn.Module) -> RankRule | None:
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            return None
        if component == "unet":
            if UNET_LINEAR.match(path):
                return rule
            if conv_rule is not None and UNET_CONV.match(path):
                return conv_rule
            return None
        return rule if text_encoder and TEXT_LINEAR.match(path) else None
    return rule_for


def lora_tensors(lora: LoraStateDict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Kohya-named tensors of a canonical LoRA (weights in ``dtype``, alphas float32)."""
    return kohya_tensors({key: lora_module_tensors(w.down.to(dtype), w.up.to(dtype), w.alpha)
                          for key, w in lora.modules.items()})


def provenance(tool: str, sources: Mapping[str, str | Path], settings: Mapping[str, object],
               ) -> dict[str, str]:
    """What an output says of how it was made: the tool, its source files by name (never a
    local path) and the settings, as ``tsuika.*`` metadata."""
    return {TOOL_KEY: tool,
            "tsuika.sources": json.dumps({k: path_name(str(v)) for k, v in sources.items()}),
            "tsuika.settings": json.dumps(dict(settings), sort_keys=True, default=str),
            "tsuika.made_at": str(int(time.time()))}


def report_lines(reports: list[LayerReport], limit: int | None = None) -> list[str]:
    """One line per layer: rank and relative error, the worst errors first."""
    rows = sorted(reports, key=lambda r: -r.rel_error)
    if limit is not None:
        rows = rows[:limit]
    return [f"{r.component}:{r.path} rank {r.rank} error {r.rel_error:.2%}" for r in rows]


@dataclass
class ToolResult:
    """A written file and what the tool reports of it."""

    path: Path
    reports: list[LayerReport]
    headline: str


def lora_metadata(family: str, ranks: list[int], tool_meta: dict[str, str],
                   conv: bool, base_name: str) -> dict[str, str]:
    meta = training_metadata(base_model_version=family, base_model_name=base_name)
    dim = max(ranks) if ranks else 0
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(dim),
                 "ss_network_alpha": str(float(dim))})
    if conv:
        meta["ss_network_args"] = json.dumps({"algo": "locon"})
    meta.update(tool_meta)
    return meta


def extract_from_bundles(base, tuned, rule: RankRule, conv_rule: RankRule | None = None, *,
                         text_encoder: bool = True, clamp_quantile: float = 1.0,
                         min_relative_change: float = 1e-6):
    """:func:`ops.extract.extract_lora` over two loaded models' LoRA components.

    Args:
        base: the original ``ModelBundle``.
        tuned: the changed ``ModelBundle`` (same family and size).
        rule / conv_rule / text_encoder: see :func:`layer_rules`.
        clamp_quantile / min_relative_change: see :func:`ops.extract.extract_lora`.
    """
    if base.family != tuned.family:
        raise ValueError(f"the models are of different families (base {base.family!r}, tuned "
                         f"{tuned.family!r}); extract from two models of one family.")
    return extract_lora(base.components, tuned.components,
                        layer_rules(rule, conv_rule, text_encoder),
                        clamp_quantile=clamp_quantile, min_relative_change=min_relative_change)


def extracted_lora(base, tuned, rule: RankRule, conv_rule: RankRule | None = None, *,
                   text_encoder: bool = True, clamp_quantile: float = 1.0,
                   min_relative_change: float = 1e-6, dtype: torch.dtype = torch.float16,
                   sources: Mapping[str, str] | None = None):
    """``tuned - base`` as kohya-named LoRA tensors with their metadata.

    Args:
        base / tuned: two loaded ``ModelBundle`` of one family.
        rule / conv_rule / text_encoder / clamp_quantile / min_relative_change: see
            :func:`extract_from_bundles`.
        dtype: the weights' dtype.
        sources: names of the two models for the provenance (file names, never paths).

    Returns:
        ``(tensors, metadata, reports, headline)``.

    Raises:
        ValueError: the models differ in no layer a LoRA adapts.
    """
    sources = dict(sources or {"base": base.source_name, "tuned": tuned.source_name})
    lora, reports = extract_from_bundles(base, tuned, rule, conv_rule, text_encoder=text_encoder,
                                         clamp_quantile=clamp_quantile,
                                         min_relative_change=min_relative_change)
    if not lora.modules:
        raise ValueError(f"the models {path_name(sources['base'])} and "
                         f"{path_name(sources['tuned'])} do not differ in any layer a LoRA "
                         "adapts; nothing to extract.")
    settings = {"rank_mode": rule.mode, "rank": rule.rank, "value": rule.value,
                "conv": None if conv_rule is None else conv_rule.describe(),
                "text_encoder": text_encoder, "clamp_quantile": clamp_quantile}
    meta = lora_metadata(base.family, [r.rank for r in reports],
                         provenance("extract", sources, settings), conv_rule is not None,
                         sources["base"])
    stats = summary(reports)
    meta["tsuika.rel_error"] = f"{stats['rel_error']:.6g}"
    headline = (f"extracted {stats['layers']} layers ({rule.describe()}; mean rank "
                f"{stats['mean_rank']:.1f}), relative error {stats['rel_error']:.2%}")
    return lora_tensors(lora, dtype), meta, reports, headline


def extract_file(base_path, tuned_path, out_path, rule: RankRule,
                 conv_rule: RankRule | None = None, *, text_encoder: bool = True,
                 clamp_quantile: float = 1.0, min_relative_change: float = 1e-6,
                 save_dtype: str = "fp16", overwrite: bool = False) -> ToolResult:
    """Extract ``tuned - base`` as a LoRA file.

    Args:
        base_path: the original model (single file or diffusers folder).
        tuned_path: the fine-tuned model of the same family.
        out_path: the ``.safetensors`` to write (an existing file only with ``overwrite``).
        rule / conv_rule / text_encoder / clamp_quantile / min_relative_change: see
            :func:`extract_from_bundles`.
        save_dtype: ``fp32`` / ``fp16`` / ``bf16`` for the weights.
        overwrite: replace an existing ``out_path``.
    """
    from ..families import load_model

    dtype = file_dtype(save_dtype)
    _check_output(out_path, overwrite)
    base = load_model(base_path)
    tuned = load_model(tuned_path, family=base.family)
    tensors, meta, reports, headline = extracted_lora(
        base, tuned, rule, conv_rule, text_encoder=text_encoder, clamp_quantile=clamp_quantile,
        min_relative_change=min_relative_change, dtype=dtype,
        sources={"base": str(base_path), "tuned": str(tuned_path)})
    path = save_safetensors(out_path, tensors, meta, overwrite=overwrite)
    return ToolResult(path, reports, headline)


def _check_output(out_path, overwrite: bool) -> None:
    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"output {out.name!r} must end in .safetensors.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output or pass "
                              "--overwrite to replace it.")


# -- LoRA files read without a model: kohya names kept as they are -------------------------

def read_kohya_raw(tensors: Mapping[str, torch.Tensor], metadata=None) -> LoraStateDict:
    """A kohya-named LoRA read without a model: the module path is the kohya name after its
    component prefix (so it is written back unchanged by :func:`raw_kohya_tensors`).

    Raises:
        LoraFormatError: keys that are not kohya LoRA / LoCon keys (LyCORIS parts included).
    """
    refuse_unsupported(tensors, "kohya")
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, role in LORA_SUFFIXES.items():
            name = key[: -len(suffix) - 1]
            if key.endswith("." + suffix) and component_of_kohya_name(name):
                component = component_of_kohya_name(name)
                flat = name[len(COMPONENTS[component].prefix):]
                groups.setdefault((component, flat), {})[role] = tensor
                break
        else:
            raise LoraFormatError(f"key {key!r} is not a kohya LoRA key (<lora_unet_|lora_te_..."
                                  ">.lora_down.weight / .lora_up.weight / .alpha).")
    lsd = LoraStateDict(metadata=dict(metadata or {}))
    for (component, flat), roles in groups.items():
        where = f"kohya module {COMPONENTS[component].prefix}{flat}"
        if "down" not in roles or "up" not in roles:
            raise LoraFormatError(f"{where}: needs both lora_down and lora_up weights.")
        alpha = roles.get("alpha")
        alpha = float(alpha.float().item()) if alpha is not None else float(roles["down"].shape[0])
        lsd.add(component, flat, LoraWeights(roles["down"], roles["up"], alpha), where)
    return lsd


def raw_kohya_tensors(lora: LoraStateDict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The inverse of :func:`read_kohya_raw`."""
    out = {}
    for (component, flat), w in sorted(lora.modules.items()):
        name = COMPONENTS[component].prefix + flat
        for suffix, t in lora_module_tensors(w.down.to(dtype), w.up.to(dtype), w.alpha).items():
            out[f"{name}.{suffix}"] = t
    return out


def resize_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                   rule: RankRule, *, clamp_quantile: float = 1.0,
                   dtype: torch.dtype = torch.float16, source: str = "LoRA", bundle=None):
    """A LoRA's tensors (any layout ``read_lora`` takes) re-factored to the ranks ``rule``
    gives, with kohya names.

    Args:
        tensors: the LoRA's tensors (a file's, or a LORA_MODEL's): kohya, LyCORIS LoCon,
            diffusers/peft or ComfyUI-native (:func:`tools.lora_any.read_any_raw`).
        metadata: its metadata (kept, with the new ranks and the provenance on top).
        rule: ``fixed`` rank or a dynamic rule (a layer never grows).
        clamp_quantile: see :func:`ops.extract.low_rank`.
        dtype: the weights' dtype in the result.
        source: the source's name for the provenance (a file name, never a path).
        bundle: the model the LoRA is for (optional; see ``read_any_raw``).

    Returns:
        ``(tensors, metadata, reports, headline)``.
    """
    from .lora_any import read_any_raw

    lora = read_any_raw(tensors, metadata, bundle)
    resized, reports = resize_lora(lora, rule, clamp_quantile=clamp_quantile)
    out_meta = dict(metadata or {})
    dim = max((r.rank for r in reports), default=0)
    out_meta.update({"ss_network_dim": str(dim), "ss_network_alpha": str(float(dim))})
    out_meta.update(provenance("resize", {"lora": source},
                               {"rank_mode": rule.mode, "rank": rule.rank, "value": rule.value,
                                "clamp_quantile": clamp_quantile}))
    stats = summary(reports)
    out_meta["tsuika.rel_error"] = f"{stats['rel_error']:.6g}"
    before = max((w.rank for w in lora.modules.values()), default=0)
    headline = (f"resized {stats['layers']} layers from rank <= {before} to "
                f"{rule.describe()} (mean rank {stats['mean_rank']:.1f}), relative error "
                f"{stats['rel_error']:.2%}")
    return raw_kohya_tensors(resized, dtype), out_meta, reports, headline


def resize_file(lora_path, out_path, rule: RankRule, *, clamp_quantile: float = 1.0,
                save_dtype: str = "fp16", overwrite: bool = False,
                model_path=None) -> ToolResult:
    """Write ``lora_path`` re-factored to the ranks ``rule`` gives, with kohya names.

    Args:
        lora_path: a LoRA / LoCon file of any layout ``read_lora`` takes.
        out_path: the ``.safetensors`` to write.
        rule / clamp_quantile: see :func:`resize_tensors`.
        save_dtype: ``fp32`` / ``fp16`` / ``bf16``.
        overwrite: replace an existing ``out_path``.
        model_path: the model the LoRA is for (optional): checks its modules, and maps the
            UNet names of ComfyUI-native files of a UNet other than the released ones.
    """
    dtype = file_dtype(save_dtype)
    _check_output(out_path, overwrite)
    tensors, meta = load_safetensors(lora_path)
    out, out_meta, reports, headline = resize_tensors(
        tensors, meta, rule, clamp_quantile=clamp_quantile, dtype=dtype, source=str(lora_path),
        bundle=model_for(model_path))
    path = save_safetensors(out_path, out, out_meta, overwrite=overwrite)
    return ToolResult(path, reports, headline)


def model_for(model_path):
    """The loaded model at ``model_path`` (any family), or None for no path."""
    if model_path is None:
        return None
    from ..families import load_model

    return load_model(model_path)


def read_lora_for(bundle, lora_path_or_tensors, metadata=None) -> LoraStateDict:
    """Read a LoRA of any layout against ``bundle``'s module paths (ComfyUI-native and
    LDM-named kohya files through the UNet's LDM map: SD1.x/SD2.x and SDXL)."""
    from ..formats.lora_layouts import read_lora
    from .lora_any import ldm_to_diffusers_map

    ldm_map = ldm_to_diffusers_map(bundle.unet.config)  # SD1.x/SD2.x and SDXL UNets
    if ldm_map is None:
        log.debug("no LDM module map for %s", bundle.family)
    return read_lora(lora_path_or_tensors, ModuleIndex.from_models(bundle.components),
                     metadata=metadata, ldm_to_diffusers_module_map=ldm_map)
