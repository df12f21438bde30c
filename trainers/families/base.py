"""What every model family provides, and the bundle of modules it loads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


class ModelLoadError(ValueError):
    """A model could not be loaded: wrong path, layout or family."""


@dataclass
class ModelBundle:
    """The modules of one loaded model, in diffusers / transformers form.

    ``components`` maps the LoRA component names of the family ("unet", "text_encoder", ...)
    to their modules, so methods can target them without knowing the family.
    """

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler_config: dict
    prediction_type: str
    source_name: str
    extra: dict = field(default_factory=dict)

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        names = ["text_encoder"] if len(self.text_encoders) == 1 else [
            f"text_encoder_{i + 1}" for i in range(len(self.text_encoders))]
        return {"unet": self.unet, **dict(zip(names, self.text_encoders))}


@dataclass(frozen=True)
class FamilyFacts:
    """Everything outside the family's own module needs to know of it, in one row.

    The metadata writer, the host bridge (nodes/_host.py) and messages read these instead of
    naming a family, so a new family brings its facts with it.

    Attributes:
        display_name: how messages name the models (``"SD1.x"``).
        base_model_version: kohya's ``ss_base_model_version`` (``"sd_v1"``).
        v2: kohya's ``ss_v2`` (True for SD2-based families).
        architecture: the ModelSpec architecture of the base model
            (``"stable-diffusion-v1"``); a LoRA file adds ``/lora``.
        resolution: the family's native image side, used where a run names none.
        implementation: ModelSpec ``implementation`` (kohya writes ``"diffusers"`` for
            SD1/SD2 and the sgm repository for SDXL).
        host_models: the ComfyUI model-config class names (``type(model.model.model_config)``)
            whose weights this family's ``bundle_from_ldm`` reads.
        text_encoders: the bundle's text-encoder component names; their kohya prefixes are
            in ``formats.lora_keys.COMPONENTS``.
        embedding_keys: with several text encoders, each one's key in an embedding file
            (ComfyUI's and A1111's ``clip_l`` / ``clip_g``), in ``text_encoders`` order; empty:
            named by width (a single encoder writes ``emb_params``).
    """

    display_name: str
    base_model_version: str
    v2: bool
    architecture: str
    resolution: int
    implementation: str = "diffusers"
    host_models: tuple[str, ...] = ()
    text_encoders: tuple[str, ...] = ("text_encoder",)
    embedding_keys: tuple[str, ...] = ()


class Family(Protocol):
    """The interface the loop, the methods and the host bridge use. See ``sd15.Sd15Family``."""

    name: str
    facts: FamilyFacts

    def detect(self, path: Path) -> bool: ...

    def load(self, path: Path, prediction_type: str = "auto",
             dtype: torch.dtype = torch.float32) -> ModelBundle: ...

    def bundle_from_ldm(self, checkpoint: dict, metadata: dict | None = None,
                        source_name: str = "checkpoint", prediction_type: str | None = None,
                        dtype: torch.dtype = torch.float32,
                        consume: bool = False) -> ModelBundle:
        """The bundle built from an original-layout state dict: a single file's tensors, or
        the weights a host such as ComfyUI holds in memory (with the prediction type the
        host knows; None reads it from the weights)."""
        ...

    def encode_text(self, bundle: ModelBundle, captions: list[str],
                    device: torch.device) -> dict[str, torch.Tensor]: ...

    def predict(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor],
                unet: torch.nn.Module | None = None) -> torch.Tensor:
        """The UNet's prediction for ``noisy`` at ``timesteps`` given ``encode_text``'s
        conditioning. ``unet`` is the module to call in place of ``bundle.unet`` (under
        data-parallel training, the DistributedDataParallel wrapper of it)."""
        ...


def module_hash(module: torch.nn.Module) -> str:
    """A content hash of a module's weights (cache keys: a changed model never hits)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
