"""Which config option each train-node widget is, and under which name (pure: no ComfyUI).

Widget names (one option, one name, on every node):

- a widget is named after its config key: ``network.rank`` -> ``rank``, ``train.steps`` ->
  ``steps`` (the same name on the Simple node, the Advanced node and the options nodes);
- keys of the ``sample`` section get a ``sample_`` prefix (``sample.steps`` ->
  ``sample_steps``): on a training node a bare ``steps`` means training steps;
- two released names stay as they are (``RENAMED``): ``train.seed`` is ``training_seed``,
  because ComfyUI's frontend gives every input named ``seed`` a "randomize after each queue"
  control and a training seed that changes retrains on every queue; ``sample.prompts`` is
  ``sample_prompt`` (the Simple node's name since its first release).

Widgets are generated from the config fields (defaults, limits, choices, help text), in the
order of the fields, so a field added at the end of its section adds a widget at the end of
its options node and saved workflows keep their widget order.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..trainers.config import (
    SECTIONS,
    ConfigError,
    TsuikaConfig,
    build_config,
    option_help,
)
from . import paths
from .paths import PathRefused
from .validation import (
    InputRefused,
    check_choice,
    check_number,
    check_plain_name,
    widget_message,
)

RENAMED = {"train.seed": "training_seed", "sample.prompts": "sample_prompt"}

# Options a node does not expose: the host decides them (paths, device, the loaded MODEL's
# prediction type), or another node owns them (the dataset node's caption_extension).
HOST_OWNED = {"model.path", "model.family", "model.prediction_type", "data.dir",
              "data.cache_dir", "data.caption_extension", "output.dir", "train.device",
              "train.resume", "output.overwrite", "output.keep_last", "data.class_dir"}
# Machine tuning, not a training choice: the nodes keep the default.
ENGINE_ONLY = {"train.cpu_prepack_pixels"}
# Not on the nodes: full fine-tuning's engine options (their 'auto' fits), and the method
# (each train node trains its own: nodes/train_node.py).
NOT_ON_NODES_YET = {"train.trained_weights", "train.optimizer_in_backward", "network.method"}
HIDDEN = HOST_OWNED | ENGINE_ONLY | NOT_ON_NODES_YET

# The Simple node's inputs, in their released order; the Advanced node keeps them first.
MAIN = ["train.steps", "train.learning_rate", "network.rank", "data.trigger_word",
        "train.seed", "data.resolution"]
# Node-only behaviour on top of the option (so their tooltips are the node's own).
PREVIEW = ["sample.prompts", "sample.every"]
# On the Advanced node itself, after Simple's inputs: ComfyUI passes an options node's
# values only at run time, so an option checked against a main input (warm-up < steps) sits
# beside it to be refused when the prompt is queued.
ADVANCED_MAIN = ["train.lr_warmup_steps"]
# Prior preservation, on the train nodes that offer it (a class_dataset input beside them;
# data.class_dir is the host's): widgets of those nodes only, never on an options node.
PRIOR = ["data.class_prompt", "data.class_images", "train.prior_loss_weight"]
# Textual inversion's own options: widgets of the Train Embedding nodes only, never on the
# options nodes the LoRA and checkpoint nodes share (they mean nothing there).
TEXTUAL_INVERSION = ["network.token", "network.init_word", "network.vectors_per_token",
                     "network.templates"]
# Node defaults that differ from the CLI's: a first training in a graph should be short.
NODE_DEFAULTS = {"train.steps": 500, "sample.every": 100}
# Widget step sizes (the frontend's increment), where 1 would be an unhelpful drag.
UI_STEP = {"data.resolution": 64}

# The options nodes: node id, display name, the config section it shows.
OPTION_NODES = [
    ("TsuikaDataOptions", "Data Options (Tsuika)", "data"),
    ("TsuikaNetworkOptions", "Network Options (Tsuika)", "network"),
    ("TsuikaTrainingOptions", "Optimizer & Schedule Options (Tsuika)", "train"),
    ("TsuikaSavingOptions", "Saving Options (Tsuika)", "output"),
    ("TsuikaSamplingOptions", "Sampling Options (Tsuika)", "sample"),
]
OPTION_NAMES = re.compile(r"\b(?:" + "|".join(SECTIONS) + r")\.[a-z_0-9]+\b")


# Options naming a model file: a combo of the files of that ComfyUI models folder (never a
# typed path), NO_FILE standing for the option's empty value.
MODEL_FILES = {"network.init_lora": "loras"}
NO_FILE = "none"

INT_MAX = 2**31 - 1
# Options whose value becomes a file or folder name.
NAME_OPTIONS = {"output.name"}


def widget_name(option: str) -> str:
    """The widget name of ``section.key`` (see the module docstring for the rule)."""
    if option in RENAMED:
        return RENAMED[option]
    section, key = option.split(".", 1)
    return f"sample_{key}" if section == "sample" else key


def _field(option: str) -> dataclasses.Field:
    section, key = option.split(".", 1)
    return next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == key)


def _kind(f: dataclasses.Field) -> type:
    if isinstance(f.type, type):
        return f.type
    return {"bool": bool, "int": int, "float": float, "str": str, "list": list}[f.type]


def widget_spec(option: str) -> dict[str, Any]:
    """How the widget of ``option`` looks: id, kind, default, limits, choices, tooltip."""
    f = _field(option)
    meta = f.metadata
    default = NODE_DEFAULTS.get(option, f.default if f.default is not dataclasses.MISSING
                                else f.default_factory())
    spec = {"id": widget_name(option), "option": option, "kind": _kind(f).__name__,
            "default": default, "tooltip": option_help(option), "min": meta.get("min"),
            "max": meta.get("max"), "choices": meta.get("choices"),
            "step": UI_STEP.get(option)}
    if option in MODEL_FILES:
        spec["choices"] = [NO_FILE, *paths.model_files(MODEL_FILES[option])]
        spec["default"] = NO_FILE
    if spec["kind"] == "list":
        spec["default"] = "\n".join(default)
        spec["tooltip"] += " One per line."
    if spec["kind"] in ("int", "float"):  # the frontend needs finite limits
        spec["min"] = 0 if spec["min"] is None else spec["min"]
        spec["max"] = (INT_MAX if spec["kind"] == "int" else 1e9) if spec["max"] is None \
            else spec["max"]
    return spec


def section_options(section: str) -> list[str]:
    """The options an options node shows: its section's fields, in field order, less the
    hidden ones and those the train nodes show themselves."""
    shown = (set(MAIN) | set(PREVIEW) | set(ADVANCED_MAIN) | set(PRIOR)
             | set(TEXTUAL_INVERSION) | HIDDEN)
    return [f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section])
            if f"{section}.{f.name}" not in shown]


def option_node_of(option: str) -> str | None:
    """The display name of the options node that shows ``option`` (None: a train node)."""
    section = option.split(".", 1)[0]
    for _, display, sec in OPTION_NODES:
        if sec == section and option in section_options(sec):
            return display
    return None


def widget_names() -> dict[str, str]:
    """``{"section.key": widget name}`` for every option a node shows."""
    options = MAIN + PREVIEW + ADVANCED_MAIN + PRIOR + TEXTUAL_INVERSION + [
        o for _, _, section in OPTION_NODES for o in section_options(section)]
    return {o: widget_name(o) for o in options}


def mentioned(message: str) -> set[str]:
    """The ``section.key`` option names a config message mentions."""
    return set(OPTION_NAMES.findall(message))


def nest(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train.steps": 5}`` -> ``{"train": {"steps": 5}}`` (what ``build_config`` takes)."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, key = name.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


def check_widgets(options: list[str], values: dict[str, Any]) -> None:
    """What ComfyUI checks for each widget (limits, choices), plus NaN and plain names: a
    node that validates its inputs itself gets none of ComfyUI's checks."""
    for option in options:
        spec = widget_spec(option)
        value = values.get(spec["id"])
        if value is None:  # left out of the prompt (options nodes): the config's default, so
            continue       # a field added later breaks no saved or API-built workflow
        if spec["choices"]:
            check_choice(spec["id"], value, spec["choices"])
        elif spec["kind"] in ("int", "float"):
            check_number(spec["id"], value, spec["min"], spec["max"])
        elif option in NAME_OPTIONS:
            check_plain_name(spec["id"], value)


def node_words(message: str, where: bool = False) -> str:
    """A config message with widget names instead of option names (and, with ``where``,
    the options node each widget is on)."""
    labels = {}
    for option, name in widget_names().items():
        node = option_node_of(option) if where else None
        labels[option] = f"{name} (on {node})" if node else name
    return widget_message(message, labels)


def model_file_paths(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each model-file choice as the config takes it: its full path inside
    ComfyUI's models folder, or empty for ``NO_FILE``."""
    out = dict(values)
    for option, folder in MODEL_FILES.items():
        name = out.get(option)
        if name is not None:
            out[option] = "" if name in (NO_FILE, "") else str(
                paths.model_file(widget_name(option), folder, name))
    return out


def build_checked(values: dict[str, Any], known: set[str] | None = None) -> TsuikaConfig | None:
    """The typed config of ``{"section.key": value}``, or a refusal in the node's words.

    Args:
        values: the options' typed values (widgets as given, no string round trip).
        known: at ``/prompt``, the options whose values are known (a linked widget or a
            connected options node is not); a rule broken only by unknown values is left to
            the run. None (at run time): every problem is refused.

    Raises:
        InputRefused: a value, or a rule between values, is wrong.
    """
    try:
        return build_config(values=nest(model_file_paths(values)))
    except PathRefused as e:
        raise InputRefused(node_words(str(e))) from None
    except ConfigError as e:
        if known is None or mentioned(str(e)) <= known:
            raise InputRefused(node_words(str(e), where=known is None)) from e
        return None
