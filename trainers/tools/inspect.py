"""Look inside a safetensors file without a model: what it is, and what its metadata says.

LoRA-family files: layout (kohya / LyCORIS, diffusers-peft, ComfyUI-native), algorithm
(LoRA, LoCon, LoHa, LoKr, DoRA, ...), components, ranks / alphas / delta norms per block, the
base-model family; checkpoints: family and parts; every file: its metadata, summarised. The
header and the (small) LoRA tensors are read; a checkpoint's weights are not.

The scrubber rewrites a file's metadata without local paths and dataset tags (the image
folders, tag counts, ComfyUI's embedded workflow and prompt), keeping the hyper-parameters.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from ..formats.metadata import _scrub_value
from ..formats.safetensors_io import load_safetensors, save_safetensors
from .checkpoint_merge import TensorFile
from .lora_files import _check_output, provenance

# key fragment -> algorithm, most specific first (LyCORIS names, peft's DoRA)
_ALGORITHMS = ((".hada_", "loha"), (".lokr_", "lokr"), (".dora_scale", "dora"),
               (".lora_magnitude_vector", "dora"), (".oft_", "oft"),
               (".lora_mid.", "locon (tucker)"))
# LyCORIS modules: the key that names a module, and which dimension of it is the rank
# (None: a full-rank factor)
_LYCORIS_RANK = {".hada_w1_b": 0, ".lokr_w2_a": 1, ".lokr_w1": None}
_DOWN = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", ".lora.down.weight")
_KOHYA_PREFIX = re.compile(r"^(lora_unet|lora_te[12]?)_")
_BLOCK = re.compile(r"(input_blocks[._]\d+|output_blocks[._]\d+|middle_block|down_blocks[._]\d+|"
                    r"up_blocks[._]\d+|mid_block|layers[._]\d+|resblocks[._]\d+)")
# metadata keys dropped by the scrubber: local folders, the data's tags, embedded graphs
PRIVATE_KEYS = ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_datasets",
                "workflow", "prompt")
SUMMARY_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "ss_base_model_version", "ss_sd_model_name", "ss_steps", "ss_learning_rate",
                "ss_resolution", "ss_output_name", "modelspec.architecture",
                "modelspec.title", "tsuika.tool", "tsuika.settings")


def _component(key: str) -> str:
    m = _KOHYA_PREFIX.match(key)
    if m:
        return {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder_1",
                "lora_te2": "text_encoder_2"}[m.group(1)]
    for prefix, name in (("unet.", "unet"), ("diffusion_model.", "unet"),
                         ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"),
                         ("text_encoders.clip_g.", "text_encoder_2"),
                         ("text_encoders.clip_l.", "text_encoder")):
        if key.startswith(prefix):
            return name
    return "unet"  # raw peft keys name no component


def _block(key: str, component: str) -> str:
    m = _BLOCK.search(key)
    block = m.group(1).replace(".", "_") if m else "other"
    return f"{component}:{block}"


def _family(metadata: dict, components: set[str], te_width: int | None) -> str:
    if metadata.get("ss_base_model_version"):
        return metadata["ss_base_model_version"]
    if metadata.get("modelspec.architecture"):
        return metadata["modelspec.architecture"]
    if {"text_encoder_1", "text_encoder_2"} & components:
        return "sdxl (from the text-encoder prefixes)"
    if te_width:
        return {768: "sd_v1 (768-wide text encoder)",
                1024: "sd_v2 (1024-wide text encoder)"}.get(te_width, f"unknown ({te_width}-wide)")
    return "unknown"


def _lora_info(path: Path, tensors: dict, metadata: dict) -> dict:
    from ..formats.lora_layouts import FORMATS

    keys = list(tensors)
    layout = next((f.name for f in FORMATS if f.detect(keys)), "unknown")
    algorithm = next((name for frag, name in _ALGORITHMS if any(frag in k for k in keys)), None)
    blocks: dict[str, dict] = defaultdict(lambda: {"modules": 0, "ranks": set(), "alphas": set(),
                                                   "norm2": 0.0})
    components, conv, te_width = set(), False, None
    for key in keys:
        down_suffix = next((s for s in _DOWN if key.endswith(s)), None)
        lyco = next((s for s in _LYCORIS_RANK if key.endswith(s)), None)
        if lyco is not None:
            stem = key[: -len(lyco)]
            if lyco == ".lokr_w1" and stem + ".lokr_w2_a" in tensors:
                continue  # counted by its w2_a, which carries the rank
            comp = _component(key)
            components.add(comp)
            dim = _LYCORIS_RANK[lyco]
            rank = int(tensors[key].shape[dim]) if dim is not None else 0
            alpha_t = tensors.get(stem + ".alpha")
            b = blocks[_block(stem, comp)]
            b["modules"] += 1
            b["ranks"].add(rank)  # 0: full-rank factors
            b["alphas"].add(float(alpha_t.float().item()) if alpha_t is not None else rank)
            b["norm2"] = float("nan")  # the product of these factors is not computed here
            continue
        if down_suffix is None:
            continue
        stem = key[: -len(down_suffix)]
        comp = _component(key)
        components.add(comp)
        down = tensors[key]
        up = next((tensors[stem + s] for s in (".lora_up.weight", ".lora_B.weight",
                                                ".lora_B.default.weight", ".lora.up.weight")
                   if stem + s in tensors), None)
        alpha_t = tensors.get(stem + ".alpha")
        rank = int(down.shape[0])
        alpha = float(alpha_t.float().item()) if alpha_t is not None else float(rank)
        conv = conv or (down.ndim == 4 and down.shape[-1] > 1)
        if comp != "unet" and down.ndim == 2 and te_width is None:
            te_width = int(down.shape[1])
        b = blocks[_block(stem, comp)]
        b["modules"] += 1
        b["ranks"].add(rank)
        b["alphas"].add(alpha)
        if up is not None:
            delta = up.float().flatten(1) @ down.float().flatten(1) * (alpha / rank)
            b["norm2"] += float(delta.norm()) ** 2
    if algorithm is None:
        algorithm = "locon" if conv else "lora"
    rows = [{"block": name, "modules": b["modules"], "ranks": sorted(b["ranks"]),
             "alphas": sorted(b["alphas"]), "delta_norm": b["norm2"] ** 0.5}
            for name, b in sorted(blocks.items())]
    return {"kind": "lora", "layout": "lycoris" if algorithm in ("loha", "lokr", "oft")
            else layout, "algorithm": algorithm, "components": sorted(components),
            "family": _family(metadata, components, te_width), "blocks": rows,
            "modules": sum(r["modules"] for r in rows)}


def inspect_file(path) -> dict:
    """What ``path`` holds (see the module docstring), as a JSON-able dict.

    Args:
        path: a ``.safetensors`` file (LoRA-family file, checkpoint, embedding, ...).
    """
    path = Path(path)
    header = TensorFile(path)
    try:
        keys, metadata = list(header.entries), header.metadata
        size = sum(header.entries[k][0].itemsize * _numel(header.entries[k][1]) for k in keys)
    finally:
        header.close()
    info: dict = {"file": path.name, "tensors": len(keys), "bytes": size}
    if any(k.startswith(("model.diffusion_model.", "conditioner.")) for k in keys):
        parts = sorted({p for k in keys for p, pre in (
            ("unet", "model.diffusion_model."), ("text encoder", "cond_stage_model."),
            ("text encoders", "conditioner.embedders."), ("vae", "first_stage_model."))
            if k.startswith(pre)})
        sdxl = any(k.startswith("conditioner.embedders.1.") for k in keys)
        info.update({"kind": "checkpoint", "parts": parts,
                     "family": "sdxl" if sdxl else _family(metadata, set(), None)})
    elif any(s in k for k in keys for s in (*_DOWN, ".hada_", ".lokr_", ".lora_up.", "lora_B")):
        tensors, _ = load_safetensors(path)
        info.update(_lora_info(path, tensors, metadata))
    elif {"emb_params"} & set(keys) or {"clip_l", "clip_g"} & set(keys):
        info["kind"] = "embedding"
    else:
        info["kind"] = "unknown"
    info["metadata"] = {k: metadata[k] for k in SUMMARY_KEYS if k in metadata}
    info["metadata_keys"] = sorted(metadata)
    info["private_metadata"] = sorted(k for k in metadata if k in PRIVATE_KEYS)
    return info


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def report_lines(info: dict) -> list[str]:
    """A readable report of :func:`inspect_file`'s result."""
    lines = [f"{info['file']}: {info['kind']}, {info['tensors']} tensors, "
             f"{info['bytes'] / 2**20:.1f} MiB"]
    if info["kind"] == "lora":
        lines.append(f"layout {info['layout']}, algorithm {info['algorithm']}, family "
                     f"{info['family']}, {info['modules']} modules in "
                     f"{', '.join(info['components'])}")
        for row in info["blocks"]:
            lines.append(f"  {row['block']}: {row['modules']} modules, rank "
                         f"{'/'.join(map(str, row['ranks']))}, alpha "
                         f"{'/'.join(f'{a:g}' for a in row['alphas'])}, |delta| "
                         f"{row['delta_norm']:.4g}")
    elif info["kind"] == "checkpoint":
        lines.append(f"family {info['family']}; parts: {', '.join(info['parts'])}")
    for key, value in info["metadata"].items():
        lines.append(f"  {key} = {value if len(value) < 120 else value[:117] + '...'}")
    if info["private_metadata"]:
        lines.append(f"warning: metadata holds local paths or dataset tags "
                     f"({', '.join(info['private_metadata'])}); `tsuika inspect --scrub` "
                     "writes a copy without them")
    return lines


def scrub_metadata(metadata: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``(kept, dropped keys)``: :data:`PRIVATE_KEYS` dropped, every other value with absolute
    paths reduced to their last component; hyper-parameters untouched."""
    kept, dropped = {}, []
    for key, value in metadata.items():
        if key in PRIVATE_KEYS:
            dropped.append(key)
            continue
        kept[key] = _scrub_value(key, value)
    return kept, dropped


def scrub_file(path, out_path, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write ``path``'s tensors to ``out_path`` with :func:`scrub_metadata`'s metadata.

    Returns:
        The path written and the metadata keys dropped.
    """
    _check_output(out_path, overwrite)
    tensors, metadata = load_safetensors(path)
    kept, dropped = scrub_metadata(metadata)
    changed = sorted(k for k in kept if kept[k] != metadata[k])
    kept.update(provenance("scrub", {"file": path}, {"dropped": dropped, "reduced": changed}))
    return save_safetensors(out_path, {k: v for k, v in tensors.items()}, kept,
                            overwrite=overwrite), dropped


def as_json(info: dict) -> str:
    return json.dumps(info, indent=1, default=lambda o: sorted(o) if isinstance(o, set) else
                      str(o))


__all__ = ["as_json", "inspect_file", "report_lines", "scrub_file", "scrub_metadata"]
