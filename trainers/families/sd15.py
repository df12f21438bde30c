"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, UNet conditioned on its hidden states."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .base import CONFIG_DIR, FamilyFacts, ModelBundle, ModelLoadError

log = logging.getLogger(__name__)

TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"


def load_tokenizer(folder: Path | None = None):
    """A CLIP tokenizer from ``folder`` (a diffusers ``tokenizer/``), else the shipped one."""
    from transformers import CLIPTokenizer

    src = folder if folder is not None and (folder / "vocab.json").is_file() else TOKENIZER_DIR
    return CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=77)


def read_config(name: str, part: str) -> dict:
    """A shipped diffusers/transformers config, e.g. ``read_config("sd15", "unet")``."""
    return json.loads((CONFIG_DIR / name / f"{part}.json").read_text())


def _streamed(folder: Path, weights_name: str, dtype: torch.dtype):
    """A diffusers/transformers component folder loaded by reading its safetensors file (or
    the shards its index names, as ``save_pretrained`` writes files over 10 GB such as an
    fp32 SDXL UNet) straight into ``dtype`` (see ``load_safetensors``), or None when the
    folder is laid out otherwise (.bin, renamed keys): then ``from_pretrained`` loads it,
    mapping every file whole (an fp32 SDXL UNet loaded into bf16 that way peaked at its 10 GB
    of mapped pages plus the 5 GB result)."""
    from accelerate import init_empty_weights

    from ..formats.safetensors_io import load_safetensors

    config_file = folder / "config.json"
    files = _weight_files(folder, weights_name)
    if not (files and config_file.is_file()):
        return None
    config = json.loads(config_file.read_text())
    with init_empty_weights(include_buffers=False):
        if folder.name in ("text_encoder", "text_encoder_2"):
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in \
                config.get("architectures", []) else CLIPTextModel
            module = cls(CLIPTextConfig.from_dict(config))
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel

            cls = UNet2DConditionModel if folder.name == "unet" else AutoencoderKL
            module = cls.from_config(config)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_safetensors(file, dtype=dtype)[0])
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        return None  # an older layout: from_pretrained knows how to rename it
    torch.nn.Module.to(module, dtype)  # anything not in the file (buffers) follows
    return module.requires_grad_(False).eval()


def _weight_files(folder: Path, weights_name: str) -> list[Path]:
    """The component's safetensors file, or its shards in the order its index names them;
    [] when there is neither."""
    single = folder / f"{weights_name}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{weights_name}.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return []  # from_pretrained reports what is wrong with it
    files = [folder / name for name in shards]
    return files if all(f.is_file() and f.parent == folder for f in files) else []


def _single_file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises several types for a non-safetensors file
        raise ModelLoadError(f"model.path = {str(path)!r} is not a readable .safetensors file "
                             f"({e}). Tsuika never unpickles .ckpt files: convert it to "
                             "safetensors first.") from e


class Sd15Family:
    """SD1.x (and SD2.x v-prediction) in the diffusers folder or original single-file layout."""

    name = "sd15"
    facts = FamilyFacts(display_name="SD1.x", base_model_version="sd_v1", v2=False,
                        architecture="stable-diffusion-v1", resolution=512,
                        host_models=("SD15",))

    # -- detection and loading ------------------------------------------------------------
    def detect(self, path: Path) -> bool:
        if path.is_dir():
            cfg = path / "unet" / "config.json"
            if not cfg.is_file():
                return False
            unet = json.loads(cfg.read_text())
            return not unet.get("addition_embed_type") and (path / "text_encoder").is_dir() \
                and not (path / "text_encoder_2").is_dir()
        if path.suffix.lower() != ".safetensors":
            return False
        keys = _single_file_keys(path)
        return any(k.startswith("model.diffusion_model.") for k in keys) and not any(
            k.startswith("conditioner.") for k in keys)

    def load(self, path: Path, prediction_type: str = "auto",
             dtype: torch.dtype = torch.float32) -> ModelBundle:
        if path.is_dir():
            bundle = self._load_folder(path, dtype)
        else:
            bundle = self._load_single_file(path, dtype)
        if prediction_type != "auto":
            bundle.prediction_type = prediction_type
        bundle.scheduler_config["prediction_type"] = bundle.prediction_type
        for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
            m.requires_grad_(False).eval()
        log.info("loaded %s (%s, %s)", path.name, self.name, bundle.prediction_type)
        return bundle

    def _load_folder(self, path: Path, dtype: torch.dtype = torch.float32) -> ModelBundle:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        kw = {"local_files_only": True}
        try:
            unet = _streamed(path / "unet", "diffusion_pytorch_model", dtype) or \
                UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype,
                                                     **kw)
            vae = _streamed(path / "vae", "diffusion_pytorch_model", torch.float32) or \
                AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32,
                                              **kw)
            te = _streamed(path / "text_encoder", "model", dtype) or \
                CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, **kw)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"model.path = {str(path)!r}: the diffusers folder is "
                                 f"incomplete or unreadable ({e}).") from e
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched = json.loads(sched_file.read_text()) if sched_file.is_file() else read_config(
            "sd15", "scheduler")
        return ModelBundle(
            family=self.name, unet=unet, vae=vae, text_encoders=[te],
            tokenizers=[load_tokenizer(path / "tokenizer")], scheduler_config=sched,
            prediction_type=sched.get("prediction_type", "epsilon"), source_name=path.name)

    def _load_single_file(self, path: Path, dtype: torch.dtype = torch.float32) -> ModelBundle:
        from ..formats.safetensors_io import load_safetensors

        def stored_as(key: str) -> torch.dtype:  # the VAE stays fp32, as everywhere
            return torch.float32 if key.startswith("first_stage_model.") else dtype

        checkpoint, metadata = load_safetensors(path, dtype=stored_as)
        return self.bundle_from_ldm(checkpoint, metadata, source_name=path.name, dtype=dtype,
                                    consume=True)

    def bundle_from_ldm(self, checkpoint: dict, metadata: dict | None = None,
                        source_name: str = "checkpoint",
                        prediction_type: str | None = None,
                        dtype: torch.dtype | None = torch.float32,
                        consume: bool = False) -> ModelBundle:
        """Build the modules from an original-layout state dict (a single file's contents,
        or what a host like ComfyUI holds in memory).

        Args:
            checkpoint: ``model.diffusion_model.*``, ``first_stage_model.*``,
                ``cond_stage_model.*`` tensors.
            metadata: the file's safetensors metadata (architecture hints).
            prediction_type: known prediction type; None reads it from the checkpoint.
            dtype: the UNet's and text encoder's dtype (the VAE is always fp32); None
                keeps each tensor's own (a host's tensors, shared: the run casts
                what its compute needs).
            consume: empty ``checkpoint`` as its tensors are converted, so that each
                module's original tensors are freed once it holds its own (a load then
                peaks near the file's size plus one module, not twice the model).
        """
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from ..formats.ldm_checkpoint import ldm_to_diffusers

        conv = ldm_to_diffusers(checkpoint, metadata=metadata)
        if consume:
            checkpoint.clear()
        # Parameters start on the meta device and take the checkpoint's tensors themselves
        # (assign=True): no random initialisation to throw away, and no second full copy of
        # the weights in memory (an fp32 SD1.5 file peaked at twice its size before).
        with init_empty_weights(include_buffers=False):
            unet = UNet2DConditionModel.from_config(conv.unet_config)
            vae = AutoencoderKL.from_config(conv.vae_config)
            te = CLIPTextModel(CLIPTextConfig(**conv.text_encoder_config))
        for module, sd, what in ((unet, conv.unet, "UNet"), (vae, conv.vae, "VAE"),
                                 (te, conv.text_encoder, "text encoder")):
            missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ModelLoadError(
                    f"model {source_name!r}: the {what} weights do not match the inferred "
                    f"architecture (missing {missing[:5]}, unexpected {unexpected[:5]}).")
            # A file's tensors already in the target dtype are kept, not copied; torch's own
            # .to(): diffusers' override warns about fp32-kept modules.
            target = torch.float32 if module is vae else dtype
            if target is not None:
                torch.nn.Module.to(module, target)
            sd.clear()  # the module holds what it needs; drop the originals now
        pred = prediction_type or conv.info.get("prediction_type", "epsilon")
        sched = read_config("sd15", "scheduler")
        for m in (unet, vae, te):
            m.requires_grad_(False).eval()
        return ModelBundle(
            family=self.name, unet=unet, vae=vae, text_encoders=[te],
            tokenizers=[load_tokenizer()], scheduler_config=dict(sched, prediction_type=pred),
            prediction_type=pred, source_name=source_name, extra={"ldm_info": conv.info})

    def checkpoint_tensors(self, bundle: ModelBundle) -> dict[str, torch.Tensor]:
        """The bundle as one original-layout SD1.x state dict (the modules' own tensors)."""
        from ..formats.ldm_checkpoint import diffusers_to_ldm

        return diffusers_to_ldm(bundle.unet.state_dict(), bundle.vae.state_dict(),
                                bundle.text_encoders[0].state_dict(),
                                unet_config=dict(bundle.unet.config),
                                vae_config=dict(bundle.vae.config),
                                prediction_type=bundle.prediction_type)

    def checkpoint_metadata(self, bundle: ModelBundle) -> dict[str, str]:
        """The ``tsuika.*`` hints our loader reads where shapes cannot tell."""
        from ..formats.ldm_checkpoint import config_metadata_hints

        return config_metadata_hints(dict(bundle.unet.config), dict(bundle.vae.config),
                                     bundle.text_encoders[0].config)

    # -- training-time behaviour ----------------------------------------------------------
    def encode_text(self, bundle: ModelBundle, captions: list[str],
                    device: torch.device) -> dict[str, torch.Tensor]:
        tok = bundle.tokenizers[0]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(device)
        hidden = bundle.text_encoders[0](ids)[0]
        return {"encoder_hidden_states": hidden}

    def predict(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor],
                unet: torch.nn.Module | None = None) -> torch.Tensor:
        unet = bundle.unet if unet is None else unet
        return unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                    return_dict=False)[0]
