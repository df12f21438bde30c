"""Frozen convolutions on the CPU with their weights laid out for oneDNN once, not every call.

oneDNN convolves in a blocked weight layout. A plain ``nn.Conv2d`` hands it the weight in
PyTorch's layout, so every forward pass and every input-gradient pass first reorders the
whole weight. Where the feature map is small, that reorder costs more than the convolution:
on this project's CPU (bf16, one thread) a 2560->1280 3x3 conv on a 4x4 map took 41 ms
forward and 56 ms backward as a plain conv, 5.4 ms and 7.5 ms from reordered weights. A LoRA
step of SD1.5 at 256 px runs its lowest UNet levels at 4x4 and 8x8, with its largest weights:
a quarter of oneDNN's time in that step went to weight reorders.

``packed_frozen_convs(module)`` is a context manager. Inside it, each frozen conv whose input
has at most ``max_pixels`` pixels is packed at its first call: two reordered copies of its
weight (forward pass, and input gradient as a transposed conv) replace the plain weight,
which is kept meanwhile as an empty tensor of its dtype, so the extra memory is one copy of
those weights (two when the packed dtype differs from the stored one: then the plain weight
is kept too). Leaving the context, normally or through an exception, puts every plain weight
back bit-identical (a oneDNN reorder back is exact). Trainable convs (LoCon's adapters),
non-CPU tensors, unusual convs (groups, dilation, string padding) and convs whose adapter
reads their weight (LoHa, LoKr, DoRA) are left alone.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .host_memory import give_back_freed_memory

MAX_PIXELS = 16  # 4x4 maps: most of the time saved for half the memory of also packing 8x8
_OPS = ("_reorder_convolution_weight", "_convolution_pointwise",
        "_reorder_convolution_transpose_weight", "_convolution_transpose_pointwise")


def available() -> bool:
    """Whether this torch has the oneDNN ops the packed path uses."""
    return torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, n) for n in _OPS)


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN reorders conv weights of ``dtype`` (bf16 needs AVX512-BF16
    era instructions: without them the reorder raises, and the convs stay plain)."""
    if not available():
        return False
    try:
        torch.ops.mkldnn._reorder_convolution_weight(
            torch.zeros(2, 2, 3, 3, dtype=dtype), [1, 1], [1, 1], [1, 1], 1, [1, 2, 4, 4])
    except RuntimeError:
        return False
    return True


@dataclass
class _Packed:
    forward_weight: torch.Tensor  # oneDNN layout for the forward pass
    input_grad_weight: torch.Tensor  # oneDNN layout for the transposed conv of the gradient
    bias: torch.Tensor | None
    dtype: torch.dtype
    plain: torch.Tensor | None  # the plain weight, kept only when packing changed its dtype
    padding: list[int]
    stride: list[int]
    kernel: list[int]


class _PackedConv(torch.autograd.Function):
    """A conv from packed weights; the backward pass gives the input gradient only (the
    weight is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: _Packed) -> torch.Tensor:
        ctx.packed = packed
        # From this call's size, not the packing call's: buckets change map sizes, and a
        # strided conv's gradient needs the input's exact size back.
        ctx.output_padding = _transposed_geometry(x.shape[2:], packed.padding, packed.stride,
                                                  packed.kernel)[1]
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(), packed.forward_weight, packed.bias, packed.padding, packed.stride,
            [1, 1], 1, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        p = ctx.packed
        grad_in = torch.ops.mkldnn._convolution_transpose_pointwise(
            grad.to(p.dtype).contiguous(), p.input_grad_weight, None, p.padding,
            ctx.output_padding, p.stride, [1, 1], 1, "none", [], "")
        return grad_in, None


def _transposed_geometry(in_hw, pad, stride, kernel) -> tuple[list[int], list[int]]:
    """The conv's output size for ``in_hw``, and the output padding that makes the transposed
    conv of the gradient give back exactly ``in_hw``."""
    out = [(in_hw[i] + 2 * pad[i] - kernel[i]) // stride[i] + 1 for i in range(2)]
    return out, [in_hw[i] - ((out[i] - 1) * stride[i] - 2 * pad[i] + kernel[i])
                 for i in range(2)]


def _eligible(conv: torch.nn.Module) -> bool:
    # A conv whose forward is already replaced (stored_dtype's cast-as-it-runs) keeps it.
    return (type(conv) is torch.nn.Conv2d and not conv.weight.requires_grad
            and "forward" not in conv.__dict__
            and conv.weight.device.type == "cpu" and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and tuple(conv.dilation) == (1, 1))


def _reads_base_weight(wrapper: torch.nn.Module) -> bool:
    """Whether ``wrapper`` is a peft adapter layer over a conv that reads the conv's weight
    tensor, not only calls it: LoHa and LoKr shape their update like it, DoRA takes its
    norm. Packing would leave them an empty tensor; plain LoRA (LoCon) only calls the conv,
    so its convs still pack."""
    if not isinstance(getattr(wrapper, "base_layer", None), torch.nn.Conv2d):
        return False
    from peft.tuners.lora import LoraLayer

    if isinstance(wrapper, LoraLayer):
        return any(getattr(wrapper, "use_dora", {}).values())
    return True


def _compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """What ``F.conv2d`` would compute in here: the autocast dtype, else the weight's."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return weight_dtype


def _pack(conv: torch.nn.Conv2d, x: torch.Tensor, dtype: torch.dtype) -> _Packed:
    ops = torch.ops.mkldnn
    w = conv.weight.detach().to(dtype)
    pad, stride, kernel = list(conv.padding), list(conv.stride), list(conv.kernel_size)
    out_hw, out_pad = _transposed_geometry(x.shape[2:], pad, stride, kernel)
    return _Packed(
        forward_weight=ops._reorder_convolution_weight(w, pad, stride, [1, 1], 1,
                                                       list(x.shape)),
        input_grad_weight=ops._reorder_convolution_transpose_weight(
            w, pad, out_pad, stride, [1, 1], 1, [x.shape[0], w.shape[0], *out_hw]),
        bias=None if conv.bias is None else conv.bias.detach().to(dtype),
        dtype=dtype, plain=None if w.dtype == conv.weight.dtype else conv.weight.data,
        padding=pad, stride=stride, kernel=kernel)


class _Packer:
    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self.packed: dict[torch.nn.Conv2d, _Packed] = {}
        self.pixels: dict[str, int] = {}  # what the caller sees: packed convs, input pixels

    def forward_of(self, name: str, conv: torch.nn.Conv2d):
        plain_forward = conv.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            packed = self.packed.get(conv)
            dtype = _compute_dtype(conv.weight.dtype)
            if packed is None:
                if (x.dim() != 4 or x.shape[-2] * x.shape[-1] > self.max_pixels
                        or not packs(dtype)):
                    return plain_forward(x)
                packed = self.packed[conv] = _pack(conv, x, dtype)
                self.pixels[name] = x.shape[-2] * x.shape[-1]
                # The packed copy gives the weight back exactly (``plain`` keeps it where the
                # packed dtype differs), so the plain tensor can go until the run ends.
                conv.weight.data = torch.empty(0, dtype=conv.weight.dtype)
                give_back_freed_memory()  # or the freed plain weight stays resident
            if dtype != packed.dtype or x.dim() != 4:  # e.g. an fp32 call after bf16 ones
                weight = (packed.plain if packed.plain is not None else
                          packed.forward_weight.to_dense()).to(dtype)
                return torch.nn.functional.conv2d(
                    x.to(dtype), weight, None if conv.bias is None else conv.bias.to(dtype),
                    packed.stride, packed.padding)
            return _PackedConv.apply(x.to(dtype), packed)

        return forward

    def restore(self, conv: torch.nn.Conv2d) -> None:
        packed = self.packed.pop(conv, None)
        if packed is not None:
            conv.weight.data = packed.plain if packed.plain is not None else \
                packed.forward_weight.to_dense()


@contextlib.contextmanager
def packed_frozen_convs(module: torch.nn.Module, max_pixels: int = MAX_PIXELS):
    """Run ``module``'s small frozen convs from pre-reordered weights inside the context.

    Yields ``{conv name: input pixels}`` of the convs packed so far (filled at their first
    call). Does nothing where ``available()`` is false or ``max_pixels`` is 0.
    """
    packer = _Packer(max_pixels)
    patched: list[torch.nn.Conv2d] = []
    try:
        if available() and max_pixels > 0:
            read = {id(m.base_layer) for m in module.modules() if _reads_base_weight(m)}
            for name, conv in module.named_modules():
                if _eligible(conv) and id(conv) not in read:
                    conv.forward = packer.forward_of(name, conv)
                    patched.append(conv)
        yield packer.pixels
    finally:
        for conv in patched:
            del conv.forward  # the instance attribute: the class's forward again
            packer.restore(conv)
