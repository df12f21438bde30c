"""Train Embedding nodes (Simple and Advanced): Textual Inversion on the user's loaded model.

A user of the train-node seam (``nodes/train_node.py``): only the new word's vectors train
(every text encoder of the model); the embedding is published into ``models/embeddings`` (a
new name, never over an existing file), where ComfyUI's ``embedding:<name>`` prompt syntax
finds it. The node passes its CLIP input through, so a CLIPTextEncode fed from that output
runs after the file exists: train and prompt with the new word in one graph, no restart.

No prior preservation here (the other train nodes offer it): only the new word's vectors
train and the model is unchanged, so nothing of a class can be forgotten, and class images
captioned without the word would give those vectors no gradient at all.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import _host
from .options import TEXTUAL_INVERSION
from .train_node import Finished, TrainNodeSpec, make_train_nodes

METHOD = "textual_inversion"
MAIN = ["train.steps", "train.learning_rate", *TEXTUAL_INVERSION, "train.seed",
        "data.resolution", "output.name"]
# Embedding vectors are few and start from a real word: they need a far larger rate than a
# LoRA's adapters to move in a few hundred steps.
DEFAULTS = {"train.learning_rate": 5e-3, "train.steps": 300, "output.name": "tsuika_embedding"}
TOOLTIPS = {
    "output.name": "File name of the embedding in models/embeddings (no extension); prompts "
                   "use it as embedding:<name>. A taken name gets -2, -3... (an existing file "
                   "is never replaced).",
    "network.token": "The new word as your dataset's captions and this node's sample prompts "
                     "write it (lowercase, not a word CLIP knows). Captions without it get it "
                     "first; images without a caption train on templates. Other prompts use "
                     "embedding:<name>.",
}
OUTPUTS = [
    io.Clip.Output(display_name="clip", tooltip="The input CLIP, passed on once the embedding "
                   "is saved: a CLIPTextEncode fed from here can use embedding:<name> in the "
                   "same graph."),
    io.String.Output(display_name="embedding_name", tooltip="The embedding's file name in "
                     "models/embeddings, without extension (write embedding:<this> in a "
                     "prompt)."),
]


def finish_embedding(done: Finished) -> tuple:
    """Publish the embedding into models/embeddings; pass the CLIP on."""
    name = _host.publish_file(done.result.file_path, done.config.output.name, "embeddings")
    stem = name.removesuffix(".safetensors")
    done.lines.append(f"saved as {name} in models/embeddings (in a prompt: embedding:{stem})")
    return done.clip, stem


EMBEDDING = TrainNodeSpec(
    method=METHOD, node_id="TsuikaTrainEmbedding", display_name="Train Embedding (Tsuika)",
    description="Textual Inversion: learn a new word's embedding from the dataset (the model "
                "itself is unchanged), save it into models/embeddings and prompt with "
                "embedding:<name> right away through the clip output. Cancel keeps what was "
                "trained; 'resume' continues it.",
    main=MAIN, outputs=OUTPUTS, finish=finish_embedding, folder="embeddings",
    file_word="embedding", loader="CLIPTextEncode (embedding:<name>)", defaults=DEFAULTS,
    tooltips=TOOLTIPS)

TsuikaTrainEmbedding, TsuikaTrainEmbeddingAdvanced = make_train_nodes(EMBEDDING)
