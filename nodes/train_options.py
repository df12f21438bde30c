"""Options nodes: one small node per config section, chained into Train LoRA Advanced.

ComfyUI packs commonly split long option lists this way; it keeps the Advanced node as short
as Simple (its chart and preview stay on screen). Each node shows its section's options
(generated from the config fields, in field order), passes on the options of the nodes
before it in the chain, and checks its own values when the prompt is queued.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from .options import (
    OPTION_NODES,
    build_checked,
    check_widgets,
    section_options,
    widget_name,
)
from .train_node_inputs import widget
from .types import Options


def options_values(section: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` of an options node's own widgets (those given)."""
    return {o: kwargs[widget_name(o)] for o in section_options(section)
            if kwargs.get(widget_name(o)) is not None}


def make_options_node(node_id: str, display_name: str, section: str) -> type[io.ComfyNode]:
    """The options node of one config section (classes are made, not written out, so a new
    config field needs no node code)."""

    class OptionsNode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=node_id, display_name=display_name, category="Tsuika/train/options",
                description=f"The '{section}' options of Train LoRA Advanced. Chain options "
                            "nodes together and connect the last one to its 'options' input.",
                inputs=[Options.Input("options", optional=True, tooltip="Options from another "
                                      "options node (chain them in any order).")]
                + [widget(o, optional=True) for o in section_options(section)],
                outputs=[Options.Output(display_name="options",
                                        tooltip="To Train LoRA Advanced's 'options', or to the "
                                                "next options node.")],
            )

        @classmethod
        def validate_inputs(cls, **kwargs) -> bool:
            check_widgets(section_options(section), kwargs)
            values = options_values(section, kwargs)
            build_checked(values, known=set(values))  # rules among this node's own widgets
            return True

        @classmethod
        def execute(cls, options=None, **kwargs) -> io.NodeOutput:
            check_widgets(section_options(section), kwargs)
            merged = dict(options or {})
            merged.update(options_values(section, kwargs))
            return io.NodeOutput(merged)

    OptionsNode.__name__ = OptionsNode.__qualname__ = node_id
    return OptionsNode


OPTIONS_NODES = [make_options_node(*spec) for spec in OPTION_NODES]
