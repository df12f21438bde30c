"""SDXL: two text encoders (CLIP-L, OpenCLIP-G), pooled embedding and size / crop time ids.

Conditioning, as SDXL was trained and as diffusers' ``StableDiffusionXLPipeline.encode_prompt``
and ComfyUI compute it: each encoder's penultimate hidden states (no final layer norm),
concatenated along the feature axis (768 + 1280 = 2048 wide on the real model); the pooled
embedding is OpenCLIP-G's projected end-of-text output. The UNet also takes six time ids per
sample: original (height, width), crop (top, left) and target (height, width), from the
item's ``data.buckets.CropInfo`` (the loop passes them as ``cond["time_ids"]``); without them
(previews) the target size is used for all three, i.e. an uncropped image of that size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .base import CONFIG_DIR, FamilyFacts, ModelBundle, ModelLoadError
from .sd15 import _single_file_keys, _streamed, load_tokenizer, read_config

log = logging.getLogger(__name__)

TIME_IDS = "time_ids"  # the cond key of the per-sample (B, 6) size / crop ids


def load_tokenizers(folder: Path | None = None) -> list:
    """SDXL's two CLIP tokenizers. The second pads with ``!`` (id 0) as OpenCLIP's and
    diffusers' ``tokenizer_2`` do: the pooled output does not depend on it, the hidden states
    at padded positions do."""
    from transformers import CLIPTokenizer

    first = load_tokenizer(folder / "tokenizer" if folder else None)
    src = folder / "tokenizer_2" if folder is not None else None
    if src is None or not (src / "vocab.json").is_file():
        src = CONFIG_DIR / "clip_tokenizer"
    second = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=77,
                           pad_token="!")
    return [first, second]


def default_time_ids(height: int, width: int, batch: int, device=None) -> torch.Tensor:
    """Time ids of an uncropped ``height`` x ``width`` image, for ``batch`` samples."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return ids.expand(batch, 6)


class SdxlFamily:
    """SDXL base and its fine-tunes (Pony, Illustrious, NoobAI; v-prediction ones too)."""

    name = "sdxl"
    facts = FamilyFacts(display_name="SDXL", base_model_version="sdxl_base_v1-0", v2=False,
                        architecture="stable-diffusion-xl-v1-base", resolution=1024,
                        implementation="https://github.com/Stability-AI/generative-models",
                        host_models=("SDXL",),
                        text_encoders=("text_encoder_1", "text_encoder_2"),
                        embedding_keys=("clip_l", "clip_g"))

    # -- detection and loading ------------------------------------------------------------
    def detect(self, path: Path) -> bool:
        if path.is_dir():
            cfg = path / "unet" / "config.json"
            if not cfg.is_file():
                return False
            unet = json.loads(cfg.read_text())
            return unet.get("addition_embed_type") == "text_time" and \
                (path / "text_encoder_2").is_dir()
        if path.suffix.lower() != ".safetensors":
            return False
        from ..formats.sdxl_checkpoint import detect

        return detect(_single_file_keys(path))

    def load(self, path: Path, prediction_type: str = "auto",
             dtype: torch.dtype = torch.float32) -> ModelBundle:
        if path.is_dir():
            bundle = self._load_folder(path, dtype)
        else:
            from ..formats.safetensors_io import load_safetensors

            checkpoint, metadata = load_safetensors(path, dtype=lambda key: torch.float32 if
                                                    key.startswith("first_stage_model.") else dtype)
            bundle = self.bundle_from_ldm(checkpoint, metadata, source_name=path.name,
                                          dtype=dtype, consume=True)
        if prediction_type != "auto":
            bundle.prediction_type = prediction_type
        bundle.scheduler_config["prediction_type"] = bundle.prediction_type
        log.info("loaded %s (%s, %s)", path.name, self.name, bundle.prediction_type)
        return bundle

    def _load_folder(self, path: Path, dtype: torch.dtype) -> ModelBundle:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        kw = {"local_files_only": True}
        try:
            unet = _streamed(path / "unet", "diffusion_pytorch_model", dtype) or \
                UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype,
                                                     **kw)
            # fp32 always: SDXL's VAE overflows in fp16 (see encode_images in prepare.py).
            vae = _streamed(path / "vae", "diffusion_pytorch_model", torch.float32) or \
                AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32,
                                              **kw)
            te1 = _streamed(path / "text_encoder", "model", dtype) or \
                CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, **kw)
            te2 = _streamed(path / "text_encoder_2", "model", dtype) or \
                CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2",
                                                            torch_dtype=dtype, **kw)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"model.path = {str(path)!r}: the SDXL diffusers folder is "
                                 f"incomplete or unreadable ({e}).") from e
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched = json.loads(sched_file.read_text()) if sched_file.is_file() else read_config(
            "sdxl", "scheduler")
        sched = dict(read_config("sdxl", "scheduler"), **{
            k: v for k, v in sched.items() if k in ("beta_start", "beta_end", "beta_schedule",
                                                    "num_train_timesteps", "prediction_type",
                                                    "rescale_betas_zero_snr", "steps_offset",
                                                    "timestep_spacing")})
        for m in (unet, vae, te1, te2):
            m.requires_grad_(False).eval()
        return ModelBundle(
            family=self.name, unet=unet, vae=vae, text_encoders=[te1, te2],
            tokenizers=load_tokenizers(path), scheduler_config=sched,
            prediction_type=sched.get("prediction_type", "epsilon"), source_name=path.name)

    def bundle_from_ldm(self, checkpoint: dict, metadata: dict | None = None,
                        source_name: str = "checkpoint", prediction_type: str | None = None,
                        dtype: torch.dtype | None = torch.float32,
                        consume: bool = False) -> ModelBundle:
        """Build the modules from an SDXL original-layout state dict (a single file, or what
        ComfyUI holds: ``conditioner.embedders.0/1`` text encoders).

        Args:
            checkpoint: ``model.diffusion_model.*``, ``first_stage_model.*`` and
                ``conditioner.embedders.*`` tensors.
            metadata: the file's safetensors metadata (prediction type, ``tsuika.*`` hints).
            prediction_type: known prediction type; None reads it from the checkpoint.
            dtype: the UNet's and text encoders' dtype (the VAE is always fp32); None
                keeps each tensor's own (a host's tensors, shared: the run casts
                what its compute needs).
            consume: empty ``checkpoint`` once converted (a load peaks near one model copy).
        """
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from ..formats.ldm_unet_keys import LdmCheckpointError
        from ..formats.sdxl_checkpoint import sdxl_to_diffusers

        try:
            conv = sdxl_to_diffusers(checkpoint, metadata)
        except LdmCheckpointError as e:
            raise ModelLoadError(f"model {source_name!r}: {e}") from e
        if consume:
            checkpoint.clear()
        with init_empty_weights(include_buffers=False):
            unet = UNet2DConditionModel.from_config(conv.unet_config)
            vae = AutoencoderKL.from_config(conv.vae_config)
            te1 = CLIPTextModel(CLIPTextConfig(**conv.text_encoder_1_config))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**conv.text_encoder_2_config))
        for module, sd, what in ((unet, conv.unet, "UNet"), (vae, conv.vae, "VAE"),
                                 (te1, conv.text_encoder_1, "text encoder 1 (CLIP-L)"),
                                 (te2, conv.text_encoder_2, "text encoder 2 (OpenCLIP-G)")):
            missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ModelLoadError(
                    f"model {source_name!r}: the {what} weights do not match the inferred "
                    f"architecture (missing {missing[:5]}, unexpected {unexpected[:5]}).")
            target = torch.float32 if module is vae else dtype
            if target is not None:
                torch.nn.Module.to(module, target)
            sd.clear()
        pred = prediction_type or conv.info["prediction_type"]
        sched = read_config("sdxl", "scheduler")
        if conv.info["zero_terminal_snr"]:
            sched["rescale_betas_zero_snr"] = True
        for m in (unet, vae, te1, te2):
            m.requires_grad_(False).eval()
        return ModelBundle(
            family=self.name, unet=unet, vae=vae, text_encoders=[te1, te2],
            tokenizers=load_tokenizers(), scheduler_config=dict(sched, prediction_type=pred),
            prediction_type=pred, source_name=source_name, extra={"ldm_info": conv.info})

    def checkpoint_tensors(self, bundle: ModelBundle) -> dict[str, torch.Tensor]:
        """The bundle as one SDXL single-file state dict (the modules' own tensors)."""
        from ..formats.sdxl_checkpoint import diffusers_to_sdxl

        te1, te2 = bundle.text_encoders
        return diffusers_to_sdxl(bundle.unet.state_dict(), bundle.vae.state_dict(),
                                 te1.state_dict(), te2.state_dict(), dict(bundle.unet.config),
                                 dict(bundle.vae.config), prediction_type=bundle.prediction_type)

    def checkpoint_metadata(self, bundle: ModelBundle) -> dict[str, str]:
        """What the single file's metadata must say for our loader to rebuild the configs."""
        from ..formats.sdxl_checkpoint import sdxl_metadata_hints

        te1, te2 = bundle.text_encoders
        return sdxl_metadata_hints(dict(bundle.unet.config), dict(bundle.vae.config),
                                   te1.config, te2.config)

    # -- training-time behaviour ----------------------------------------------------------
    def encode_text(self, bundle: ModelBundle, captions: list[str],
                    device: torch.device) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tok, te in zip(bundle.tokenizers, bundle.text_encoders):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
            out = te(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "pooled": pooled}

    def predict(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor],
                unet: torch.nn.Module | None = None) -> torch.Tensor:
        unet = bundle.unet if unet is None else unet
        ids = cond.get(TIME_IDS)
        if ids is None:
            scale = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
            ids = default_time_ids(noisy.shape[2] * scale, noisy.shape[3] * scale,
                                   noisy.shape[0], noisy.device)
        hidden = cond["encoder_hidden_states"]
        added = {"text_embeds": cond["pooled"].to(hidden.dtype),
                 "time_ids": ids.to(noisy.device, hidden.dtype)}
        return unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added,
                    return_dict=False)[0]
