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

The seam is four small modules besides this one: ``train_node_spec.py`` (the spec),
``train_node_inputs.py`` (the inputs), ``train_node_run.py`` (queue-time checks, the run, a
cancel) and ``train_node_prior.py`` (prior preservation).
"""

from __future__ import annotations

from comfy_api.latest import io

from .train_node_inputs import TAIL_OUTPUTS, advanced_inputs, main_inputs, widget
from .train_node_prior import ADVANCED_PRIOR_TAIL, prior_folder
from .train_node_run import check_queued, node_values, run_training
from .train_node_spec import Finished, TrainNodeSpec

# The seam's names the method modules, the options nodes and the tests use.
__all__ = ["ADVANCED_PRIOR_TAIL", "Finished", "TrainNodeSpec", "make_train_nodes",
           "node_values", "prior_folder", "widget"]

ADVANCED_TAIL = ("Advanced: the Simple node's inputs, plus options nodes (data, network, "
                 "optimizer & schedule, saving, sampling) chained into 'options'. "
                 "Unconnected: the defaults.")


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
                inputs=advanced_inputs(spec),
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
