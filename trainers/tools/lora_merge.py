"""Merge LoRA files (or LORA_MODEL tensors) into one kohya-named LoRA with provenance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..formats.safetensors_io import load_safetensors, save_safetensors
from ..ops.extract import RankRule, summary
from ..ops.lora_merge import merge_loras
from .lora_any import read_any_raw
from .lora_files import (
    ToolResult,
    _check_output,
    file_dtype,
    model_for,
    provenance,
    raw_kohya_tensors,
)


def merge_lora_tensors(loras: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, str]]],
                       weights: Sequence[float], method: str = "concat",
                       rule: RankRule | None = None, *, density: float = 0.5, seed: int = 0,
                       dtype: torch.dtype = torch.float16,
                       names: Sequence[str] | None = None, bundle=None):
    """Merge LoRAs given as ``(tensors, metadata)`` into one with kohya names.

    Args:
        loras: each LoRA's tensors and metadata, of any layout ``read_lora`` takes (kohya,
            LyCORIS LoCon, diffusers/peft, ComfyUI-native; they may differ).
        weights / method / rule / density / seed: see :func:`ops.lora_merge.merge_loras`.
        dtype: the weights' dtype in the result.
        names: the sources' names for the provenance (file names, never paths).
        bundle: the model the LoRAs are for (optional; see ``tools.lora_any.read_any_raw``).

    Returns:
        ``(tensors, metadata, reports, headline)``; the metadata is the first LoRA's with the
        new ranks and the provenance on top.
    """
    canon = [read_any_raw(t, m, bundle) for t, m in loras]
    merged, reports = merge_loras(canon, list(weights), method, rule, density=density,
                                  seed=seed)
    meta = dict(loras[0][1] or {})
    dim = max((w.rank for w in merged.modules.values()), default=0)
    meta.update({"ss_network_dim": str(dim), "ss_network_alpha": str(float(dim))})
    names = list(names or [f"lora{i + 1}" for i in range(len(loras))])
    meta.update(provenance("merge_lora", {f"lora{i + 1}": n for i, n in enumerate(names)},
                           {"method": method, "weights": list(weights), "density": density,
                            "seed": seed, "rank": None if rule is None else rule.describe()}))
    stats = summary(reports)
    headline = (f"merged {len(loras)} LoRAs ({method}, weights "
                f"{', '.join(f'{w:g}' for w in weights)}): {stats['layers']} layers, rank <= "
                f"{dim}" + ("" if method == "concat" else
                            f", relative error {stats['rel_error']:.2%}"))
    return raw_kohya_tensors(merged, dtype), meta, reports, headline


def merge_lora_files(paths: Sequence, weights: Sequence[float], out_path,
                     method: str = "concat", rule: RankRule | None = None, *,
                     density: float = 0.5, seed: int = 0, save_dtype: str = "fp16",
                     overwrite: bool = False, model_path=None) -> ToolResult:
    """Merge LoRA files (any layout ``read_lora`` takes) into ``out_path`` with kohya names.

    Args:
        paths: two or more LoRA files.
        weights: one multiplier per file.
        out_path: the ``.safetensors`` to write.
        method / rule / density / seed: see :func:`ops.lora_merge.merge_loras`.
        save_dtype: ``fp32`` / ``fp16`` / ``bf16``.
        overwrite: replace an existing ``out_path``.
        model_path: the model they are for (optional; see ``lora_files.resize_file``).
    """
    dtype = file_dtype(save_dtype)
    _check_output(out_path, overwrite)
    loras = [load_safetensors(p) for p in paths]
    tensors, meta, reports, headline = merge_lora_tensors(
        loras, weights, method, rule, density=density, seed=seed, dtype=dtype,
        names=[str(p) for p in paths], bundle=model_for(model_path))
    path = save_safetensors(out_path, tensors, meta, overwrite=overwrite)
    return ToolResult(path, reports, headline)
