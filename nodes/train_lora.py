"""Train LoRA nodes (Simple and Advanced): train on the user's loaded model, return it patched.

Every widget is generated from its config field (name, default, limits, choices, help text;
``nodes/options.py`` holds the naming rule). Values go to ``build_config(values=...)`` as the
typed values the widgets hold. Advanced is Simple's inputs plus one ``options`` input fed by
the options nodes (``nodes/train_options.py``), so it stays as short as Simple.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from comfy_api.latest import io

from ..trainers.callbacks import TrainingStopped
from . import _host
from .options import (
    ADVANCED_MAIN,
    HIDDEN,
    MAIN,
    OPTION_NODES,
    PREVIEW,
    build_checked,
    check_widgets,
    section_options,
    widget_name,
    widget_spec,
)
from .reports import stopped_report, train_report, ui_report
from .types import Dataset, Options
from .validation import InputRefused

log = logging.getLogger(__name__)

PREVIEW_TIPS = {
    "sample.prompts": "Prompts of the previews shown on this node while it trains (fixed "
                      "seed), one per line. Empty: the trigger word and the dataset's first "
                      "caption.",
    "sample.every": "Show a preview every N steps (and before and after training); 0 = no "
                    "previews, which trains fastest.",
}
RESUME_TIP = ("Continue the newest saved state of this training (after a cancel): turn on and "
              "queue again with the same settings.")


def widget(option: str, optional: bool = False, tooltip: str | None = None):
    """The ComfyUI input of one config option (see ``options.widget_spec``)."""
    spec = widget_spec(option)
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


def main_inputs() -> list:
    """Simple's inputs in their released order; new ones are appended (widget order)."""
    return (COMMON_INPUTS + [widget(o) for o in MAIN]
            + [widget(o, optional=True, tooltip=PREVIEW_TIPS[o]) for o in PREVIEW]
            + [io.Boolean.Input("resume", default=False, optional=True, tooltip=RESUME_TIP)])


COMMON_OUTPUTS = [
    io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
    io.Clip.Output(display_name="clip", tooltip="The CLIP with the trained LoRA applied."),
    io.LoraModel.Output(display_name="lora", tooltip="The trained LoRA (kohya names); "
                        "connect to Save LoRA."),
    io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
    io.Image.Output(display_name="samples", tooltip="Samples of the sample prompts after "
                    "training (empty without prompts)."),
]


ON_NODE = MAIN + PREVIEW + ADVANCED_MAIN  # every option a train node may show itself


def node_values(kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"section.key": value}`` from the node's widgets (typed, as ComfyUI gives them) and
    an options node's values; values not given (or linked, at /prompt) are left out."""
    values = {o: kwargs[widget_name(o)] for o in ON_NODE
              if kwargs.get(widget_name(o)) is not None}
    values.update(extra or {})
    return values


def check_queued(kwargs: dict[str, Any]) -> None:
    """Everything the train node can check when the prompt is queued, in widget names.

    An options node's values are not known yet when it is connected (ComfyUI passes linked
    values only at run time): rules between them and this node's widgets are checked when
    the node starts, before any work.
    """
    check_widgets([o for o in ON_NODE if widget_name(o) in kwargs], kwargs)
    values = node_values(kwargs)
    # Known: the values given, and the defaults of options nobody can set here.
    known = set(values) | HIDDEN | {o for o in ADVANCED_MAIN if widget_name(o) not in kwargs}
    if "options" not in kwargs:  # no options node connected: those are defaults too
        known |= {o for _, _, s in OPTION_NODES for o in section_options(s)}
    if values.get("sample.every") == 0:
        values.pop("sample.prompts", None)
    config = build_checked(values, known)
    if kwargs.get("resume") and config is not None and "options" not in kwargs:
        try:  # the name is known (the default): is there anything to resume?
            _host.latest_state(config.output.name)
        except ValueError as e:
            raise InputRefused(str(e)) from None


def preview_prompts(typed: str | None, trigger_word: str, dataset) -> str:
    """The node's preview prompts: as typed, else the dataset's first caption as training
    sees it (trigger word first)."""
    import random

    from ..trainers.data.captions import CaptionAugment

    if typed and typed.strip():
        return typed
    first = next((item.caption for item in dataset.items if item.caption), "")
    return CaptionAugment(trigger_word=trigger_word).apply(first, random.Random(0))


def run_training(node_id, model, clip, vae, dataset, kwargs: dict[str, Any],
                 options: dict[str, Any] | None = None) -> io.NodeOutput:
    """Shared body of both train nodes."""
    from ..trainers.formats.safetensors_io import load_safetensors
    from ..trainers.loop import train

    check_widgets([o for o in ON_NODE if widget_name(o) in kwargs], kwargs)  # linked values
    values = node_values(kwargs, options)
    every = values.get("sample.every", 0)
    prompts = preview_prompts(values.get("sample.prompts"), values.get("data.trigger_word", ""),
                              dataset) if every else ""
    values["sample.prompts"] = prompts
    values.setdefault("sample.seed", values.get("train.seed", 0))  # previews follow the seed
    config = build_checked(values)  # the whole config, before any work; widget names
    name = config.output.name
    config.data.dir = str(dataset.root)
    config.output.dir = str(_host.run_dir(name))
    config.data.cache_dir = str(_host.cache_dir())
    if kwargs.get("resume"):
        config.train.resume = _host.latest_state(name)
    _host.comfy_family(model)  # refuse an unsupported family before any work
    progress = _host.ComfyProgress(node_id, config.train.steps)
    with _host.leave_host_as_found():  # a failed or cancelled run leaves nothing alive
        try:
            # ComfyUI runs nodes under inference_mode; training needs autograd back.
            with torch.inference_mode(False), torch.enable_grad():
                result = train(config, progress, scan=dataset,
                               bundle=_host.bundle_from_comfy(model, clip, vae))
        except TrainingStopped as e:
            stopped(node_id, e, config.train.steps, name, options is not None)
    tensors, metadata = load_safetensors(result.file_path)
    lora = _host.LoraDict(tensors, metadata)
    model_out, clip_out = _host.apply_lora(model, clip, lora, 1.0, 1.0)
    text = train_report(result.steps, list(result.losses), result.file_path,
                        progress.start_info.get("buckets", {}))
    text = "\n".join(t for t in (text, progress.start_info.get("preflight")) if t)  # pre-flight
    return io.NodeOutput(model_out, clip_out, lora, {"loss": list(result.losses)},
                         _host.images_to_tensor(result.samples_after), ui=ui_report(text))


def stopped(node_id, e: TrainingStopped, total: int, name: str, advanced: bool) -> None:
    """A cancel: keep what was trained where Load LoRA lists it, say so on the node, then
    end as ComfyUI's ordinary interruption (no error dialog, no failed node)."""
    info = e.save
    listed = None
    if info.file_path:
        try:
            listed = _host.publish_partial(info.file_path, name, info.step)
        except OSError as err:  # the run folder still holds it; say where
            log.warning("could not copy the partial LoRA into models/loras: %s", err)
    how = ("to continue: turn on 'resume' on this node and queue again"
           + (" with the same name" if advanced else "") + f" (it starts at step {info.step})")
    if listed is None and info.file_path:
        how = f"LoRA so far: {info.file_path}\n{how}"
    text = stopped_report(info.step, total, listed, info.state_dir, how)
    log.warning("Tsuika training cancelled:\n%s", text)
    _host.emit("tsuika.stopped", {"node": node_id, "text": text})
    _host.interrupted()


class TsuikaTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaTrainLoRA", display_name="Train LoRA (Tsuika)",
            category="Tsuika/train",
            description="Train a LoRA on the loaded model and dataset, then use the returned "
                        "MODEL and CLIP right away. Cancel keeps what was trained; 'resume' "
                        "continues it.",
            inputs=main_inputs(), outputs=COMMON_OUTPUTS, hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool:
        check_queued(kwargs)
        return True

    @classmethod
    def execute(cls, model, clip, vae, dataset, **kwargs) -> io.NodeOutput:
        return run_training(cls.hidden.unique_id, model, clip, vae, dataset, kwargs)


class TsuikaTrainLoRAAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaTrainLoRAAdvanced", display_name="Train LoRA Advanced (Tsuika)",
            category="Tsuika/train",
            description="Train LoRA with every option of the backend: the Simple node's inputs, "
                        "plus options nodes (data, network, optimizer & schedule, saving, "
                        "sampling) chained into 'options'. Unconnected: the defaults.",
            inputs=main_inputs() + [widget(o, optional=True) for o in ADVANCED_MAIN] + [
                Options.Input("options", optional=True,
                              tooltip="Chain options nodes (Tsuika/train/options) here; options "
                                      "not set by any of them keep their defaults.")],
            outputs=COMMON_OUTPUTS, hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool:
        check_queued(kwargs)
        return True

    @classmethod
    def execute(cls, model, clip, vae, dataset, options=None, **kwargs) -> io.NodeOutput:
        return run_training(cls.hidden.unique_id, model, clip, vae, dataset, kwargs,
                            dict(options or {}))
