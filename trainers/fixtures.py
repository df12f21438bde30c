"""Random-weight models of a family's architecture, written as a diffusers folder and as a
single-file checkpoint in the original layout. Tests train on them; users can try the tool
on them; ``sd15-hostable`` / ``sdxl-hostable`` are the smallest ones ComfyUI itself detects
and samples as SD1.5 / SDXL. An SDXL config folder holds ``text_encoder_2.json`` (the
OpenCLIP-G encoder with its projection) beside the SD1 files.

``sdxl-hostable`` is large for a fixture (ComfyUI's SDXL detection wants 320 channels, the
real input-block transformer depths and 2048-wide context, and its text encoders are fixed
at CLIP-L and OpenCLIP-bigG size, about 0.8 B parameters): it is built straight in the
written dtype, one tensor at a time, so writing it in fp16 peaks near the fp16 size.
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
    "sdxl-tiny": "sdxl_tiny",
    "sdxl-hostable": "sdxl_hostable",
}
# Built on the meta device and filled in the written dtype (too big to build in fp32 first).
_LEAN = {"sdxl_hostable"}


def is_sdxl_config(config_name: str) -> bool:
    return (CONFIG_DIR / config_name / "text_encoder_2.json").is_file()


def build_modules(config_name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(unet, vae, text_encoder, configs) with seeded random weights; for an SDXL config
    ``text_encoder`` is the list [CLIP-L, OpenCLIP-G with projection]. ``dtype`` matters only
    for the lean (meta-built) configs; the others are built in fp32."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    parts = ("unet", "vae", "text_encoder", "scheduler")
    sdxl = is_sdxl_config(config_name)
    cfg = {p: read_config(config_name, p) for p in parts + (("text_encoder_2",) if sdxl else ())}
    lean = config_name in _LEAN
    with init_empty_weights(include_buffers=False) if lean else _nullcontext():
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])) if sdxl else None
    if lean:
        g = torch.Generator().manual_seed(seed)
        for m in (unet, vae, te, te2):
            if m is not None:
                _materialize(m, dtype, g)
    encoders = [te.eval(), te2.eval()] if sdxl else te.eval()
    return unet.eval(), vae.eval(), encoders, cfg


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _materialize(module: torch.nn.Module, dtype: torch.dtype, g: torch.Generator) -> None:
    """Give a meta-device module seeded random weights in ``dtype``, one tensor at a time:
    norms 1, biases 0, everything else N(0, 0.02) (CLIP's initialiser; the UNet's output
    stays finite and its scale does not matter for a random fixture)."""
    for name, p in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        parent = module.get_submodule(owner) if owner else module
        if leaf == "bias":
            t = torch.zeros(p.shape, dtype=dtype)
        elif p.ndim == 1:
            t = torch.ones(p.shape, dtype=dtype)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(dtype)
        setattr(parent, leaf, torch.nn.Parameter(t, requires_grad=False))


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
    unet, vae, te, cfg = build_modules(FIXTURES[name], seed,
                                       torch.float16 if dtype == "fp16" else torch.float32)
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
    loader read), with the shipped CLIP tokenizer; ``folder`` must not exist yet. ``te`` a
    list of two encoders writes an SDXL folder (``text_encoder_2``, ``tokenizer_2``)."""
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    encoders = te if isinstance(te, list) else [te]
    for i, (module, sub) in enumerate(zip(encoders, ("text_encoder", "text_encoder_2"))):
        module.save_pretrained(folder / sub)
        tok = folder / ("tokenizer" if i == 0 else "tokenizer_2")
        tok.mkdir(parents=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER_DIR / f, tok / f)
        tok_cfg = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
        if i == 1:
            tok_cfg["pad_token"] = "!"  # OpenCLIP's padding, as SDXL's tokenizer_2
        (tok / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(cfg["scheduler"], indent=2))
    if len(encoders) == 2:
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionXLPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"], "force_zeros_for_empty_prompt": True},
            indent=2))
        return folder
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    return folder


def write_single_file(path, unet, vae, te, cfg: dict, *, dtype: str = "fp32",
                      overwrite: bool = False, metadata: dict | None = None) -> None:
    """Write diffusers modules as one original-layout (LDM) SD1.x file, or SDXL's layout when
    ``te`` is a list of two encoders, with the config hints Tsuika's loader reads back;
    ``dtype`` "fp16" halves floating tensors."""
    from .formats.ldm_checkpoint import config_metadata_hints, diffusers_to_ldm
    from .formats.safetensors_io import save_safetensors
    from .formats.sdxl_checkpoint import diffusers_to_sdxl, sdxl_metadata_hints

    if isinstance(te, list):
        ldm = diffusers_to_sdxl(unet.state_dict(), vae.state_dict(), te[0].state_dict(),
                                te[1].state_dict(), unet_config=dict(unet.config),
                                vae_config=dict(vae.config))
        hints = sdxl_metadata_hints(cfg["unet"], cfg["vae"], cfg["text_encoder"],
                                    cfg["text_encoder_2"])
        architecture = "stable-diffusion-xl-v1-base"
    else:
        ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te.state_dict(),
                               unet_config=dict(unet.config), vae_config=dict(vae.config))
        hints = config_metadata_hints(unet_config=cfg["unet"], vae_config=cfg["vae"],
                                      text_encoder_config=cfg["text_encoder"])
        architecture = "stable-diffusion-v1"
    if dtype == "fp16":
        ldm = {k: v.half() if v.is_floating_point() else v for k, v in ldm.items()}
    hints.update({"modelspec.architecture": architecture,
                  "modelspec.prediction_type": cfg["scheduler"]["prediction_type"],
                  **(metadata or {})})
    save_safetensors(path, {k: v.contiguous() for k, v in ldm.items()}, hints,
                     overwrite=overwrite)


__all__ = ["FIXTURES", "CONFIG_DIR", "build_modules", "write_fixture", "write_single_file"]
