"""The whole configuration (``TsuikaConfig``, one field per section) and the lookups of its
options by ``section.key`` that the CLI's help, node tooltips and the loader read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..registry import Choices
from .data import DataConfig
from .fields import ConfigError
from .model import ModelConfig
from .network import NetworkConfig
from .output import OutputConfig
from .sample import SampleConfig
from .train import TrainConfig

CONFIG_VERSION = 1


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "network": NetworkConfig,
    "train": TrainConfig, "output": OutputConfig, "sample": SampleConfig,
}


@dataclass
class TsuikaConfig:
    """The whole training configuration (one section per concern)."""

    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def require_inputs(self) -> None:
        """Check the options a training run cannot start without."""
        if not self.model.path:
            raise ConfigError("model.path is empty; set it to a diffusers folder or a "
                              ".safetensors checkpoint (--set model.path=...).")
        if not self.data.dir:
            raise ConfigError("data.dir is empty; set it to a folder of images "
                              "(--set data.dir=...).")


def option_names() -> list[str]:
    """Every valid ``section.key``."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def option_help(name: str) -> str:
    """The help text of ``section.key`` (node tooltips and CLI help read this)."""
    section, key = name.split(".", 1)
    meta = _field(section, key).metadata
    choices = meta.get("choices")
    # A registry's choices describe themselves, so a new entry needs no edit here.
    described = choices.describe() if isinstance(choices, Choices) else ""
    return f"{meta['help']} {described}" if described else meta["help"]


def _field(section: str, key: str) -> dataclasses.Field:
    cls = SECTIONS.get(section)
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    if key not in fields:
        raise ConfigError(f"unknown option {section}.{key!s}; valid options are: "
                          f"{', '.join(option_names())}.")
    return fields[key]
