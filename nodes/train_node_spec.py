"""What one training method's nodes are: :class:`TrainNodeSpec` (its options, outputs, models
folder, ``finish``) and :class:`Finished`, what its ``finish`` gets once the run is done.

Pure data: ``nodes/train_node.py`` makes the nodes of a spec, ``nodes/train_node_inputs.py``
their inputs, ``nodes/train_node_run.py`` runs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .options import ADVANCED_MAIN, PREVIEW, PRIOR


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
