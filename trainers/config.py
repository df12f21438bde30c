"""Training configuration: the single source of option names, defaults and help text.

Every option lives in one dataclass section (``model``, ``data``, ``network``, ``train``,
``output``, ``sample``) and is addressed as ``section.key`` everywhere: TOML files, the CLI's
``--set section.key=value``, node inputs and error messages. Each field carries its help text
and limits in ``field(metadata=...)`` so tooltips, CLI help and docs cannot drift apart.
Validation happens in ``__post_init__``: a bad value fails at once, naming the option, the
value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import ALGORITHMS, FAMILIES, METHODS, Choices

CONFIG_VERSION = 1
# The largest train.seed: the loop derives per-micro-batch seeds as seed * 1_000_003 + index
# (+ 2**40 for class images), and torch.Generator.manual_seed takes at most 2**64 - 1; with
# 32-bit seeds that sum stays far below 2**63 for any step count the config allows.
MAX_SEED = 2**32 - 1
# The longest output.name in UTF-8 bytes: file systems allow 255 per name, and the run adds
# suffixes such as "-step00001000.safetensors" and "-samples.png".
MAX_NAME_BYTES = 200


class ConfigError(ValueError):
    """An option has a bad value, or an unknown option was given."""


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, factory: Any = None) -> Any:
    """A config field with its help text and limits (read by validation, CLI help, nodes).

    ``choices`` is a tuple, or a registry's ``choices()`` (read when validating, so the
    registry is the one list of methods, algorithms and families)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _check_field(section: str, f: dataclasses.Field, value: Any) -> None:
    name = f"{section}.{f.name}"
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name} = {value!r} is not a valid choice; use one of: "
                          f"{', '.join(map(str, meta['choices']))}.")
    if isinstance(value, float) and not math.isfinite(value):
        # NaN fails every < and > test, so the range checks below would let it through.
        limits = [f"{k} {meta[k]}" for k in ("min", "max") if meta.get(k) is not None]
        raise ConfigError(f"{name} = {value!r} is not a finite number; give a real number"
                          + (f" ({', '.join(limits)})." if limits else "."))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{name} = {value!r} is below its minimum {meta['min']}; "
                              f"set it to at least {meta['min']}.")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{name} = {value!r} is above its maximum {meta['max']}; "
                              f"set it to at most {meta['max']}.")


class _Section:
    """Validates every field's choices and range after construction."""

    SECTION = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(self.SECTION, f, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:  # cross-field rules, overridden per section
        pass


@dataclass
class ModelConfig(_Section):
    SECTION = "model"
    path: str = opt("", "Base model: a diffusers folder or a single-file .safetensors "
                        "checkpoint (original layout, as kept in ComfyUI's models/checkpoints).")
    family: str = opt("auto", "Model family; 'auto' detects it from the weights.",
                      choices=FAMILIES.choices("auto"))
    prediction_type: str = opt("auto", "What the UNet predicts; 'auto' reads it from the model "
                                       "(scheduler config or checkpoint), never guesses.",
                               choices=("auto", "epsilon", "v_prediction"))


@dataclass
class DataConfig(_Section):
    SECTION = "data"
    dir: str = opt("", "Folder of images with same-name .txt captions; kohya 'N_name' "
                       "sub-folders repeat their images N times.")
    resolution: int = opt(512, "Training resolution: bucket area is at most resolution^2.",
                          min=32, max=4096)
    caption_extension: str = opt(".txt", "Extension of the caption files next to the images.")
    trigger_word: str = opt("", "Word put first in every caption (kept when tags are shuffled).")
    shuffle_tags: bool = opt(False, "Shuffle comma-separated tags every step.")
    keep_tokens: int = opt(0, "With shuffling/dropout, keep the first N tags in place.", min=0)
    tag_dropout: float = opt(0.0, "Probability of dropping each (non-kept) tag per step.",
                             min=0.0, max=1.0)
    caption_dropout: float = opt(0.0, "Probability of training a step on an empty caption.",
                                 min=0.0, max=1.0)
    buckets: bool = opt(True, "Aspect-ratio buckets (no forced square crop).")
    bucket_step: int = opt(64, "Bucket sides are multiples of this many pixels.", min=8, max=256)
    crop: str = opt("center", "How an image is cropped to its bucket.",
                    choices=("center", "random"))
    flip: bool = opt(False, "Random horizontal flip (both variants are cached).")
    cache_latents: bool = opt(True, "Encode each image with the VAE once, keyed by content.")
    cache_dir: str = opt("", "Where caches live; empty means <output.dir>/.cache.")
    class_dir: str = opt("", "Prior preservation: folder of class images (e.g. other dogs) "
                         "trained beside the dataset so the class is not forgotten; empty = "
                         "off.")
    class_prompt: str = opt("", "Caption of every class image, e.g. 'a photo of a dog'; empty = "
                            "each class image's own caption file.")
    class_images: int = opt(0, "Have at least this many class images: the base model draws "
                            "the missing ones into class_dir before training (needs "
                            "class_prompt); 0 = use the folder as it is.", min=0, max=100_000)

    def validate(self) -> None:
        if self.class_images and not (self.class_dir and self.class_prompt):
            raise ConfigError(f"data.class_images = {self.class_images} needs data.class_dir "
                              "(where to write them) and data.class_prompt (what to draw), "
                              "e.g. 'a photo of a dog'.")
        if self.crop == "random" and self.cache_latents:
            raise ConfigError("data.crop = 'random' cannot be combined with data.cache_latents "
                              "= true (a cached latent has one fixed crop); set data.crop = "
                              "'center' or data.cache_latents = false.")
        if self.bucket_step % 8:
            raise ConfigError(f"data.bucket_step = {self.bucket_step} must be a multiple of 8 "
                              "(the VAE downsamples by 8); use 64.")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ConfigError(f"data.caption_extension = {self.caption_extension!r} must start "
                              "with a dot, e.g. '.txt'.")
        if self.buckets and self.resolution < self.bucket_step:
            raise ConfigError(f"data.resolution = {self.resolution} is below data.bucket_step = "
                              f"{self.bucket_step} (no bucket fits); raise data.resolution to at "
                              f"least {self.bucket_step} or lower data.bucket_step.")


# What ComfyUI's HypernetworkLoader and A1111 both build (A1111's "swish" is Hardswish).
HYPERNETWORK_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid",
                            "softsign", "mish")


def parse_layer_structure(text: str) -> tuple[float, ...]:
    """``network.hypernetwork_layers`` as numbers: ``"1,2,1"`` -> ``(1.0, 2.0, 1.0)``.

    Raises:
        ConfigError: not a comma-separated list of at least two positive numbers that starts
            and ends with 1.
    """
    fix = "give comma-separated width multiples starting and ending with 1, e.g. '1,2,1'."
    try:
        values = tuple(float(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        raise ConfigError(f"network.hypernetwork_layers = {text!r} is not a list of numbers; "
                          f"{fix}") from None
    if len(values) < 2 or values[0] != 1 or values[-1] != 1 \
            or not all(math.isfinite(v) and 0 < v <= 16 for v in values):
        raise ConfigError(f"network.hypernetwork_layers = {text!r}: {fix} (each at most 16)")
    return values


@dataclass
class NetworkConfig(_Section):
    SECTION = "network"
    method: str = opt("lora", "Training method: what trains and what file it writes.",
                      choices=METHODS.choices())
    rank: int = opt(16, "LoRA rank (dim) of attention/linear layers.", min=1, max=1024)
    alpha: float = opt(0.0, "LoRA alpha; the update is scaled by alpha / rank. 0 = auto: half "
                            "the rank (rounded down, at least 1).", min=0.0, max=4096)
    target: str = opt("transformer", "Layers the LoRA adapts: 'transformer' = every linear layer "
                                     "of the UNet's transformer blocks plus proj_in/proj_out "
                                     "(kohya's default); 'attention' = to_q/to_k/to_v/to_out only.",
                      choices=("transformer", "attention"))
    conv_rank: int = opt(0, "Rank of the adapters on 3x3 convolutions (network.algorithm = "
                            "'locon'); 0 = no convolutions.", min=0, max=1024)
    conv_alpha: float = opt(1.0, "Alpha of the convolution LoRA.", min=0.0001, max=4096)
    dropout: float = opt(0.0, "Dropout on the LoRA input.", min=0.0, max=1.0)
    train_text_encoder: bool = opt(False, "Also train a LoRA on the text encoder.")
    algorithm: str = opt("lora", "LoRA-family algorithm of network.method = 'lora': how a "
                         "layer is adapted and which layers.", choices=ALGORITHMS.choices())
    lokr_factor: int = opt(-1, "LoKr (network.algorithm = 'lokr'): split each dimension into "
                           "this factor times the rest; -1 = automatic (near the square root). "
                           "Smaller factors give smaller files.", min=-1, max=4096)
    init_lora: str = opt("", "Train on from this LoRA file (any layout Tsuika reads): its "
                         "algorithm, rank, alpha and layers replace these options (each change "
                         "is reported), the adapters start from its weights, and its recorded "
                         "steps are counted on. Empty = fresh adapters.")
    hypernetwork_layers: str = opt("1,2,1", "network.method = 'hypernetwork': width of each "
                                   "layer of a module as a multiple of the context width, "
                                   "first and last 1 (A1111's layer structure).")
    hypernetwork_activation: str = opt("linear", "network.method = 'hypernetwork': activation "
                                       "after each layer but the last.",
                                       choices=HYPERNETWORK_ACTIVATIONS)
    hypernetwork_layer_norm: bool = opt(False, "network.method = 'hypernetwork': layer "
                                        "normalisation after each layer. ComfyUI's loader "
                                        "then also puts the activation after the last layer "
                                        "(A1111 does not): keep activation 'linear' with it for "
                                        "files that act the same in both.")
    hypernetwork_dropout: bool = opt(False, "network.method = 'hypernetwork': dropout (0.3) "
                                     "after the first layers while training. ComfyUI's loader "
                                     "keeps it on when generating too.")
    token: str = opt("tsuika_concept", "Textual inversion: the new word the embedding is "
                     "learned for, as captions and sample prompts write it (lowercase, no "
                     "spaces, not a word the tokenizer knows), e.g. 'mychar'. In ComfyUI "
                     "prompts write embedding:<file name>.")
    init_word: str = opt("*", "Textual inversion: the word whose embedding the new vectors "
                              "start from; the concept's class ('dog', 'watercolor') learns "
                              "fastest. A word of several tokens fills the vectors in turn.")
    vectors_per_token: int = opt(1, "Textual inversion: vectors the new word stands for (more "
                                    "capture more detail but use more of the 75-token "
                                    "prompt).", min=1, max=75)
    templates: str = opt("object", "Textual inversion: prompt templates used for images "
                                   "without a caption ('a photo of a <token>' for an object, "
                                   "'a painting in the style of <token>' for a style).",
                         choices=("object", "style"))

    def validate(self) -> None:
        # The one place the "alpha = rank / 2" policy lives (CLI, nodes and tests alike).
        if self.alpha == 0:
            self.alpha = auto_alpha(self.rank)
        parse_layer_structure(self.hypernetwork_layers)
        # Algorithm options are the algorithm's to judge, and only for methods built on them.
        if getattr(METHODS.get(self.method), "uses_algorithms", False):
            ALGORITHMS.get(self.algorithm).check_options(self)
        elif self.init_lora:
            raise ConfigError(f"network.init_lora = {self.init_lora!r} starts LoRA-family "
                              f"adapters from a file; network.method = {self.method!r} trains "
                              "no such adapters. Set network.method = 'lora' or leave "
                              "network.init_lora empty.")
        # A method's own options (textual inversion's token) are the method's to judge.
        check = getattr(METHODS.get(self.method), "check_options", None)
        if check is not None:
            check(self)


def auto_alpha(rank: int) -> float:
    """The alpha ``network.alpha = 0`` stands for: half the rank, rounded down, at least 1.

    Args:
        rank: the LoRA rank.
    """
    return float(max(1, rank // 2))


@dataclass
class TrainConfig(_Section):
    SECTION = "train"
    steps: int = opt(1000, "Optimizer steps to train.", min=1, max=10_000_000)
    batch_size: int = opt(1, "Images per step (per process).", min=1, max=1024)
    gradient_accumulation: int = opt(1, "Micro-batches accumulated per optimizer step.",
                                     min=1, max=1024)
    learning_rate: float = opt(1e-4, "Learning rate of the UNet LoRA.", min=0.0, max=10.0)
    text_encoder_lr: float = opt(5e-5, "Learning rate of the text-encoder LoRA.",
                                 min=0.0, max=10.0)
    optimizer: str = opt("adamw", "Optimizer; 'adamw8bit' needs bitsandbytes and CUDA.",
                         choices=("adamw", "adamw8bit"))
    weight_decay: float = opt(0.01, "AdamW weight decay.", min=0.0, max=10.0)
    lr_scheduler: str = opt("constant", "Learning-rate schedule (warm-up from lr_warmup_steps).",
                            choices=("constant", "cosine", "linear"))
    lr_warmup_steps: int = opt(0, "Linear warm-up steps at the start.", min=0)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this; 0 = off.", min=0.0)
    seed: int = opt(0, "Seed: the same seed gives the same result on the CPU.", min=0,
                    max=MAX_SEED)
    mixed_precision: str = opt("auto", "Compute precision: 'auto' uses bf16 where the device "
                                       "runs it faster (CUDA with bf16, CPUs with bf16 matmul "
                                       "units), else fp32.",
                               choices=("auto", "no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations to save memory.")
    compile: bool = opt(False, "torch.compile the UNet (slow first steps, faster after; "
                               "pays off on GPUs for runs of hundreds of steps).")
    cpu_prepack_pixels: int = opt(16, "CPU only: frozen UNet convs on feature maps of at most "
                                      "this many pixels run from weights reordered once for "
                                      "oneDNN instead of every call (faster at small batches; "
                                      "costs one extra copy of those weights); 0 = off.",
                                  min=0, max=1 << 20)
    noise_offset: float = opt(0.0, "Noise offset (helps very dark/bright images); 0.05 typical.",
                              min=0.0, max=1.0)
    optimizer_in_backward: str = opt(
        "auto", "Step each weight as soon as its gradient is ready and free the gradient: "
        "saves memory the size of the trained weights; clips gradients per tensor; not with "
        "gradient accumulation or several processes. 'auto' = on for full fine-tuning.",
        choices=("auto", "on", "off"))
    trained_weights: str = opt(
        "auto", "Precision of the weights a full fine-tune (dreambooth) trains: 'bf16' halves "
        "their memory and skips the per-step cast (updates use stochastic rounding, fp32 "
        "optimizer moments); 'fp32' keeps fp32 master weights. 'auto' = bf16 when computing "
        "in bf16.", choices=("auto", "bf16", "fp32"))
    prior_loss_weight: float = opt(1.0, "Weight of the class images' loss when data.class_dir "
                                   "is set (prior preservation).", min=0.0, max=100.0)
    min_snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (5 is common); 0 = off.",
                               min=0.0, max=100.0)
    device: str = opt("auto", "Device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1' ...")
    resume: str = opt("", "Resume from a saved state folder, or 'latest' for the newest "
                          "state in output.dir.")
    text_encoder_2_lr: float = opt(-1.0, "Learning rate of the second text encoder's LoRA "
                                   "(SDXL's OpenCLIP-G); -1 = the same as text_encoder_lr.",
                                   min=-1.0, max=10.0)
    ema_decay: float = opt(0.0, "Keep an exponential moving average (EMA) of the trained "
                           "weights and save it (and show it in the previews) instead of the "
                           "last step's weights: each update keeps this share of the average "
                           "(0.999 typical; a run needs well over 1 / (1 - decay) steps); "
                           "0 = off. Costs one fp32 copy of the trained weights: small for "
                           "adapters, the whole UNet (about 3.4 GB for SD1.x) for dreambooth.",
                           min=0.0, max=0.99999)
    ema_start_step: int = opt(0, "With train.ema_decay: the average starts after this step "
                                 "(it equals the weights until then).", min=0)
    ema_every: int = opt(1, "With train.ema_decay: update the average every N steps.",
                         min=1, max=10_000)
    offload_text_encoders: bool = opt(
        True, "When no text encoder trains and captions are fixed (no shuffling or dropout): "
        "encode every caption once before the first step, then move the text encoders off the "
        "GPU for the run (SDXL's two: 1.6 GB); previews bring them back for a moment.")

    def text_encoder_lrs(self) -> dict[str, float]:
        """The learning rate of each text-encoder component (the kohya names'
        ``text_encoder`` / ``text_encoder_1`` / ``text_encoder_2``)."""
        second = self.text_encoder_lr if self.text_encoder_2_lr < 0 else self.text_encoder_2_lr
        return {"text_encoder": self.text_encoder_lr, "text_encoder_1": self.text_encoder_lr,
                "text_encoder_2": second}

    def validate(self) -> None:
        if self.text_encoder_2_lr < 0 and self.text_encoder_2_lr != -1:
            raise ConfigError(f"train.text_encoder_2_lr = {self.text_encoder_2_lr}: give a "
                              "learning rate >= 0, or -1 for the same as train.text_encoder_lr.")
        if self.lr_warmup_steps >= self.steps and self.lr_warmup_steps > 0:
            raise ConfigError(f"train.lr_warmup_steps = {self.lr_warmup_steps} must be smaller "
                              f"than train.steps = {self.steps}.")
        if self.ema_decay and self.ema_start_step >= self.steps:
            raise ConfigError(f"train.ema_start_step = {self.ema_start_step} must be smaller "
                              f"than train.steps = {self.steps}, or the average never starts; "
                              "lower it or set train.ema_decay = 0.")


@dataclass
class OutputConfig(_Section):
    SECTION = "output"
    dir: str = opt("outputs", "Folder for the trained file, states, logs and samples.")
    name: str = opt("tsuika_lora", "Base file name of the trained LoRA (no extension).")
    save_every: int = opt(0, "Save the LoRA and a resumable state every N steps; 0 = only at "
                             "the end.", min=0)
    keep_last: int = opt(3, "Keep only the newest N intermediate saves; 0 = keep all.", min=0)
    overwrite: bool = opt(False, "Allow replacing an existing output file of the same name, "
                          "and a fresh start in an output.dir that holds resumable states "
                          "(they are moved aside to states.replaced-<time>, not deleted).")
    save_dtype: str = opt("fp16", "Precision of the saved LoRA tensors.",
                          choices=("fp16", "bf16", "fp32"))
    metadata_paths: bool = opt(False, "Write local folder paths into the file's metadata.")

    def validate(self) -> None:
        bad = set('/\\:*?"<>|') & set(self.name)
        if bad or not self.name.strip() or self.name in (".", ".."):
            raise ConfigError(f"output.name = {self.name!r} is not a plain file name; remove "
                              f"{''.join(sorted(bad)) or 'the dots'} (it may not contain a path).")
        if any(ord(c) < 32 or ord(c) == 127 for c in self.name):
            raise ConfigError(f"output.name = {self.name!r} contains control characters "
                              "(newline, tab, ...); use letters, digits, '-' and '_'.")
        if self.name.startswith("."):
            raise ConfigError(f"output.name = {self.name!r} starts with a dot (a hidden file "
                              "that file lists and ComfyUI do not show); remove the dot.")
        size = len(self.name.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise ConfigError(f"output.name is {size} bytes long (UTF-8); the limit is "
                              f"{MAX_NAME_BYTES} (file systems allow 255 per name and suffixes "
                              "are added); use a shorter name.")


@dataclass
class SampleConfig(_Section):
    SECTION = "sample"
    prompts: list = opt(None, "Prompts sampled during and after training (fixed seed).",
                        factory=list)
    every: int = opt(0, "Sample every N steps; 0 = only before and after training.", min=0)
    steps: int = opt(20, "Denoising steps per sample.", min=1, max=1000)
    guidance_scale: float = opt(7.0, "Classifier-free guidance scale of samples.",
                                min=0.0, max=50.0)
    seed: int = opt(0, "Seed of the sample images.", min=0, max=2**63 - 1)
    size: int = opt(0, "Sample side in pixels; 0 = data.resolution.", min=0, max=4096)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "network": NetworkConfig,
    "train": TrainConfig, "output": OutputConfig, "sample": SampleConfig,
}


@dataclass
class TsuikaConfig:
    """The whole training configuration (one section per concern)."""

    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def require_inputs(self) -> None:
        """Check the options a training run cannot start without."""
        if not self.model.path:
            raise ConfigError("model.path is empty; set it to a diffusers folder or a "
                              ".safetensors checkpoint (--set model.path=...).")
        if not self.data.dir:
            raise ConfigError("data.dir is empty; set it to a folder of images "
                              "(--set data.dir=...).")


def option_names() -> list[str]:
    """Every valid ``section.key``."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def option_help(name: str) -> str:
    """The help text of ``section.key`` (node tooltips and CLI help read this)."""
    section, key = name.split(".", 1)
    meta = _field(section, key).metadata
    choices = meta.get("choices")
    # A registry's choices describe themselves, so a new entry needs no edit here.
    described = choices.describe() if isinstance(choices, Choices) else ""
    return f"{meta['help']} {described}" if described else meta["help"]


def _field(section: str, key: str) -> dataclasses.Field:
    cls = SECTIONS.get(section)
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    if key not in fields:
        raise ConfigError(f"unknown option {section}.{key!s}; valid options are: "
                          f"{', '.join(option_names())}.")
    return fields[key]


def _coerce(name: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or say why not."""
    kind = f.type if isinstance(f.type, type) else eval(f.type, vars(typing), {})  # noqa: S307
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is list:
        if isinstance(value, (list, str)):
            return parse_list(name, value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{name} = {value!r} is not a valid {kind.__name__}.")


LIST_SEPARATORS = ("\n", "|")


def parse_list(name: str, value: Any) -> list[str]:
    """A list option (``sample.prompts``) from a TOML list or from text: the one syntax every
    path uses. Text holds one item per line, or items separated by ``|`` (what fits on a
    command line); items are stripped and empty ones dropped.

    Args:
        name: the option's ``section.key`` (named in errors).
        value: a list of strings, or text.
    """
    if isinstance(value, str):
        for sep in LIST_SEPARATORS[1:]:
            value = value.replace(sep, LIST_SEPARATORS[0])
        value = value.split(LIST_SEPARATORS[0])
    if not isinstance(value, list):
        raise ConfigError(f"{name} = {value!r} is not a list; give one item per line or "
                          "separate them with '|'.")
    items = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{name}: item {item!r} is not text; quote it.")
        if item.strip():
            items.append(item.strip())
    return items


def build_config(values: dict[str, dict[str, Any]] | None = None,
                 overrides: list[str] | None = None) -> TsuikaConfig:
    """Build a validated config from nested values (a TOML document) and ``a.b=value`` strings.

    Args:
        values: ``{"train": {"steps": 100}, ...}``; unknown sections or keys are an error.
        overrides: ``["train.steps=100", ...]`` applied after ``values``.
    """
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, entries in (values or {}).items():
        if section == "version":
            if entries != CONFIG_VERSION:
                raise ConfigError(f"config version {entries!r} is not supported; this Tsuika "
                                  f"reads version {CONFIG_VERSION}.")
            continue
        if section not in SECTIONS or not isinstance(entries, dict):
            raise ConfigError(f"unknown config section {section!r}; valid sections are: "
                              f"{', '.join(SECTIONS)}.")
        for key, value in entries.items():
            merged[section][key] = _coerce(f"{section}.{key}", _field(section, key), value)
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        if not sep or "." not in name:
            raise ConfigError(f"override {item!r} must look like section.key=value, "
                              "e.g. train.steps=200.")
        section, key = name.strip().split(".", 1)
        merged[section][key] = _coerce(name, _field(section, key), raw.strip())
    return TsuikaConfig(**{s: SECTIONS[s](**merged[s]) for s in SECTIONS})


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TsuikaConfig:
    """Read a TOML config file (optional) and apply ``section.key=value`` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; check the path.")
        try:
            values = tomllib.loads(p.read_text(encoding="utf-8-sig"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}.") from e
    return build_config(values, overrides)


def replace(config: TsuikaConfig, **sections: dict[str, Any]) -> TsuikaConfig:
    """A copy of ``config`` with some ``section={key: value}`` changed (validated again)."""
    values = config.to_dict()
    values.pop("version")
    for section, entries in sections.items():
        values[section].update(entries)
    return build_config(values)
