"""Train Hypernetwork nodes (Simple and Advanced): A1111-style hypernetwork modules on the
attention keys and values of the user's loaded model.

A user of the train-node seam (``nodes/train_node.py``). The run writes its safetensors file
and, beside it, the ``.pt`` that ComfyUI's HypernetworkLoader reads (plain data, loaded with
``weights_only``: ``trainers/formats/hypernetwork.py`` says why it cannot be a safetensors
file); the ``.pt`` is published into ``models/hypernetworks`` (a new name, never over an
existing file) and the node returns the input MODEL with it applied, as HypernetworkLoader
applies it, for the same graph. Prior preservation on the Advanced node (the modules change
the attention of every prompt, so a class can be forgotten): as on Train LoRA Advanced.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from . import _host
from .train_node import Finished, TrainNodeSpec, make_train_nodes

METHOD = "hypernetwork"
MAIN = ["train.steps", "train.learning_rate", "data.trigger_word", "train.seed",
        "data.resolution", "network.hypernetwork_layers", "network.hypernetwork_activation",
        "output.name"]
# A1111's default hypernetwork learning rate (not measured here).
DEFAULTS = {"train.learning_rate": 1e-5, "output.name": "tsuika_hypernetwork"}
TOOLTIPS = {
    "output.name": "File name of the hypernetwork in models/hypernetworks (no extension; the "
                   "file is a .pt); a taken name gets -2, -3... (an existing file is never "
                   "replaced).",
    "train.learning_rate": "Learning rate of the hypernetwork modules (A1111's default "
                           "1e-5).",
}
OUTPUTS = [
    io.Model.Output(display_name="model", tooltip="The input model with the trained "
                    "hypernetwork applied at strength 1 (as HypernetworkLoader applies it)."),
    io.String.Output(display_name="hypernetwork_name", tooltip="The file's name in "
                     "models/hypernetworks (what HypernetworkLoader lists)."),
]


def finish_hypernetwork(done: Finished) -> tuple:
    """Publish the .pt into models/hypernetworks and apply it to the input MODEL."""
    from comfy_extras.nodes_hypernetwork import HypernetworkLoader

    pt = Path(done.result.file_path).with_suffix(".pt")
    name = _host.publish_file(pt, done.config.output.name, "hypernetworks", suffix=".pt")
    model = HypernetworkLoader().load_hypernetwork(done.model, name, 1.0)[0]
    done.lines.append(f"saved as {name} in models/hypernetworks (HypernetworkLoader lists it)")
    return model, name


HYPERNETWORK = TrainNodeSpec(
    method=METHOD, node_id="TsuikaTrainHypernetwork",
    display_name="Train Hypernetwork (Tsuika)",
    description="Train an A1111-style hypernetwork (small networks on the attention keys and "
                "values) on the dataset, save it into models/hypernetworks and use the "
                "returned MODEL right away. Cancel keeps what was trained; 'resume' "
                "continues it.",
    main=MAIN, outputs=OUTPUTS, finish=finish_hypernetwork, folder="hypernetworks",
    file_word="hypernetwork", loader="HypernetworkLoader", defaults=DEFAULTS,
    tooltips=TOOLTIPS, file_suffix=".pt", advanced_prior=True)

TsuikaTrainHypernetwork, TsuikaTrainHypernetworkAdvanced = make_train_nodes(HYPERNETWORK)
