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


# The recipe that carried a concept into new contexts as DreamBooth does, forgetting at most
# 0.1 (docs/BENCHMARKS.md, "Defaults that generalise"): LoCon with 3x3 convolutions at rank
# 16 / conv 16, alpha = rank, lr 7e-4, 300 steps. Steps and rate are widget defaults; the
# network part is ``follow_rank``'s, applied where no options node gave it.
DEFAULTS = {"train.steps": 300, "train.learning_rate": 7e-4}
TOOLTIPS = {"network.rank": "Rank (dim) of the adapters. Alpha and the rank of the 3x3 "
                            "convolutions (LoCon, the default) follow it unless a Network "
                            "Options node sets them."}


def follow_rank(values: dict, kwargs: dict) -> None:
    """Where no options node chose them: LoCon, with alpha, conv rank and conv alpha equal
    to the rank widget (the measured recipe at rank 16, the same update scale at any rank).
    A Network Options node's algorithm / conv rank / alpha are kept as they are."""
    rank = values.get("network.rank", 16)
    values.setdefault("network.alpha", rank)
    if "network.algorithm" not in values and "network.conv_rank" not in values:
        values.update({"network.algorithm": "locon", "network.conv_rank": rank,
                       "network.conv_alpha": values.get("network.conv_alpha", rank)})


LORA = TrainNodeSpec(
    method="lora", node_id="TsuikaTrainLoRA", display_name="Train LoRA (Tsuika)",
    description="Train a LoRA on the loaded model and dataset, then use the returned MODEL and "
                "CLIP right away. Cancel keeps what was trained; 'resume' continues it.",
    advanced_description="Train LoRA with every option of the backend: the Simple node's "
                         "inputs, plus options nodes (data, network, optimizer & schedule, "
                         "saving, sampling) chained into 'options'. Unconnected: the defaults. "
                         + ADVANCED_PRIOR_TAIL,
    main=MAIN, outputs=OUTPUTS, finish=finish_lora, folder="loras", file_word="LoRA",
    loader="Load LoRA", defaults=DEFAULTS, tooltips=TOOLTIPS, prepare=follow_rank,
    advanced_prior=True)

TsuikaTrainLoRA, TsuikaTrainLoRAAdvanced = make_train_nodes(LORA)
