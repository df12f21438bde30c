"""Resume on a train node across a change of the node's own defaults (pure: no ComfyUI).

Some options a node fills in itself where the user chose none (``TrainNodeSpec.prepare``: the
Train LoRA nodes' LoCon recipe, plain LoRA before). A state trained before such a default
changed was trained with other values, and its tensors fit only those. Resuming it, the node
takes the state's values for exactly the options it filled in (:func:`adopt_trained_network`,
said in the node's report); what the user chose (a widget, an options node) is never
changed: a state trained otherwise is refused naming the widget or options node to change
(:func:`refuse_other_network`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..trainers.config import NetworkConfig
from ..trainers.guards import recorded_network, shape_differences
from .options import NO_FILE, option_node_of, widget_name
from .train_node_spec import TrainNodeSpec
from .validation import InputRefused

log = logging.getLogger(__name__)

_FIELD_ORDER = ["algorithm", *NetworkConfig.__dataclass_fields__]  # the algorithm first


def filled_by_node(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """The options ``spec.prepare`` set or changed: ``before`` and ``after`` it ran."""
    return {k for k, v in after.items() if k not in before or before[k] != v}


def _shown(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _in_order(pairs: list[tuple], key=lambda p: p[0].split(".", 1)[1]) -> list[tuple]:
    order = {k: i for i, k in reversed(list(enumerate(_FIELD_ORDER)))}
    return sorted(pairs, key=lambda p: order.get(key(p), len(order)))


def _listed(pairs: list[tuple[str, Any]]) -> str:
    pairs = _in_order(pairs)
    return ", ".join(f"{widget_name(o)} {_shown(v)}" for o, v in pairs)


def state_label(state: Path) -> str:
    """A state named within its training: ``run_<time>/step_<N>``."""
    return f"{state.parent.parent.name}/{state.name}"


def adopt_trained_network(spec: TrainNodeSpec, values: dict[str, Any], filled: set[str],
                          state: Path) -> list[str]:
    """Give the network options the node filled in (``filled``) the values ``state`` was
    trained with, where it records them and they differ; returns the report lines.

    Args:
        spec: the node's spec (its method and file word).
        values: the node's ``{"section.key": value}``, changed in place.
        filled: the options the node filled in itself (:func:`filled_by_node`).
        state: the state folder the run resumes from.
    """
    if values.get("network.init_lora") not in (None, "", NO_FILE):
        return []  # the init file decides the network (trainers/init_lora.py), state or not
    recorded, where = recorded_network(state)
    if recorded is None:
        log.info("resuming %s: it records no network options", state)
        return []
    if recorded.get("method") != spec.method:
        return []  # another method's state: refused whole (refuse_other_network)
    kept = [(o, recorded[o.split(".", 1)[1]]) for o in filled
            if o.startswith("network.") and o.split(".", 1)[1] in recorded
            and recorded[o.split(".", 1)[1]] != values[o]]
    if not kept:
        return []
    defaults = _listed([(o, values[o]) for o, _ in kept])
    for option, value in kept:
        values[option] = value
    line = (f"resuming a {spec.file_word} state: network kept as it was trained: "
            f"{_listed(kept)} (this node's defaults now: {defaults}; turn 'resume' off to "
            "train a new one with them)")
    log.info("%s [read from %s of %s]", line, where, state)
    return [line]


def _fix(spec: TrainNodeSpec, option: str, value: Any, advanced: bool,
         options: dict[str, Any] | None) -> str:
    """What to change in the graph so that ``option`` is ``value``."""
    widget, shown = widget_name(option), _shown(value)
    if option in spec.own_options(advanced):
        return f"set {widget} to {shown} on this node"
    node = option_node_of(option)
    if node is None:  # no widget shows it
        return f"{option} = {shown}"
    if advanced and options is not None and option in options:
        return f"set {widget} to {shown} on the {node} node connected to 'options'"
    if advanced:
        return f"connect a {node} node with {widget} = {shown} to 'options'"
    advanced_name = spec.advanced_display_name or spec.display_name.replace(
        " (Tsuika)", " Advanced (Tsuika)")
    return (f"use {advanced_name} with a {node} node with {widget} = {shown} connected to "
            "'options'")


def refuse_other_network(spec: TrainNodeSpec, config, state: Path, advanced: bool,
                         options: dict[str, Any] | None) -> None:
    """Refuse, in the graph's words, a resume whose state was trained with other network
    options that shape its tensors (the loop would refuse it in the backend's words).

    Args:
        spec: the node's spec.
        config: the run's config, built (after :func:`adopt_trained_network`).
        state: the state folder the run resumes from.
        advanced: the Advanced node (it has an 'options' input), or Simple.
        options: the values of the options node connected to 'options' (None: none).

    Raises:
        InputRefused: naming each option, the state's value and this run's, and the fix.
    """
    recorded, _ = recorded_network(state)
    if recorded is None or config.network.init_lora:
        return  # with an init file the loop takes its network first, then checks the state
    name, label = config.output.name, state_label(state)
    if recorded.get("method") != spec.method:
        raise InputRefused(
            f"resume: the state {label} of the training named {name!r} was trained by "
            f"another kind of node (network.method {recorded.get('method')!r}); give this "
            "training another name, or turn 'resume' off.")
    differ = _in_order(shape_differences(spec.method, recorded, vars(config.network)),
                       key=lambda d: d[0])
    if not differ:
        return
    what = "; ".join(f"{widget_name('network.' + k)} {_shown(old)} (this run {_shown(new)})"
                     for k, old, new in differ)
    fixes = "; ".join(_fix(spec, f"network.{k}", old, advanced, options)
                      for k, old, _ in differ)
    raise InputRefused(
        f"resume: the state {label} of the training named {name!r} was trained with other "
        f"network options: {what}. To continue it: {fixes}. Or turn 'resume' off to train "
        "a new one (its states are kept).")


def refuse_past_steps(config, state: Path) -> None:
    """Refuse, naming the node's ``steps`` widget, a resume from a state already past this
    run's steps (a node's default steps may be fewer than the run was started with).

    Raises:
        InputRefused: naming the state's step and the widget to raise.
    """
    try:
        step = json.loads((state / "state.json").read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # checked when the state was chosen; the loop reads it again
    steps = config.train.steps
    if isinstance(step, int) and step > steps:
        raise InputRefused(
            f"resume: the state {state_label(state)} of the training named "
            f"{config.output.name!r} is at step {step}, past steps = {steps}; set steps above "
            f"{step} on this node to train on from it, or turn 'resume' off.")
