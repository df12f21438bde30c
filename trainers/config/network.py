"""The ``network`` section: the training method, the LoRA-family algorithm and its options, the
hypernetwork's layers and textual inversion's word."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..registry import ALGORITHMS, METHODS
from .fields import ConfigError, _Section, opt

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
