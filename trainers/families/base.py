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


class Family(Protocol):
    """The interface the loop and the methods use. See ``sd15.Sd15Family``."""

    name: str
    base_model_version: str  # kohya's ss_base_model_version

    def detect(self, path: Path) -> bool: ...

    def load(self, path: Path, prediction_type: str = "auto",
             dtype: torch.dtype = torch.float32) -> ModelBundle: ...

    def encode_text(self, bundle: ModelBundle, captions: list[str],
                    device: torch.device) -> dict[str, torch.Tensor]: ...

    def predict(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor: ...


def module_hash(module: torch.nn.Module) -> str:
    """A content hash of a module's weights (cache keys: a changed model never hits)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
