"""Frozen modules kept in the dtype they are stored in, computing in another.

A host's model arrives in the dtypes the host chose (ComfyUI keeps text encoders in fp16 even
on a CPU) and the run computes in its own (fp32 on a CPU without bf16 matrix units). Casting a
frozen module as a whole makes a second full copy of it beside the host's; casting each
layer's weights just before the layer runs, and dropping them after, holds one layer's copy
at a time. Each cast is the same exact conversion the whole-module cast makes, so the outputs
are bit for bit those of the cast module (``tests/test_device_stored_dtype.py``).

The same holds through a backward pass: a plain cast-then-compute would leave every layer's
cast weight in the autograd graph (the input gradient needs it), which is the whole fp32 copy
again by the end of the forward pass. Linear and conv layers therefore run through autograd
functions that keep the stored weight and cast it again for the input gradient; so a LoRA can
train over a UNet stored in bf16 and computing in fp32 at half the memory of its weights
(``train.frozen_weights``, docs/BENCHMARKS.md). A conv whose weight is larger than
``CONV_CHUNK`` runs a cache-sized slice of it at a time (faster than the whole weight, and
than an fp32-stored one, on a CPU: ``_RecastConv2d``); the input gradients of those convs then
equal the cast module's to fp32 rounding rather than bit for bit.

This is what ComfyUI's own "manual cast" layers do; here it is a pair of hooks on any module,
so the transformers / diffusers classes stay as they are.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class _Caster:
    """Casts a stored weight into one reused buffer per device.

    A fresh tensor for every cast is a fresh large allocation, which the C allocator takes
    from the operating system and gives back each time: on this project's CPU casting a
    10240x2560 bf16 weight took 79 ms that way and 13 ms into a reused buffer (the matmul it
    feeds at 308 tokens: 172 ms). The buffer holds one weight at a time, so it is valid only
    until the next cast: callers use it at once and keep nothing of it.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(weight.device)
        if buf is None or buf.numel() < weight.numel():
            buf = self.buffers[weight.device] = torch.empty(
                weight.numel(), dtype=self.dtype, device=weight.device)
        return buf[:weight.numel()].view(weight.shape).copy_(weight)


class _RecastLinear(torch.autograd.Function):
    """``F.linear`` with the weight cast for this call; the backward casts it again instead
    of keeping the cast copy alive until then. Frozen weights: no weight or bias gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, cast):
        ctx.save_for_backward(weight)  # the stored tensor itself: nothing new is kept
        ctx.cast = cast
        return F.linear(x, cast(weight), None if bias is None else bias.to(cast.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad.matmul(ctx.cast(weight)), None, None, None


CONV_CHUNK = 1 << 22  # weight elements per conv call: 16 MiB in fp32, half this CPU's L3


def _spans(weight: torch.Tensor, groups: int) -> list[tuple[int, int]]:
    """The conv weight's output channels split into even spans of at most ``CONV_CHUNK``
    elements (one span if it fits, or for a grouped conv)."""
    rows, per_row = weight.shape[0], weight[0].numel()
    if groups != 1:
        return [(0, rows)]
    pieces = -(-rows * per_row // CONV_CHUNK)
    step = -(-rows // max(1, pieces))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


class _RecastConv2d(torch.autograd.Function):
    """``F.conv2d`` the same way as ``_RecastLinear``, a slice of the weight at a time.

    oneDNN reorders a plain conv's whole weight before every call; a weight larger than the
    CPU's last-level cache is then cast, written out, reordered and read again from memory.
    A slice of output channels at a time (their input gradients summed backward) keeps each
    cast slice in the cache: on this project's CPU (2-core AMD EPYC without AVX512, 32 MiB
    L3) a 1280->1280 3x3 conv on an 8x8 map took 69 ms forward from the bf16 weight cast whole
    and 42 ms in slices (62 ms from a plain fp32 weight). Each output element is still one
    conv's sum, over the same terms; only oneDNN's blocking, and so the rounding, may differ.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, cast, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, cast, stride, padding, dilation, groups)
        bias = None if bias is None else bias.to(cast.dtype)
        spans = _spans(weight, groups)
        if len(spans) == 1:
            return F.conv2d(x, cast(weight), bias, stride, padding, dilation, groups)
        return torch.cat([F.conv2d(x, cast(weight[s:e]), None if bias is None else bias[s:e],
                                   stride, padding, dilation) for s, e in spans], 1)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, cast, stride, padding, dilation, groups = ctx.geometry
        spans = _spans(weight, groups)
        if len(spans) == 1:
            grad_in = torch.nn.grad.conv2d_input(shape, cast(weight), grad, stride, padding,
                                                 dilation, groups)
        else:
            # The same output-channel slices, their input gradients summed. Not slices of
            # input channels: a slice of a small map's input falls under PyTorch's size
            # threshold for oneDNN (20480 elements at batch 1) to its much slower own conv.
            grad_in = None
            for s, e in spans:
                part = torch.nn.grad.conv2d_input(shape, cast(weight[s:e]), grad[:, s:e],
                                                  stride, padding, dilation)
                grad_in = part if grad_in is None else grad_in.add_(part)
        return (grad_in,) + (None,) * 7


def _linear_forward(layer: torch.nn.Linear, cast: _Caster, x: torch.Tensor):
    return _RecastLinear.apply(x, layer.weight, layer.bias, cast)


def _conv_forward(layer: torch.nn.Conv2d, cast: _Caster, x: torch.Tensor):
    return _RecastConv2d.apply(x, layer.weight, layer.bias, cast, layer.stride,
                               layer.padding, layer.dilation, layer.groups)


def _embedding_forward(layer: torch.nn.Embedding, cast: _Caster, ids: torch.Tensor):
    # The rows first, then the cast: a lookup copies values, so this is the cast table's
    # result without casting (and allocating) the whole table each call, e.g. CLIP's
    # 49408-token table (150 MB in fp32) every text-encoder pass of a Textual Inversion step.
    # Frozen: nothing flows back into the table.
    return F.embedding(ids, layer.weight.detach(), layer.padding_idx).to(cast.dtype)


def _recast_forward(layer: torch.nn.Module):
    """The autograd-lean forward for ``layer``'s type, or None (hooks cast it instead)."""
    if type(layer) is torch.nn.Linear:
        return _linear_forward
    if (type(layer) is torch.nn.Embedding and layer.max_norm is None
            and not layer.scale_grad_by_freq and not layer.sparse):
        return _embedding_forward
    if (type(layer) is torch.nn.Conv2d and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)):
        return _conv_forward
    return None


class StoredDtype:
    """Hooks that run ``module``'s layers in ``dtype`` while their weights stay as stored.

    Only floating parameters and buffers of another dtype are cast; a layer with none keeps
    no hooks. Plain ``nn.Linear`` and ``nn.Conv2d`` layers get a forward that casts inside
    an autograd function (lean in a backward pass, above); other layers get a pair of hooks.
    Parameters already in ``dtype`` are untouched, so adapters added later in that dtype
    (a LoRA's fp32 weights) train as usual. ``remove()`` takes everything off (the module is
    then as it was).

    Args:
        module: a module whose parameters of another dtype are frozen (a trained weight must
            be the one the optimizer steps, not a per-call copy).
        dtype: the dtype its layers compute in.

    Raises:
        ValueError: a parameter of another dtype requires grad.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        trained = [n for n, p in module.named_parameters() if p.requires_grad
                   and self._casts(p)]
        if trained:
            raise ValueError(f"stored-dtype compute is for frozen modules; {trained[0]!r} "
                             f"(and {len(trained) - 1} more) require grad: cast the module "
                             "itself.")
        self.cast = _Caster(dtype)  # one buffer for every linear / conv weight's cast
        self.handles: list = []
        self.recast: list[torch.nn.Module] = []
        self.hooked: list[torch.nn.Module] = []
        self.layers = 0
        for layer in module.modules():
            if any(self._casts(t) for t in (*layer._parameters.values(),
                                             *layer._buffers.values())):
                self.layers += 1
                forward = _recast_forward(layer)
                if forward is not None and "forward" not in layer.__dict__:
                    layer.forward = functools.partial(forward, layer, self.cast)
                    self.recast.append(layer)
                    continue
                self.hooked.append(layer)
                self.handles.append(layer.register_forward_pre_hook(self._cast))
                # always_call: a layer that raises still gets its stored weights back.
                self.handles.append(layer.register_forward_hook(self._restore,
                                                                always_call=True))

    def _casts(self, t: torch.Tensor | None) -> bool:
        return t is not None and t.is_floating_point() and t.dtype != self.dtype

    def _cast(self, layer: torch.nn.Module, args) -> None:
        stored = {}
        for store in (layer._parameters, layer._buffers):
            for name, t in store.items():
                if self._casts(t):
                    stored[(id(store), name)] = t
                    # A plain tensor in the registry for the call: the layer reads it through
                    # __getattr__ like its own weight; the stored tensor is never written.
                    store[name] = t.detach().to(self.dtype)
        layer._tsuika_stored = stored

    def _restore(self, layer: torch.nn.Module, args, output) -> None:
        stored = layer.__dict__.pop("_tsuika_stored", {})
        for store in (layer._parameters, layer._buffers):
            for name in list(store):
                if (id(store), name) in stored:
                    store[name] = stored[(id(store), name)]

    def release_trained(self) -> int:
        """Layers a method has unfrozen since the hooks went on compute plainly in ``dtype``:
        their parameters are cast in place, once, so the optimizer steps the very tensors the
        layer reads and the gradients reach them. Returns how many layers were released."""
        released = 0
        for layer in [*self.recast, *self.hooked]:
            params = [p for p in layer._parameters.values() if p is not None]
            if not any(p.requires_grad for p in params):
                continue
            for p in params:
                if self._casts(p):
                    p.data = p.data.to(self.dtype)
            if layer in self.recast:
                layer.__dict__.pop("forward", None)
                self.recast.remove(layer)
            released += 1
        return released

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for layer in self.recast:
            layer.__dict__.pop("forward", None)
        self.recast.clear()
        self.cast.buffers.clear()
