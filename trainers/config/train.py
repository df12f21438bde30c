"""The ``train`` section: steps, learning rates, optimizer, precision, memory savers and EMA."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import ConfigError, _Section, opt

# The largest train.seed: the loop derives per-micro-batch seeds as seed * 1_000_003 + index
# (+ 2**40 for class images), and torch.Generator.manual_seed takes at most 2**64 - 1; with
# 32-bit seeds that sum stays far below 2**63 for any step count the config allows.
MAX_SEED = 2**32 - 1


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
    frozen_weights: str = opt(
        "auto", "Precision the frozen base weights (UNet and text encoders under an adapter, "
        "TI or hypernetwork) are stored in when the run loads the model: 'bf16' halves their "
        "memory (SDXL: 5 GB less) and each layer casts to the compute dtype as it runs; "
        "'compute' stores them in the compute dtype. 'auto' = bf16 on a CPU computing in fp32.",
        choices=("auto", "bf16", "compute"))

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
