"""The train-node seam: one definition per training method gives its Simple and Advanced nodes.

A method's node is a :class:`TrainNodeSpec` (its ``network.method``, the options Simple shows,
its outputs, the ComfyUI models folder its file belongs in, and a ``finish`` function turning
the finished run into those outputs); :func:`make_train_nodes` makes both node classes. Every
train node then has the same inputs first (model, clip, vae, dataset, the method's options,
previews, resume), the same last outputs (loss, samples), progress, previews, loss chart,
cancel-saves (the partial file published into the method's folder) and resume.

Every widget is generated from its config field (name, default, limits, choices, help text;
``nodes/options.py`` holds the naming rule). Values go to ``build_config(values=...)`` as the
typed values the widgets hold. Advanced is Simple's inputs plus the spec's ``advanced_main``
widgets and one ``options`` input fed by the options nodes (``nodes/train_options.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from comfy_api.latest import io

from ..trainers.callbacks import TrainingStopped
from ..trainers.config import SECTIONS
from . import _host
from .options import (
    ADVANCED_MAIN,
    OPTION_NODES,
    PREVIEW,
    PRIOR,
    build_checked,
    check_widgets,
    section_options,
    widget_name,
    widget_spec,
)
from .reports import stopped_report, ui_report
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
# The prior-preservation widgets in the node's words (the config's name data.class_dir, which
# the node sets itself).
PRIOR_TIPS = {
    "data.class_prompt": "Prior preservation: the caption of every class image, e.g. 'a photo "
                         "of a dog' (what class_images draws). Empty: each class image's own "
                         "caption file.",
    "data.class_images": "Prior preservation without class_dataset: the base model draws this "
                         "many class images of class_prompt before training, into a folder "
                         "under ComfyUI's output that later runs with the same prompt, "
                         "resolution and model reuse. 0: none drawn (class_dataset's images, "
                         "if connected).",
    "train.prior_loss_weight": "Weight of the class images' loss beside the dataset's (with "
                               "class_dataset or class_images).",
}
RESUME_TIP = ("Continue the newest saved state of this training (after a cancel): turn on and "
              "queue again with the same settings. A damaged state is passed over for the "
              "newest sound one (and kept); the report says which.")
EVERY_OPTION = frozenset(f"{s}.{f.name}" for s, cls in SECTIONS.items()
                         for f in dataclasses.fields(cls))


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
CLASS_INPUT = Dataset.Input(
    "class_dataset", optional=True,
    tooltip="Prior preservation: class images (e.g. other dogs, from Load Training Dataset) "
            "trained beside the dataset so the class is not forgotten. Not connected: off, "
            "unless class_images asks the base model to draw them.")
# Every train node's last outputs, after the method's own.
TAIL_OUTPUTS = [
    io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
    io.Image.Output(display_name="samples", tooltip="Samples of the sample prompts after "
                    "training (empty without prompts)."),
]


@dataclasses.dataclass
class Finished:
    """What a ``finish`` function gets: the run's result and the node's inputs.

    ``result.file_path`` is the trained file in the run folder (under ComfyUI's output);
    ``lines`` are added to the node's report (the method says where its file is and what to
    do with it).
    """

    node_id: str | None
    spec: TrainNodeSpec
    config: Any  # TsuikaConfig, as run
    result: Any  # trainers.loop.TrainResult
    model: Any
    clip: Any
    vae: Any
    dataset: Any
    buckets: dict
    lines: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class TrainNodeSpec:
    """One method's train nodes.

    Args:
        method: the ``network.method`` value the nodes train (always set; not a widget).
        node_id: the Simple node's id (never renamed); Advanced's defaults to it + "Advanced".
        display_name: the Simple node's display name, e.g. "Train LoRA (Tsuika)".
        description: the Simple node's description (Advanced's adds the options input).
        main: the options Simple shows, in released order (new ones appended).
        outputs: the method's own outputs (``io.*.Output``), before loss and samples.
        finish: ``Finished -> tuple`` of values for ``outputs``; may append report lines.
        folder: the ComfyUI models folder kind of the method's file (``loras``,
            ``checkpoints``, ``embeddings``, ``hypernetworks``): a cancel publishes the
            partial file there.
        file_word: what the file is called in reports ("LoRA", "checkpoint", "embedding").
        loader: the ComfyUI node that lists files of ``folder`` ("Load LoRA").
        defaults: the method's node defaults (``{"section.key": value}``): its widgets'
            defaults, and the values used when neither a widget nor an options node gives
            one (e.g. ``output.name``, DreamBooth's learning rate).
        tooltips: widget tooltips replacing the config's help text on these nodes.
        prior: prior preservation on the node: an optional ``class_dataset`` input after
            ``resume``, and class images drawn by the base model into a host folder when
            ``data.class_images`` asks for them without one (put ``PRIOR`` options from
            ``nodes/options.py`` into ``main`` to show their widgets).
        advanced_main: options on the Advanced node itself (checked at queue time against
            a main input), after Simple's inputs.
        extra_inputs: inputs after ``resume`` on both nodes (sockets or node-only widgets
            that ``finish`` or ``prepare`` read from ``kwargs``); appended, never inserted.
        prepare: ``(values, kwargs) -> None``, changing the options from the extra inputs
            before the config is built (at run time only).
        advanced_node_id, advanced_display_name, advanced_description: override the
            derived Advanced id, name and description.
        file_suffix: the extension of the file the loader reads, beside the run's
            ``.safetensors`` (a hypernetwork's ``.pt``): a cancel publishes that one.
        advanced_prior: prior preservation on the Advanced node only, as ``prior`` gives it
            (the same checks and drawn class images), for nodes released without it: its
            ``PRIOR`` widgets and ``class_dataset`` come after ``options``, so saved
            workflows keep their widget order.
    """

    method: str
    node_id: str
    display_name: str
    description: str
    main: Sequence[str]
    outputs: Sequence[Any]
    finish: Callable[[Finished], tuple]
    folder: str = "loras"
    file_word: str = "LoRA"
    loader: str = "Load LoRA"
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    tooltips: dict[str, str] = dataclasses.field(default_factory=dict)
    prior: bool = False
    advanced_main: Sequence[str] = tuple(ADVANCED_MAIN)
    extra_inputs: Sequence[Any] = ()
    prepare: Callable[[dict, dict], None] | None = None
    advanced_node_id: str | None = None
    advanced_display_name: str | None = None
    advanced_description: str | None = None
    file_suffix: str = ".safetensors"
    advanced_prior: bool = False

    def own_options(self, advanced: bool) -> list[str]:
        """The options shown on the node itself (Simple, or Advanced)."""
        tail = (list(self.advanced_main) + (PRIOR if self.advanced_prior else [])
                if advanced else [])
        return list(self.main) + PREVIEW + tail

    def has_prior(self, advanced: bool) -> bool:
        """Whether the node (Simple, or Advanced) offers prior preservation."""
        return self.prior or (advanced and self.advanced_prior)


def main_inputs(spec: TrainNodeSpec) -> list:
    """Simple's inputs in their released order; new ones are appended (widget order)."""
    return (COMMON_INPUTS + [widget(o, tooltip=spec.tooltips.get(o) or PRIOR_TIPS.get(o),
                                    default=spec.defaults.get(o)) for o in spec.main]
            + [widget(o, optional=True, tooltip=PREVIEW_TIPS[o]) for o in PREVIEW]
            + [io.Boolean.Input("resume", default=False, optional=True, tooltip=RESUME_TIP)]
            + ([CLASS_INPUT] if spec.prior else []) + list(spec.extra_inputs))


def node_values(spec: TrainNodeSpec, kwargs: dict[str, Any], advanced: bool,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"section.key": value}`` from the method's defaults, an options node's values and
    the node's widgets (typed, as ComfyUI gives them), each over the one before; values not
    given (or linked, at /prompt) are left out. The node's method is always its own."""
    values: dict[str, Any] = dict(spec.defaults)
    values.update(extra or {})
    values.update({o: kwargs[widget_name(o)] for o in spec.own_options(advanced)
                   if kwargs.get(widget_name(o)) is not None})
    values["network.method"] = spec.method  # an options node cannot change what is trained
    return values


def check_queued(spec: TrainNodeSpec, kwargs: dict[str, Any], advanced: bool) -> None:
    """Everything the train node can check when the prompt is queued, in widget names.

    An options node's values are not known yet when it is connected (ComfyUI passes linked
    values only at run time): rules between them and this node's widgets are checked when
    the node starts, before any work.
    """
    own = spec.own_options(advanced)
    check_widgets([o for o in own if widget_name(o) in kwargs], kwargs)
    values = node_values(spec, kwargs, advanced)
    # Unknown: this node's linked widgets and a connected options node's values; every other
    # option has its default.
    unknown = {o for o in own if kwargs.get(widget_name(o)) is None}
    if "options" in kwargs:
        unknown |= {o for _, _, s in OPTION_NODES for o in section_options(s)}
    if values.get("sample.every") == 0:
        values.pop("sample.prompts", None)
    if spec.has_prior(advanced) and values.get("data.class_images"):
        if "data.class_prompt" not in unknown:
            check_class_prompt(values)
        # Where they go is the host's (a class_dataset's or a folder of drawn ones).
        values["data.class_dir"] = "class images"
    config = build_checked(values, set(EVERY_OPTION - unknown) | set(values))
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


def run_training(spec: TrainNodeSpec, node_id, model, clip, vae, dataset,
                 kwargs: dict[str, Any], options: dict[str, Any] | None = None,
                 advanced: bool = False) -> io.NodeOutput:
    """Shared body of every train node: build the config, train on the user's models, then
    the method's ``finish`` turns the result into the node's outputs."""
    from ..trainers.loop import train
    from .reports import train_report

    check_widgets([o for o in spec.own_options(advanced) if widget_name(o) in kwargs],
                  kwargs)  # linked values
    values = node_values(spec, kwargs, advanced, options)
    every = values.get("sample.every", 0)
    prompts = preview_prompts(values.get("sample.prompts"), values.get("data.trigger_word", ""),
                              dataset) if every else ""
    values["sample.prompts"] = prompts
    values.setdefault("sample.seed", values.get("train.seed", 0))  # previews follow the seed
    if spec.has_prior(advanced):
        prior_folder(values, kwargs.get("class_dataset"), model)
    if spec.prepare is not None:
        spec.prepare(values, kwargs)
    config = build_checked(values)  # the whole config, before any work; widget names
    name = config.output.name
    config.data.dir = str(dataset.root)
    config.output.dir = str(_host.run_dir(name))
    config.data.cache_dir = str(_host.cache_dir())
    resumed: list[str] = []
    if kwargs.get("resume"):
        config.train.resume, skipped = _host.latest_state(name)
        state = Path(config.train.resume)
        resumed = [f"resumed from {state.parent.parent.name}/{state.name}", *skipped]
    _host.comfy_family(model)  # refuse an unsupported family before any work
    progress = _host.ComfyProgress(node_id, config.train.steps)
    with _host.leave_host_as_found():  # a failed or cancelled run leaves nothing alive
        try:
            # ComfyUI runs nodes under inference_mode; training needs autograd back.
            with torch.inference_mode(False), torch.enable_grad():
                result = train(config, progress, scan=dataset,
                               bundle=_host.bundle_from_comfy(
                                   model, clip, vae, _host.written_components(config)))
        except TrainingStopped as e:
            stopped(spec, node_id, e, config.train.steps, name, advanced)
    done = Finished(node_id, spec, config, result, model, clip, vae, dataset,
                    progress.start_info.get("buckets", {}))
    outputs = tuple(spec.finish(done))
    text = train_report(result.steps, list(result.losses), result.file_path, done.buckets,
                        file_word=spec.file_word, lines=done.lines)
    preflight = progress.start_info.get("preflight")  # the dataset check, every method
    text = "\n".join(t for t in (text, preflight, *resumed) if t)
    level = "warning" if len(resumed) > 1 else "info"  # a damaged state was passed over
    return io.NodeOutput(*outputs, {"loss": list(result.losses)},
                         _host.images_to_tensor(result.samples_after), ui=ui_report(text, level))


def check_class_prompt(values: dict[str, Any]) -> None:
    """Drawn class images need a class prompt (said in the node's words: the backend's
    message names data.class_dir, which the node sets itself)."""
    if values.get("data.class_images") and not str(values.get("data.class_prompt", "")).strip():
        raise InputRefused(
            f"class_images = {values['data.class_images']} has the base model draw class "
            "images, which needs class_prompt (what to draw, e.g. 'a photo of a dog'); type "
            "one, or set class_images to 0 (with class_dataset connected: its images).")


def prior_folder(values: dict[str, Any], class_dataset, model) -> None:
    """Set ``data.class_dir``: the connected class dataset's folder (used as it is), or, when
    ``data.class_images`` asks for drawn class images, a folder under ComfyUI's output keyed
    by the class prompt, the resolution and the base model, so a later run reuses them."""
    count = values.get("data.class_images", 0)
    if class_dataset is not None:
        if count:
            raise InputRefused(
                f"class_images = {count}: class images are drawn only when no class_dataset "
                "is connected (drawing would add files to that dataset's folder); set "
                "class_images to 0, or disconnect class_dataset.")
        values["data.class_dir"] = str(class_dataset.root)
    elif count:
        check_class_prompt(values)
        values["data.class_dir"] = str(_host.class_images_dir(
            values.get("data.class_prompt", ""), values.get("data.resolution"), model))


def stopped(spec: TrainNodeSpec, node_id, e: TrainingStopped, total: int, name: str,
            advanced: bool) -> None:
    """A cancel: keep what was trained where the method's loader lists it, say so on the
    node, then end as ComfyUI's ordinary interruption (no error dialog, no failed node)."""
    info = e.save
    listed = None
    if info.file_path:
        try:
            listed = _host.publish_partial(Path(info.file_path).with_suffix(spec.file_suffix),
                                           name, info.step, spec.folder, spec.file_suffix)
        except OSError as err:  # the run folder still holds it; say where
            log.warning("could not copy the partial %s into models/%s: %s", spec.file_word,
                        spec.folder, err)
    how = ("to continue: turn on 'resume' on this node and queue again"
           + (" with the same name" if advanced else "") + f" (it starts at step {info.step})")
    if listed is None and info.file_path:
        how = f"{spec.file_word} so far: {info.file_path}\n{how}"
    text = stopped_report(info.step, total, listed, info.state_dir, how,
                          file_word=spec.file_word, folder=spec.folder, loader=spec.loader)
    log.warning("Tsuika training cancelled:\n%s", text)
    _host.emit("tsuika.stopped", {"node": node_id, "text": text})
    _host.interrupted()


def advanced_prior_inputs(spec: TrainNodeSpec) -> list:
    """The prior-preservation inputs ``advanced_prior`` appends to the Advanced node (after
    ``options``; optional, so a prompt saved before they existed still validates)."""
    if not spec.advanced_prior:
        return []
    return [widget(o, optional=True, tooltip=spec.tooltips.get(o) or PRIOR_TIPS[o])
            for o in PRIOR] + [CLASS_INPUT]


ADVANCED_TAIL = ("Advanced: the Simple node's inputs, plus options nodes (data, network, "
                 "optimizer & schedule, saving, sampling) chained into 'options'. "
                 "Unconnected: the defaults.")
ADVANCED_PRIOR_TAIL = ("Prior preservation: connect class_dataset (or set class_images and "
                       "class_prompt) to keep the class as it was.")


def make_train_nodes(spec: TrainNodeSpec) -> tuple[type[io.ComfyNode], type[io.ComfyNode]]:
    """The Simple and Advanced node classes of ``spec`` (list both in nodes/extension.py)."""
    outputs = list(spec.outputs) + TAIL_OUTPUTS
    advanced_id = spec.advanced_node_id or f"{spec.node_id}Advanced"
    advanced_name = spec.advanced_display_name or spec.display_name.replace(
        " (Tsuika)", " Advanced (Tsuika)")

    class Simple(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(node_id=spec.node_id, display_name=spec.display_name,
                             category="Tsuika/train", description=spec.description,
                             inputs=main_inputs(spec), outputs=outputs,
                             hidden=[io.Hidden.unique_id])

        @classmethod
        def validate_inputs(cls, **kwargs) -> bool:
            check_queued(spec, kwargs, advanced=False)
            return True

        @classmethod
        def execute(cls, model, clip, vae, dataset, **kwargs) -> io.NodeOutput:
            return run_training(spec, cls.hidden.unique_id, model, clip, vae, dataset, kwargs)

    class Advanced(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=advanced_id, display_name=advanced_name, category="Tsuika/train",
                description=spec.advanced_description or " ".join(
                    [spec.description, ADVANCED_TAIL]
                    + ([ADVANCED_PRIOR_TAIL] if spec.advanced_prior else [])),
                inputs=main_inputs(spec) + [widget(o, optional=True)
                                            for o in spec.advanced_main] + [
                    Options.Input("options", optional=True,
                                  tooltip="Chain options nodes (Tsuika/train/options) here; "
                                          "options not set by any of them keep their "
                                          "defaults.")] + advanced_prior_inputs(spec),
                outputs=outputs, hidden=[io.Hidden.unique_id])

        @classmethod
        def validate_inputs(cls, **kwargs) -> bool:
            check_queued(spec, kwargs, advanced=True)
            return True

        @classmethod
        def execute(cls, model, clip, vae, dataset, options=None, **kwargs) -> io.NodeOutput:
            return run_training(spec, cls.hidden.unique_id, model, clip, vae, dataset, kwargs,
                                dict(options or {}), advanced=True)

    Simple.__name__ = Simple.__qualname__ = spec.node_id
    Advanced.__name__ = Advanced.__qualname__ = advanced_id
    return Simple, Advanced
