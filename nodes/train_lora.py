"""Train LoRA nodes (Simple and Advanced): train on the user's loaded model, return it patched.

The first user of the train-node seam (``nodes/train_node.py``): this module only says what
is particular to a LoRA (its options, its outputs, applying the trained LoRA to the MODEL and
CLIP). Node ids, widget names and their order are released: saved workflows depend on them.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import _host
from .options import MAIN
from .train_node import ADVANCED_PRIOR_TAIL, Finished, TrainNodeSpec, make_train_nodes

OUTPUTS = [
    io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
    io.Clip.Output(display_name="clip", tooltip="The CLIP with the trained LoRA applied."),
    io.LoraModel.Output(display_name="lora", tooltip="The trained LoRA (kohya names); "
                        "connect to Save LoRA."),
]


def finish_lora(done: Finished) -> tuple:
    """The trained LoRA as a LORA_MODEL, and the input MODEL / CLIP with it applied."""
    from ..trainers.formats.safetensors_io import load_safetensors

    tensors, metadata = load_safetensors(done.result.file_path)
    lora = _host.LoraDict(tensors, metadata)
    model_out, clip_out = _host.apply_lora(done.model, done.clip, lora, 1.0, 1.0)
    done.lines.append("connect 'lora' to Save LoRA to keep it in models/loras")
    return model_out, clip_out, lora


LORA = TrainNodeSpec(
    method="lora", node_id="TsuikaTrainLoRA", display_name="Train LoRA (Tsuika)",
    description="Train a LoRA on the loaded model and dataset, then use the returned MODEL and "
                "CLIP right away. Cancel keeps what was trained; 'resume' continues it.",
    advanced_description="Train LoRA with every option of the backend: the Simple node's "
                         "inputs, plus options nodes (data, network, optimizer & schedule, "
                         "saving, sampling) chained into 'options'. Unconnected: the defaults. "
                         + ADVANCED_PRIOR_TAIL,
    main=MAIN, outputs=OUTPUTS, finish=finish_lora, folder="loras", file_word="LoRA",
    loader="Load LoRA", advanced_prior=True)

TsuikaTrainLoRA, TsuikaTrainLoRAAdvanced = make_train_nodes(LORA)
