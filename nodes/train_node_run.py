"""What a train node does when the prompt is queued (:func:`check_queued`) and when it runs
(:func:`run_training`): the options from the method's defaults, an options node and the
node's widgets; the config built and checked before any work; training on the user's models
through the host bridge; a cancel that keeps what was trained (:func:`stopped`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from comfy_api.latest import io

from ..trainers.callbacks import TrainingStopped
from ..trainers.config import SECTIONS
from . import _host
from .options import OPTION_NODES, build_checked, check_widgets, section_options, widget_name
from .reports import stopped_report, ui_report
from .train_node_prior import check_class_prompt, prior_folder
from .train_node_resume import (
    adopt_trained_network,
    filled_by_node,
    refuse_other_network,
    refuse_past_steps,
    state_label,
)
from .train_node_spec import Finished, TrainNodeSpec
from .validation import InputRefused

log = logging.getLogger(__name__)

EVERY_OPTION = frozenset(f"{s}.{f.name}" for s, cls in SECTIONS.items()
                         for f in dataclasses.fields(cls))


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
    chosen = dict(values)
    if spec.prepare is not None:
        spec.prepare(values, kwargs)
    config = build_checked(values)  # the whole config, before any work; widget names
    name = config.output.name
    resumed: list[str] = []
    skipped: list[str] = []
    if kwargs.get("resume"):
        state_path, skipped = _host.latest_state(name)
        state = Path(state_path)
        # What the node filled in itself follows the state (its defaults may have changed
        # since); what the user chose is kept, and a state trained otherwise is refused.
        kept = adopt_trained_network(spec, values, filled_by_node(chosen, values), state)
        config = build_checked(values) if kept else config
        refuse_other_network(spec, config, state, advanced, options)
        refuse_past_steps(config, state)
        config.train.resume = state_path
        resumed = [f"resumed from {state_label(state)}", *kept, *skipped]
    config.data.dir = str(dataset.root)
    config.output.dir = str(_host.run_dir(name))
    config.data.cache_dir = str(_host.cache_dir())
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
    level = "warning" if skipped else "info"  # a damaged state was passed over
    return io.NodeOutput(*outputs, {"loss": list(result.losses)},
                         _host.images_to_tensor(result.samples_after), ui=ui_report(text, level))


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
