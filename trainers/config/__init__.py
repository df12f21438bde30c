"""Training configuration: the single source of option names, defaults and help text.

Every option lives in one dataclass section (``model``, ``data``, ``network``, ``train``,
``output``, ``sample``) and is addressed as ``section.key`` everywhere: TOML files, the CLI's
``--set section.key=value``, node inputs and error messages. Each field carries its help text
and limits in ``field(metadata=...)`` so tooltips, CLI help and docs cannot drift apart.
Validation happens in ``__post_init__``: a bad value fails at once, naming the option, the
value and the fix.

One module per concern: ``fields`` (``opt``, the per-field check, ``ConfigError``), one module
per section (``model``, ``data``, ``network``, ``train``, ``output``, ``sample``), ``schema``
(the whole ``TsuikaConfig`` and the option lookups) and ``loader`` (TOML, overrides, type
conversion). Everything is imported from here, ``trainers.config``.
"""

from .data import DataConfig
from .fields import ConfigError, opt
from .loader import LIST_SEPARATORS, build_config, load_config, parse_list, replace
from .model import ModelConfig
from .network import HYPERNETWORK_ACTIVATIONS, NetworkConfig, auto_alpha, parse_layer_structure
from .output import MAX_NAME_BYTES, OutputConfig
from .sample import SampleConfig
from .schema import CONFIG_VERSION, SECTIONS, TsuikaConfig, option_help, option_names
from .train import MAX_SEED, TrainConfig

__all__ = [
    "CONFIG_VERSION", "HYPERNETWORK_ACTIVATIONS", "LIST_SEPARATORS", "MAX_NAME_BYTES",
    "MAX_SEED", "SECTIONS", "ConfigError", "DataConfig", "ModelConfig", "NetworkConfig",
    "OutputConfig", "SampleConfig", "TrainConfig", "TsuikaConfig", "auto_alpha",
    "build_config", "load_config", "opt", "option_help", "option_names",
    "parse_layer_structure", "parse_list", "replace",
]
