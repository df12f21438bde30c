"""Train Checkpoint nodes (Simple and Advanced): DreamBooth on the user's loaded model.

A user of the train-node seam (``nodes/train_node.py``): the whole UNet (and, with
``train_text_encoder``, the text encoder) is fine-tuned; the result is a single-file
checkpoint published into ``models/checkpoints`` (a new name, never over an existing file),
and the node returns its MODEL and CLIP for the same graph, loaded as Load Checkpoint loads
it. Prior preservation: a ``class_dataset`` input, or class images drawn by the base model.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import _host
from .options import PRIOR
from .train_node import Finished, TrainNodeSpec, make_train_nodes

METHOD = "dreambooth"
MAIN = ["train.steps", "train.learning_rate", "data.trigger_word", "train.seed",
        "data.resolution", "network.train_text_encoder", "output.name", *PRIOR]
# A whole model forgets fast: a learning rate a LoRA needs would wreck it in a few steps.
DEFAULTS = {"train.learning_rate": 2e-6, "train.steps": 400, "output.name": "tsuika_checkpoint"}
TOOLTIPS = {
    "output.name": "File name of the checkpoint in models/checkpoints (no extension); a taken "
                   "name gets -2, -3... (an existing file is never replaced).",
    "train.learning_rate": "Learning rate of the UNet's own weights (full fine-tuning wants "
                           "1e-6 to 5e-6; a LoRA's 1e-4 would wreck the model).",
    "network.train_text_encoder": "Also fine-tune the text encoder (its learning rate: "
                                  "text_encoder_lr on Optimizer & Schedule Options). Off: the "
                                  "returned CLIP is the input's.",
}
OUTPUTS = [
    io.Model.Output(display_name="model", tooltip="The fine-tuned model (the saved checkpoint, "
                    "as Load Checkpoint gives it)."),
    io.Clip.Output(display_name="clip", tooltip="The fine-tuned CLIP (the input's when the text "
                   "encoder was not trained)."),
    io.String.Output(display_name="ckpt_name", tooltip="The checkpoint's file name in "
                     "models/checkpoints (what Load Checkpoint lists)."),
]


def finish_checkpoint(done: Finished) -> tuple:
    """Publish the checkpoint into models/checkpoints and load it back as MODEL (+ CLIP)."""
    from ..trainers.methods import METHODS

    # A hard link where the run folder and models/checkpoints share a file system: the
    # checkpoint exists once on disk (it is GBs), under both names.
    name = _host.publish_file(done.result.file_path, done.config.output.name, "checkpoints",
                              link=True)
    path = _host.models_dir("checkpoints") / name
    trained_te = METHODS.get(METHOD).trains_text_encoder(done.config)
    # The user's MODEL stays valid for the rest of the graph, so the fine-tuned weights are
    # a second model in memory; the VAE is never trained and never loaded again, and an
    # untrained text encoder is the input CLIP itself.
    model, clip, _ = _host.load_checkpoint(path, with_clip=trained_te)
    done.lines.append(f"saved as {name} in models/checkpoints (Load Checkpoint lists it)")
    return model, clip if trained_te else done.clip, name


CHECKPOINT = TrainNodeSpec(
    method=METHOD, node_id="TsuikaTrainCheckpoint", display_name="Train Checkpoint (Tsuika)",
    description="DreamBooth: fine-tune the loaded model's own weights on the dataset, save a "
                "checkpoint into models/checkpoints and use the returned MODEL and CLIP right "
                "away. Connect class images (or set class_images and class_prompt) to keep "
                "the class as it was. Cancel keeps what was trained; 'resume' continues it.",
    main=MAIN, outputs=OUTPUTS, finish=finish_checkpoint, folder="checkpoints",
    file_word="checkpoint", loader="Load Checkpoint", defaults=DEFAULTS, tooltips=TOOLTIPS,
    prior=True)

TsuikaTrainCheckpoint, TsuikaTrainCheckpointAdvanced = make_train_nodes(CHECKPOINT)
