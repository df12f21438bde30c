"""Frozen modules kept in the dtype they are stored in, computing in another.

A host's model arrives in the dtypes the host chose (ComfyUI keeps text encoders in fp16 even
on a CPU) and the run computes in its own (fp32 on a CPU without bf16 matrix units). Casting a
frozen module as a whole makes a second full copy of it beside the host's; casting each
layer's weights just before the layer runs, and dropping them after, holds one layer's copy
at a time. Each cast is the same exact conversion the whole-module cast makes, so the outputs
are bit for bit those of the cast module (``tests/test_device_stored_dtype.py``).

This is what ComfyUI's own "manual cast" layers do; here it is a pair of hooks on any module,
so the transformers / diffusers classes stay as they are.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class StoredDtype:
    """Hooks that run ``module``'s layers in ``dtype`` while their weights stay as stored.

    Only floating parameters and buffers of another dtype are cast; a layer with none keeps
    no hooks. ``remove()`` takes the hooks off (the module is then as it was).

    Args:
        module: a frozen module (no parameter requires grad: a trained weight must be the
            one the optimizer steps, not a per-call copy).
        dtype: the dtype its layers compute in.

    Raises:
        ValueError: a parameter of ``module`` requires grad.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        trained = [n for n, p in module.named_parameters() if p.requires_grad]
        if trained:
            raise ValueError(f"stored-dtype compute is for frozen modules; {trained[0]!r} "
                             f"(and {len(trained) - 1} more) require grad: cast the module "
                             "itself.")
        self.dtype = dtype
        self.handles: list = []
        self.layers = 0
        for layer in module.modules():
            if any(self._casts(t) for t in (*layer._parameters.values(),
                                             *layer._buffers.values())):
                self.handles.append(layer.register_forward_pre_hook(self._cast))
                # always_call: a layer that raises still gets its stored weights back.
                self.handles.append(layer.register_forward_hook(self._restore,
                                                                always_call=True))
                self.layers += 1

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

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
