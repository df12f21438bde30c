"""Random-weight models of a family's architecture, written as a diffusers folder and as a
single-file checkpoint in the original layout. Tests train on them; users can try the tool
on them; ``sd15-hostable`` is the smallest one ComfyUI itself detects and samples as SD1.5.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from .families.base import CONFIG_DIR
from .families.sd15 import TOKENIZER_DIR, read_config

log = logging.getLogger(__name__)

FIXTURES = {
    "sd15-tiny": "sd15_tiny",
    "sd15-hostable": "sd15_hostable",
}


def build_modules(config_name: str, seed: int = 0):
    """(unet, vae, text_encoder, configs) with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = {p: read_config(config_name, p) for p in ("unet", "vae", "text_encoder", "scheduler")}
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    vae = AutoencoderKL.from_config(cfg["vae"])
    te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    return unet.eval(), vae.eval(), te.eval(), cfg


def write_fixture(name: str, out_dir: str | Path, seed: int = 0, dtype: str = "fp32",
                  overwrite: bool = False, single_file_only: bool = False) -> dict[str, Path]:
    """Write ``<out>/diffusers/`` and ``<out>/<name>.safetensors``.

    Args:
        name: a key of ``FIXTURES``.
        out_dir: destination folder (created).
        dtype: ``fp32`` or ``fp16`` for the single-file checkpoint.
        overwrite: replace existing files of the same names.
        single_file_only: write only ``<name>.safetensors``, e.g. straight into ComfyUI's
            ``models/checkpoints``, where Load Checkpoint would list a diffusers folder's
            three weight files as three more checkpoints.
    """
    if name not in FIXTURES:
        raise ValueError(f"fixture {name!r} is unknown; choose one of: {', '.join(FIXTURES)}.")
    out = Path(out_dir)
    folder, single = out / "diffusers", out / f"{name}.safetensors"
    written = (single,) if single_file_only else (folder, single)
    for p in written:
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists; remove it or pass --overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    unet, vae, te, cfg = build_modules(FIXTURES[name], seed)
    if not single_file_only:
        if folder.exists():
            shutil.rmtree(folder)
        write_diffusers_folder(folder, unet, vae, te, cfg)
    write_single_file(single, unet, vae, te, cfg, dtype=dtype, overwrite=overwrite,
                      metadata={"tsuika.fixture": name})
    log.info("wrote fixture %s: %s", name, ", ".join(map(str, written)))
    if single_file_only:
        return {"single_file": single}
    return {"diffusers": folder, "single_file": single}


def write_diffusers_folder(folder: str | Path, unet, vae, te, cfg: dict) -> Path:
    """Write modules as a diffusers SD1.x folder (what ``from_pretrained`` and Tsuika's
    loader read), with the shipped CLIP tokenizer; ``folder`` must not exist yet."""
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    te.save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir(parents=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / f, folder / "tokenizer" / f)
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(cfg["scheduler"], indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    return folder


def write_single_file(path, unet, vae, te, cfg: dict, *, dtype: str = "fp32",
                      overwrite: bool = False, metadata: dict | None = None) -> None:
    """Write diffusers modules as one original-layout (LDM) SD1.x file with the config hints
    Tsuika's loader reads back; ``dtype`` "fp16" halves floating tensors."""
    from .formats.ldm_checkpoint import config_metadata_hints, diffusers_to_ldm
    from .formats.safetensors_io import save_safetensors

    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te.state_dict(),
                           unet_config=dict(unet.config), vae_config=dict(vae.config))
    if dtype == "fp16":
        ldm = {k: v.half() if v.is_floating_point() else v for k, v in ldm.items()}
    hints = config_metadata_hints(unet_config=cfg["unet"], vae_config=cfg["vae"],
                                  text_encoder_config=cfg["text_encoder"])
    hints.update({"modelspec.architecture": "stable-diffusion-v1",
                  "modelspec.prediction_type": cfg["scheduler"]["prediction_type"],
                  **(metadata or {})})
    save_safetensors(path, {k: v.contiguous() for k, v in ldm.items()}, hints,
                     overwrite=overwrite)


__all__ = ["FIXTURES", "CONFIG_DIR", "build_modules", "write_fixture", "write_single_file"]
