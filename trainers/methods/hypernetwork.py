"""Hypernetworks (A1111 style): small networks that change what the UNet's attention layers
read as keys and values.

For every context width (the text encoder's: 768 for SD1.x, 1024 for SD2, 2048 for SDXL)
there are two modules, one for the keys and one for the values. Wherever an attention
layer's key/value input has that width, the input becomes ``x + module(x) * strength``
before ``to_k`` / ``to_v``. That is what ComfyUI's HypernetworkLoader does (an attn1 and
attn2 patch on the inputs, matched by width, so a self-attention of the same width is
changed as well) and what A1111 does (in its ``CrossAttention.forward``), so a file acts the
same where it is loaded. The width match makes the file family-neutral in those loaders: a
768-wide hypernetwork does nothing on SDXL, whose attention inputs are 320/640/1280/2048
wide. This method trains on every family whose UNet has diffusers ``Attention`` layers
(SD1.x, SD2, SDXL).

Module layout, initialisation and options follow A1111 (``formats.hypernetwork``): a
Linear per step of ``network.hypernetwork_layers``, the activation after each but the last,
LayerNorm after each with ``hypernetwork_layer_norm``, dropout 0.3 after all but the last two
with ``hypernetwork_dropout``; weights drawn from N(0, 0.01), biases 0 ("Normal").
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..config import HYPERNETWORK_ACTIVATIONS, TsuikaConfig, parse_layer_structure
from ..families.base import ModelBundle
from ..formats.hypernetwork import HypernetworkFile, options_metadata
from .base import MethodError, load_named_tensors

log = logging.getLogger(__name__)

ATTR = "tsuika_hypernetwork"  # where the modules sit on the UNet (so states name them)
_ACTIVATIONS = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU,
                "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU, "swish": torch.nn.Hardswish,
                "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
                "softsign": torch.nn.Softsign, "mish": torch.nn.Mish}
assert set(_ACTIVATIONS) == set(HYPERNETWORK_ACTIVATIONS)


class HypernetworkModule(torch.nn.Module):
    """One module (keys or values of one width): ``linear`` is A1111's ``Sequential``, so
    its parameter names are the file's. ``forward`` returns the change, not ``x + change``."""

    def __init__(self, dim: int, layers: tuple[float, ...], activation: str,
                 layer_norm: bool, dropout: bool, activate_output: bool = False,
                 last_layer_dropout: bool = False):
        super().__init__()
        seq: list[torch.nn.Module] = []
        n = len(layers)
        for i in range(n - 1):
            seq.append(torch.nn.Linear(int(dim * layers[i]), int(dim * layers[i + 1])))
            if activation != "linear" and (i < n - 2 or activate_output):
                seq.append(_ACTIVATIONS[activation]())
            if layer_norm:
                seq.append(torch.nn.LayerNorm(int(dim * layers[i + 1])))
            if dropout and (i < n - 3 or last_layer_dropout and i < n - 2):
                seq.append(torch.nn.Dropout(p=0.3))
        self.linear = torch.nn.Sequential(*seq)
        for layer in self.linear:
            if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
                torch.nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                torch.nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Hypernetwork(torch.nn.Module):
    """The modules of every width: ``"<dim>" -> [keys, values]`` (parameter names
    ``<dim>.<0|1>.linear.<i>.weight``, the file's names)."""

    def __init__(self, widths, layers, activation, layer_norm, dropout):
        super().__init__()
        self.widths = sorted(set(int(w) for w in widths))
        self.by_width = torch.nn.ModuleDict({
            str(w): torch.nn.ModuleList([
                HypernetworkModule(w, layers, activation, layer_norm, dropout)
                for _ in range(2)]) for w in self.widths})
        self.strength = 1.0

    def named_file_tensors(self) -> dict[str, torch.Tensor]:
        prefix = "by_width."
        return {n[len(prefix):]: p for n, p in self.named_parameters()}

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.by_width[str(x.shape[-1])] if x.shape[-1] in self.widths else None
        if pair is None:
            return x, x
        # The modules stay fp32; outside autocast the input comes in the frozen weights' dtype.
        h = x.to(pair[0].linear[0].weight.dtype)
        return (x + (pair[0](h) * self.strength).to(x.dtype),
                x + (pair[1](h) * self.strength).to(x.dtype))


class HypernetworkAttnProcessor:
    """A diffusers attention processor: scaled-dot-product attention whose key and value
    inputs pass through the hypernetwork first (a plain object: the modules are registered
    once, on the UNet, not once per layer)."""

    def __init__(self, hypernetwork: Hypernetwork):
        self.hypernetwork = hypernetwork

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        batch, length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key_in, value_in = self.hypernetwork.key_value(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(key_in), attn.to_v(value_in)
        head = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head).transpose(1, 2) for t in (q, k, v))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _attention_layers(unet) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def context_widths(bundle: ModelBundle) -> list[int]:
    """The UNet's cross-attention context widths (one per family; a list in some configs)."""
    dim = bundle.unet.config.get("cross_attention_dim")
    return sorted(set(dim if isinstance(dim, (list, tuple)) else [dim]))


def attach(bundle: ModelBundle, hn: Hypernetwork) -> None:
    """Put ``hn`` on the bundle's UNet: registered as ``ATTR`` (so states and the EMA name its
    parameters as the UNet's) and read by every attention layer's processor."""
    setattr(bundle.unet, ATTR, hn)
    processor = HypernetworkAttnProcessor(hn)
    for attn in _attention_layers(bundle.unet):
        attn.set_processor(processor)


def apply_file(bundle: ModelBundle, file, strength: float = 1.0) -> Hypernetwork:
    """Apply a saved hypernetwork (``formats.hypernetwork.HypernetworkFile``) to ``bundle`` at
    ``strength``, as HypernetworkLoader does in ComfyUI (the quality benchmark scores it so).

    Raises:
        MethodError: its activation is not one this module builds, or its tensors do not
            fit the layers its options describe.
    """
    if file.activation_func not in _ACTIVATIONS:
        raise MethodError(f"hypernetwork activation {file.activation_func!r} is not one of "
                          f"{', '.join(_ACTIVATIONS)}.")
    device = next(bundle.unet.parameters()).device
    hn = Hypernetwork(list(file.modules), tuple(file.layer_structure), file.activation_func,
                      file.is_layer_norm, file.use_dropout)
    tensors = {f"by_width.{dim}.{i}.{name}": t for dim, pair in file.modules.items()
               for i, sd in enumerate(pair) for name, t in sd.items()}
    try:
        hn.load_state_dict(tensors)
    except RuntimeError as e:
        raise MethodError(f"the hypernetwork's tensors do not fit its options: {e}") from e
    hn.strength = strength
    attach(bundle, hn.to(device).eval().requires_grad_(False))
    return hn


class HypernetworkMethod:
    """A1111-style hypernetwork modules on the attention layers' key/value inputs."""

    name = "hypernetwork"
    summary = ("trains small networks on the attention keys and values (an A1111 / ComfyUI "
               "hypernetwork file)")
    trains_base_weights = False
    companion_suffixes = (".pt",)  # output.overwrite guards it like the main file

    def trains_text_encoder(self, config: TsuikaConfig) -> bool:
        return False

    def validate(self, config: TsuikaConfig, bundle: ModelBundle) -> None:
        if config.network.train_text_encoder:
            raise MethodError("network.train_text_encoder = true: a hypernetwork changes only "
                              "the UNet's attention inputs; set it to false.")
        layers = _attention_layers(bundle.unet)
        odd = [m for m in layers if m.group_norm is not None or m.spatial_norm is not None
               or m.residual_connection or m.rescale_output_factor != 1.0]
        if not layers or odd:
            raise MethodError(f"network.method = 'hypernetwork' needs the UNet's transformer "
                              f"attention layers; this {bundle.family!r} UNet has "
                              f"{'none' if not layers else 'other attention layers'}.")

    def prepare(self, config: TsuikaConfig, bundle: ModelBundle) -> list[dict]:
        net = config.network
        device = next(bundle.unet.parameters()).device
        hn = Hypernetwork(context_widths(bundle), parse_layer_structure(net.hypernetwork_layers),
                          net.hypernetwork_activation, net.hypernetwork_layer_norm,
                          net.hypernetwork_dropout).to(device, torch.float32)
        bundle.unet.requires_grad_(False)  # only the modules train
        attach(bundle, hn)
        params = list(hn.parameters())
        log.info("hypernetwork: widths %s, %d trainable parameters", hn.widths,
                 sum(p.numel() for p in params))
        return [{"params": params, "lr": config.train.learning_rate, "name": "unet"}]

    def trainable_state(self, bundle: ModelBundle) -> dict[str, torch.Tensor]:
        return {f"unet::{ATTR}.{name}": p.detach().to("cpu").clone()
                for name, p in getattr(bundle.unet, ATTR).named_parameters()}

    def load_trainable_state(self, bundle: ModelBundle,
                             state: dict[str, torch.Tensor]) -> None:
        load_named_tensors(bundle, state, lambda name, p: name.startswith(f"{ATTR}."),
                           "network options (network.hypernetwork_layers or "
                           "hypernetwork_layer_norm?)")

    def file(self, config: TsuikaConfig, bundle: ModelBundle) -> HypernetworkFile:
        """The trained modules as a :class:`HypernetworkFile` (the modules' own tensors)."""
        net = config.network
        hn: Hypernetwork = getattr(bundle.unet, ATTR)
        modules: dict = {}
        for name, t in hn.named_file_tensors().items():
            dim, index, rest = name.split(".", 2)
            pair = modules.setdefault(int(dim), ({}, {}))
            pair[int(index)][rest] = t.detach()
        return HypernetworkFile(modules=modules,
                                layer_structure=parse_layer_structure(net.hypernetwork_layers),
                                activation_func=net.hypernetwork_activation,
                                is_layer_norm=net.hypernetwork_layer_norm,
                                use_dropout=net.hypernetwork_dropout)

    def companion_files(self, config: TsuikaConfig, bundle: ModelBundle, path,
                        metadata: dict[str, str], overwrite: bool) -> list:
        """Beside each saved safetensors file, the ``.pt`` ComfyUI's HypernetworkLoader and
        A1111 read (``formats.hypernetwork.write_comfy_pt``: plain data, weights_only), with
        the file's name and step from ``metadata``."""
        from ..formats.hypernetwork import write_comfy_pt

        hn = self.file(config, bundle)
        hn.metadata = dict(metadata)
        return [write_comfy_pt(path.with_suffix(".pt"), hn, overwrite=overwrite)]

    def export(self, config: TsuikaConfig, bundle: ModelBundle,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``"<dim>.<0|1>.linear.<i>.weight|bias"`` tensors (``formats.hypernetwork``)."""
        from ..formats.hypernetwork import flat_tensors

        return flat_tensors(self.file(config, bundle))

    def file_metadata(self, config: TsuikaConfig, bundle: ModelBundle,
                      metadata: dict[str, str]) -> dict[str, str]:
        """The run's metadata plus the options that rebuild the modules."""
        meta = dict(metadata)
        meta.update(options_metadata(self.file(config, bundle)))
        meta["modelspec.architecture"] = meta.get("modelspec.architecture", "") + "/hypernetwork"
        return meta
