"""The inputs and shared outputs of the train nodes, each widget generated from its config
field (name, default, limits, choices, help text; ``nodes/options.py`` holds the naming rule).

Simple's inputs come in their released order (new ones appended); Advanced's are Simple's,
the spec's ``advanced_main`` widgets, the ``options`` input fed by the options nodes
(``nodes/train_options.py``), then what came later (prior preservation on a node released
without it).
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from .options import PREVIEW, PRIOR, widget_spec
from .train_node_prior import CLASS_INPUT, PRIOR_TIPS
from .train_node_spec import TrainNodeSpec
from .types import Dataset, Options

PREVIEW_TIPS = {
    "sample.prompts": "Prompts of the previews shown on this node while it trains (fixed "
                      "seed), one per line. Empty: the trigger word and the dataset's first "
                      "caption.",
    "sample.every": "Show a preview every N steps (and before and after training); 0 = no "
                    "previews, which trains fastest.",
}
RESUME_TIP = ("Continue the newest saved state of this training (after a cancel): turn on and "
              "queue again with the same settings. A damaged state is passed over for the "
              "newest sound one (and kept); the report says which.")


def widget(option: str, optional: bool = False, tooltip: str | None = None,
           default: Any = None):
    """The ComfyUI input of one config option (see ``options.widget_spec``); ``default``
    replaces the node default (a method's own, e.g. DreamBooth's smaller learning rate)."""
    spec = widget_spec(option)
    if default is not None:
        spec["default"] = "\n".join(default) if spec["kind"] == "list" else default
    tip = tooltip or spec["tooltip"]
    common = {"tooltip": tip, "optional": optional}
    if spec["choices"]:
        return io.Combo.Input(spec["id"], options=list(spec["choices"]), default=spec["default"],
                              **common)
    if spec["kind"] == "bool":
        return io.Boolean.Input(spec["id"], default=spec["default"], **common)
    if spec["kind"] == "int":
        return io.Int.Input(spec["id"], default=spec["default"], min=int(spec["min"]),
                            max=int(spec["max"]), step=spec["step"] or 1, **common)
    if spec["kind"] == "float":
        return io.Float.Input(spec["id"], default=spec["default"], min=float(spec["min"]),
                              max=float(spec["max"]), step=1e-6, round=False, **common)
    return io.String.Input(spec["id"], default=spec["default"],
                           multiline=spec["kind"] == "list", **common)


COMMON_INPUTS = [
    io.Model.Input("model", tooltip="The model to train on (from Load Checkpoint); it is "
                   "copied, never changed."),
    io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
    io.Vae.Input("vae", tooltip="The VAE of the same checkpoint (encodes the images once)."),
    Dataset.Input("dataset", tooltip="From Load Training Dataset or Dataset From Images."),
]
TAIL_OUTPUTS = [
    io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
    io.Image.Output(display_name="samples", tooltip="Samples of the sample prompts after "
                    "training (empty without prompts)."),
]


def main_inputs(spec: TrainNodeSpec) -> list:
    """Simple's inputs in their released order; new ones are appended (widget order)."""
    return (COMMON_INPUTS + [widget(o, tooltip=spec.tooltips.get(o) or PRIOR_TIPS.get(o),
                                    default=spec.defaults.get(o)) for o in spec.main]
            + [widget(o, optional=True, tooltip=PREVIEW_TIPS[o]) for o in PREVIEW]
            + [io.Boolean.Input("resume", default=False, optional=True, tooltip=RESUME_TIP)]
            + ([CLASS_INPUT] if spec.prior else []) + list(spec.extra_inputs))


def advanced_prior_inputs(spec: TrainNodeSpec) -> list:
    """The prior-preservation inputs ``advanced_prior`` appends to the Advanced node (after
    ``options``; optional, so a prompt saved before they existed still validates)."""
    if not spec.advanced_prior:
        return []
    return [widget(o, optional=True, tooltip=spec.tooltips.get(o) or PRIOR_TIPS[o])
            for o in PRIOR] + [CLASS_INPUT]


def advanced_inputs(spec: TrainNodeSpec) -> list:
    """The Advanced node's inputs: Simple's, its own widgets, ``options``, then the later ones."""
    return main_inputs(spec) + [widget(o, optional=True) for o in spec.advanced_main] + [
        Options.Input("options", optional=True,
                      tooltip="Chain options nodes (Tsuika/train/options) here; options not "
                              "set by any of them keep their defaults.")
    ] + advanced_prior_inputs(spec)
