"""Writing the reference model: a diffusers folder and an original-layout single file, in fp16."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .sampling import MAX_TOKENS

log = logging.getLogger(__name__)

MODEL_NAME = "tsuika_reference"

@torch.no_grad()
def round_to_fp16(*modules) -> None:
    """Round every floating weight to fp16 precision (kept as fp32), so that the model that is
    evaluated is exactly the one the fp16 files hold."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def _write_diffusers_folder(folder: Path, unet, vae, text_encoder, scheduler_config: dict
                            ) -> None:
    """A ``StableDiffusionPipeline`` folder, written to a temporary sibling and renamed.

    UNet and VAE are stored as fp16 (diffusers loads them as fp32); the text encoder stays
    fp32 because transformers 5 loads weights in their stored dtype, and a fp16 encoder next
    to a fp32 UNet would break every loader that does not pass a dtype.
    """
    from ..trainers.families.sd15 import TOKENIZER_DIR

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    unet.to("cpu", torch.float16).save_pretrained(tmp / "unet")
    vae.to("cpu", torch.float16).save_pretrained(tmp / "vae")
    unet.float(), vae.float()
    text_encoder.to("cpu").save_pretrained(tmp / "text_encoder")
    (tmp / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, tmp / "tokenizer" / name)
    (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer"}, indent=2))
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config,
                                                                        indent=2))
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_config["_class_name"]],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def save_model(out_dir: str | Path, unet, vae, text_encoder, configs: dict[str, dict], *,
               training_info: dict | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write ``<out>/diffusers/`` and ``<out>/tsuika_reference.safetensors`` (fp16, LDM layout,
    with the ``tsuika.*`` hints that let the single-file loader rebuild the configs).

    Args:
        out_dir: destination folder (created).
        unet, vae, text_encoder: the trained modules (moved to the CPU).
        configs: as ``load_configs`` returns (the scheduler config is written as is).
        training_info: small JSON-able facts (seed, command) stored in the file's metadata.
        overwrite: replace existing outputs.
    """
    from ..trainers.formats.ldm_checkpoint import config_metadata_hints, diffusers_to_ldm
    from ..trainers.formats.safetensors_io import save_safetensors

    out = Path(out_dir)
    paths = {"diffusers": out / "diffusers", "single_file": out / f"{MODEL_NAME}.safetensors"}
    check_outputs(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for m in (unet, vae, text_encoder):
        m.to("cpu")
    _write_diffusers_folder(paths["diffusers"], unet, vae, text_encoder, configs["scheduler"])
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(),
                           unet_config=dict(unet.config), vae_config=dict(vae.config),
                           prediction_type=configs["scheduler"]["prediction_type"])
    ldm = {k: v.half() if v.is_floating_point() else v for k, v in ldm.items()}
    metadata = config_metadata_hints(dict(unet.config), dict(vae.config),
                                     configs["text_encoder"])
    metadata.update({"modelspec.architecture": "stable-diffusion-v1",
                     "modelspec.prediction_type": configs["scheduler"]["prediction_type"],
                     "modelspec.title": "Tsuika reference model",
                     "modelspec.resolution": "64x64",
                     "tsuika.reference_model": json.dumps(training_info or {})})
    save_safetensors(paths["single_file"], ldm, metadata, overwrite=overwrite)
    log.info("saved %s and %s", paths["diffusers"], paths["single_file"])
    return paths


def check_outputs(out_dir: str | Path, overwrite: bool) -> None:
    """Fail before training when outputs exist and ``overwrite`` is off."""
    out = Path(out_dir)
    for p in (out / "diffusers", out / f"{MODEL_NAME}.safetensors", out / "training_report.json"):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists; choose another --out or pass "
                                  "--overwrite.")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
