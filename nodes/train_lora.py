"""Train LoRA nodes (Simple and Advanced): train on the user's loaded model, return it patched.

Advanced's inputs are generated from the backend config, so names, defaults, limits and
tooltips are the config's own (``trainers/config.py``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from comfy_api.latest import io

from ..trainers.callbacks import TrainingStopped
from ..trainers.config import SECTIONS, ConfigError, build_config, option_help
from . import _host
from .types import Dataset

log = logging.getLogger(__name__)

# Options a node does not expose: the host decides them (paths, device) or Simple hides them.
HOST_OWNED = {"model.path", "model.family", "data.dir", "data.cache_dir", "output.dir",
              "train.device", "train.resume", "output.overwrite", "output.keep_last"}
# Machine tuning, not a training choice: the nodes keep the default (and saved workflows keep
# their widget order when such an option is added).
ENGINE_ONLY = {"train.cpu_prepack_pixels"}
# Not on the LoRA nodes yet: prior preservation (class images should come in as a second
# dataset input, not a path) and full fine-tuning's engine options. Kept out rather than
# shown half-working, and so saved workflows keep their widget order.
NOT_ON_NODES_YET = {"data.class_dir", "data.class_prompt", "data.class_images",
                    "train.prior_loss_weight", "train.trained_weights",
                    "train.optimizer_in_backward"}
# These nodes train and return a LoRA; DreamBooth needs a node that returns a MODEL.
NODE_CHOICES = {"network.method": ("lora",)}
NODE_DEFAULTS = {"train.steps": 500, "output.save_every": 0}


def _advanced_fields():
    """(input id, 'section.key', dataclass field) for every option Advanced exposes."""
    fields = [(s, f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if f"{s}.{f.name}" not in HOST_OWNED | ENGINE_ONLY | NOT_ON_NODES_YET]
    counts: dict[str, int] = {}
    for _, f in fields:
        counts[f.name] = counts.get(f.name, 0) + 1
    return [(f.name if counts[f.name] == 1 else f"{s}_{f.name}", f"{s}.{f.name}", f)
            for s, f in fields]


def _widget(input_id: str, name: str, f: dataclasses.Field):
    meta, tip = f.metadata, option_help(name)
    default = NODE_DEFAULTS.get(name, f.default if f.default is not dataclasses.MISSING
                                else f.default_factory())
    kind = f.type if isinstance(f.type, type) else {"bool": bool, "int": int, "float": float,
                                                     "str": str, "list": list}[f.type]
    lo, hi = meta.get("min"), meta.get("max")
    if meta.get("choices"):
        return io.Combo.Input(input_id, options=list(NODE_CHOICES.get(name, meta["choices"])),
                              default=default,
                              tooltip=tip)
    if kind is bool:
        return io.Boolean.Input(input_id, default=default, tooltip=tip)
    if kind is int:
        return io.Int.Input(input_id, default=default, min=int(lo if lo is not None else 0),
                            max=int(hi if hi is not None else 2**31 - 1), tooltip=tip)
    if kind is float:
        return io.Float.Input(input_id, default=default, min=float(lo if lo is not None else 0),
                              max=float(hi if hi is not None else 1e9), step=1e-6, round=False,
                              tooltip=tip)
    if kind is list:
        return io.String.Input(input_id, multiline=True, default="\n".join(default),
                               tooltip=tip + " One per line.")
    return io.String.Input(input_id, default=default, tooltip=tip)


COMMON_INPUTS = [
    io.Model.Input("model", tooltip="The model to train on (from Load Checkpoint); it is "
                   "copied, never changed."),
    io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
    io.Vae.Input("vae", tooltip="The VAE of the same checkpoint (encodes the images once)."),
    Dataset.Input("dataset", tooltip="From Load Training Dataset or Dataset From Images."),
]
COMMON_OUTPUTS = [
    io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
    io.Clip.Output(display_name="clip", tooltip="The CLIP with the trained LoRA applied."),
    io.LoraModel.Output(display_name="lora", tooltip="The trained LoRA (kohya names); "
                        "connect to Save LoRA."),
    io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
    io.Image.Output(display_name="samples", tooltip="Samples of the sample prompts after "
                    "training (empty without prompts)."),
]


def run_training(node_id, model, clip, vae, dataset, options: dict, resume: bool = False
                 ) -> io.NodeOutput:
    """Shared body of both train nodes: options are ``{"section.key": value}``."""
    from ..trainers.formats.safetensors_io import load_safetensors
    from ..trainers.loop import train

    _host.comfy_family(model)  # refuse an unsupported family before any work
    name = str(options.get("output.name", "tsuika_lora"))
    values = {f"{k}": v for k, v in options.items()}
    values.update({"output.dir": _host.run_dir(name), "data.dir": dataset.root,
                   "data.cache_dir": _host.cache_dir()})
    if resume:
        values["train.resume"] = _host.latest_state(name)
    try:
        config = build_config(overrides=[f"{k}={v}" for k, v in values.items()
                                         if not isinstance(v, list)])
        prompts = options.get("sample.prompts")
        if prompts:
            config.sample.prompts = list(prompts)
    except ConfigError as e:
        raise ValueError(str(e)) from e
    bundle = _host.bundle_from_comfy(model, clip, vae)
    progress = _host.ComfyProgress(node_id, config.train.steps)
    try:
        # ComfyUI runs nodes under inference_mode; training needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            result = train(config, progress, bundle=bundle, scan=dataset)
    except TrainingStopped as e:
        # Stand-in for the `nodes` branch's cancel (issue 18): say what was kept on the node
        # ("tsuika.stopped"), then end the run as ComfyUI's ordinary interruption.
        import comfy.model_management as mm

        _host.emit("tsuika.stopped", {"node": node_id, "text": (
            f"Training cancelled at step {e.save.step}.\nkept: {e.save.lora_path}\n"
            f"resumable state: {e.save.state_dir}\nto continue: turn on 'resume' and queue again "
            "with the same output name.")})
        raise mm.InterruptProcessingException() from None
    finally:
        del bundle
        _host.free_host_memory()
    tensors, metadata = load_safetensors(result.lora_path)
    lora = _host.LoraDict(tensors, metadata)
    model_out, clip_out = _host.apply_lora(model, clip, lora, 1.0, 1.0)
    buckets = ", ".join(f"{size}: {n}" for size, n in
                        progress.start_info.get("buckets", {}).items())
    report = (f"trained {result.steps} steps, loss {result.losses[0]:.4f} -> "
              f"{result.losses[-1]:.4f}\nbuckets (size: images): {buckets or '-'}\n"
              f"LoRA: {result.lora_path}\nrun folder: {result.lora_path.parent}")
    return io.NodeOutput(model_out, clip_out, lora, {"loss": list(result.losses)},
                         _host.images_to_tensor(result.samples_after),
                         ui={"tsuika_report": [report]})


def preview_prompt(typed: str, trigger_word: str, dataset) -> str:
    """The Simple node's preview prompt: as typed, else the dataset's first caption as
    training sees it (trigger word first)."""
    import random

    from ..trainers.data.captions import CaptionAugment

    if typed and typed.strip():
        return typed.strip()
    first = next((item.caption for item in dataset.items if item.caption), "")
    return CaptionAugment(trigger_word=trigger_word).apply(first, random.Random(0))


class TsuikaTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaTrainLoRA", display_name="Train LoRA (Tsuika)",
            category="Tsuika/train",
            description="Train a LoRA on the loaded model and dataset, then use the returned "
                        "MODEL and CLIP right away. Cancel saves what was trained.",
            inputs=COMMON_INPUTS + [
                io.Int.Input("steps", default=500, min=1, max=100000,
                             tooltip=option_help("train.steps")),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=1.0, step=1e-6,
                               round=False, tooltip=option_help("train.learning_rate")),
                io.Int.Input("rank", default=16, min=1, max=256,
                             tooltip=option_help("network.rank")),
                io.String.Input("trigger_word", default="",
                                tooltip=option_help("data.trigger_word")),
                # Not "seed": the frontend gives inputs of that name a "randomize after each
                # queue" widget, and a training seed that changes retrains on every queue.
                io.Int.Input("training_seed", default=0, min=0, max=2**31 - 1,
                             tooltip=option_help("train.seed")),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip=option_help("data.resolution")),
                io.String.Input("sample_prompt", default="", optional=True,
                                tooltip="Prompt of the preview shown on this node while it "
                                "trains (fixed seed). Empty: the trigger word and the "
                                "dataset's first caption."),
                io.Int.Input("sample_every", default=100, min=0, max=100000, optional=True,
                             tooltip="Show a preview every N steps (and before and after "
                             "training); 0 = no previews, which trains fastest."),
            ],
            outputs=COMMON_OUTPUTS, hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps, learning_rate, rank, trigger_word,
                training_seed, resolution, sample_prompt="", sample_every=100) -> io.NodeOutput:
        options = {"train.steps": steps, "train.learning_rate": learning_rate,
                   "network.rank": rank, "network.alpha": max(1, rank // 2),
                   "data.trigger_word": trigger_word, "train.seed": training_seed,
                   "data.resolution": resolution}
        prompt = preview_prompt(sample_prompt, trigger_word, dataset)
        if sample_every > 0 and prompt:
            options.update({"sample.prompts": [prompt], "sample.every": sample_every,
                            "sample.seed": training_seed})
        return run_training(cls.hidden.unique_id, model, clip, vae, dataset, options)


class TsuikaTrainLoRAAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = COMMON_INPUTS + [_widget(i, n, f) for i, n, f in _advanced_fields()] + [
            io.Boolean.Input("resume", default=False, tooltip="Continue from the newest saved "
                             "state of runs with this output name (after a cancel).")]
        return io.Schema(
            node_id="TsuikaTrainLoRAAdvanced", display_name="Train LoRA Advanced (Tsuika)",
            category="Tsuika/train",
            description="Every training option of the backend, with the same names and help "
                        "as the CLI's config.",
            inputs=inputs, outputs=COMMON_OUTPUTS, hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, resume=False, **kwargs) -> io.NodeOutput:
        options = {}
        for input_id, name, f in _advanced_fields():
            if input_id in kwargs:
                value = kwargs[input_id]
                if name == "sample.prompts":
                    value = [line.strip() for line in str(value).splitlines() if line.strip()]
                options[name] = value
        return run_training(cls.hidden.unique_id, model, clip, vae, dataset, options, resume)
