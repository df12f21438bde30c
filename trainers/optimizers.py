"""A run's optimizer, and the option of taking each weight's step inside the backward pass.

Full fine-tuning holds a gradient for every trained weight until the optimizer steps: for
SD1.5's UNet in fp32 that is 3.4 GB, a quarter of the run's memory. ``StepInBackward`` steps
each tensor the moment its gradient is complete and frees that gradient at once, so only the
gradients of the layer being differentiated exist at any time. The update itself is the
same optimizer's (same state, same ``state_dict``, same learning-rate schedule); what
changes is that gradient clipping is per tensor (no global norm exists before the step) and
that one backward pass is one step (no gradient accumulation, no second backward per step).
"""

from __future__ import annotations

import torch

from .config import ConfigError, TsuikaConfig


def trained_weights_dtype(config: TsuikaConfig, compute_dtype: torch.dtype) -> torch.dtype:
    """What a full fine-tune stores its trained weights in (``train.trained_weights``)."""
    choice = config.train.trained_weights
    if choice == "auto":
        return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32
    return torch.bfloat16 if choice == "bf16" else torch.float32


def make_optimizer(config: TsuikaConfig, groups: list[dict],
                   device: torch.device) -> torch.optim.Optimizer:
    tr = config.train
    clean = [{"params": g["params"], "lr": g["lr"]} for g in groups if g["params"]]
    if any(p.dtype == torch.bfloat16 for g in clean for p in g["params"]):
        if tr.optimizer != "adamw":
            raise ConfigError(f"train.optimizer = {tr.optimizer!r} cannot train bf16 weights; "
                              "use 'adamw' or train.trained_weights = 'fp32'.")
        return AdamWBf16(clean, weight_decay=tr.weight_decay, seed=tr.seed)
    if tr.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("train.optimizer = 'adamw8bit' needs a CUDA device; use 'adamw'.")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("train.optimizer = 'adamw8bit' needs the bitsandbytes package "
                             "(pip install bitsandbytes); or use 'adamw'.") from e
        return bnb.optim.AdamW8bit(clean, weight_decay=tr.weight_decay)
    return torch.optim.AdamW(clean, weight_decay=tr.weight_decay,
                             fused=device.type in ("cuda", "cpu"))


def wants_step_in_backward(config: TsuikaConfig, trains_base_weights: bool,
                           distributed: bool, fp16: bool) -> bool:
    """Whether this run steps inside the backward pass (``train.optimizer_in_backward``).

    ``auto``: yes for methods that train the model's own weights (where the gradients are
    the model's size), when nothing needs whole-step gradients. ``on`` says what stands in
    the way instead of silently falling back.
    """
    choice = config.train.optimizer_in_backward
    if choice == "off":
        return False
    blockers = []
    if config.train.gradient_accumulation > 1:
        blockers.append(f"train.gradient_accumulation = {config.train.gradient_accumulation} "
                        "(needs whole-step gradients)")
    if distributed:
        blockers.append("a data-parallel run (gradients are averaged after the backward pass)")
    if fp16:
        blockers.append("fp16 mixed precision (its loss scaler checks all gradients first)")
    if choice == "on" and blockers:
        raise ConfigError("train.optimizer_in_backward = 'on' cannot be used with "
                          f"{'; '.join(blockers)}; set it to 'auto' or 'off'.")
    return not blockers and (choice == "on" or trains_base_weights)


class StepInBackward:
    """Steps ``optimizer`` for each parameter as soon as its gradient is accumulated.

    Use as a context manager around the training steps; leaving it removes the hooks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self._handles = []

    def __enter__(self) -> StepInBackward:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda param, group=group: self._step(group, param)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _step(self, group: dict, p: torch.Tensor) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        # The optimizer's own step, shown only this parameter: state, schedule and
        # state_dict stay exactly those of a normal run.
        solo = dict(group, params=[p])
        groups, self.optimizer.param_groups = self.optimizer.param_groups, [solo]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        p.grad = None


class AdamWBf16(torch.optim.Optimizer):
    """AdamW for weights stored in bf16: fp32 moments and update, stochastic rounding back.

    A bf16 weight has 8 significant bits, so an update smaller than half its spacing rounds
    away to nothing and fine-tuning stalls. Rounding up or down with probability given by
    the remainder keeps every update in expectation (``round_in_place``). The random bits
    are picked by the seed, the step, the tensor's index and the chunk: a run is
    reproducible and a resumed run repeats it exactly. Work goes in chunks that stay in
    cache, so the dozen element-wise passes cost about one pass over memory.
    """

    CHUNK = 1 << 18  # 1 MiB of fp32: measured fastest of 64 Ki..1 Mi elements on this CPU

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.seed = seed
        self._index = {p: i for i, p in enumerate(
            p for g in self.param_groups for p in g["params"])}

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to each parameter's dtype: the fp32 moments would come
        # back as bf16. Put the saved tensors back as they were.
        saved = {i: dict(st) for i, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, st in saved.items():
            self.state[params[i]] = {k: v.to(params[i].device) for k, v in st.items()}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = int(state["step"])
                salt = (self.seed * 1_000_003 + t) * 65_537 + self._index[p]
                self._update(p, state, lr, b1, b2, eps, wd, t, salt)

    def _update(self, p, state, lr, b1, b2, eps, wd, t, salt) -> None:
        flat_p, flat_g = p.view(-1), p.grad.view(-1)
        m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        step_size = lr / (1 - b1 ** t)
        root_bc2 = (1 - b2 ** t) ** 0.5
        # Work buffers made once: a fresh chunk-sized tensor per operation was most of the
        # cost (each large allocation comes back from the OS as new pages).
        w_buf, g_buf, d_buf = self._buffers(p.device)
        for a in range(0, flat_p.numel(), self.CHUNK):
            b = min(a + self.CHUNK, flat_p.numel())
            w, g, d = w_buf[:b - a], g_buf[:b - a], d_buf[:b - a]
            w.copy_(flat_p[a:b])
            g.copy_(flat_g[a:b])
            m, v = m_all[a:b], v_all[a:b]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            w.mul_(1 - lr * wd)
            torch.sqrt(v, out=d).div_(root_bc2).add_(eps)
            w.addcdiv_(m, d, value=-step_size)
            round_in_place(w, (salt * 7919 + a) & 0x7FFFFFFF)
            flat_p[a:b].copy_(w)  # exact: the dropped bits are zero

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if getattr(self, "_work", None) is None or self._work[0].device != device:
            self._work = tuple(torch.empty(self.CHUNK, dtype=torch.float32, device=device)
                               for _ in range(3))
        return self._work


_NOISE_TABLE = 1 << 23  # random 16-bit values; each rounding reads a window of them
_NOISE: dict[torch.device, torch.Tensor] = {}


def _noise_window(n: int, salt: int, device: torch.device) -> torch.Tensor:
    """``n`` random 16-bit values (int32), a window of a fixed seeded table chosen by
    ``salt``: free to take (a view), independent of the values being rounded."""
    if device not in _NOISE:
        g = torch.Generator().manual_seed(0x5EED)
        _NOISE[device] = torch.randint(0, 1 << 16, (_NOISE_TABLE,), dtype=torch.int32,
                                       generator=g).to(device)
    start = (salt * 2654435761) % (_NOISE_TABLE - n + 1)  # Knuth's multiplicative hash
    return _NOISE[device][start:start + n]


def round_in_place(x: torch.Tensor, salt: int) -> torch.Tensor:
    """Round ``x`` (1-d fp32) in place to a value bf16 holds exactly: up or down with
    probability given by the dropped 16 bits.

    The coin is a window of a seeded random table picked by ``salt`` (seed, step, tensor,
    chunk): never a function of the dropped bits, or it would depend on what it decides (a
    hash of the whole value drifted by 4 % of the updates over 100 steps). Two element-wise
    passes instead of the dozen a per-element hash costs.
    """
    bits = x.view(torch.int32)
    bits.add_(_noise_window(x.numel(), salt, x.device)).bitwise_and_(-65536)
    return x
