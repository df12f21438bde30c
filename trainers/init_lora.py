"""Train on from an existing LoRA-family file (``network.init_lora``).

The file (any layout ``formats.lora_layouts.read_lora`` takes: kohya / LyCORIS, peft /
diffusers, ComfyUI) decides the network: its algorithm, rank, alpha, convolution rank and
alpha, whether the text encoder has adapters and, for LoKr, the factor replace the config's
values (each change is reported, never silent), and exactly its modules are adapted, each
with its own rank and alpha. The adapters then start from its weights, so step 0 of the run
is the file. A file that records its steps (``ss_steps``) has this run's steps counted on
top of them in the file written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import torch

from .config import ConfigError, NetworkConfig, TsuikaConfig
from .families.base import ModelBundle
from .formats.kohya import module_tensors_of
from .formats.lora_keys import ModuleIndex
from .formats.lora_layouts import read_lora
from .formats.lora_state import LohaWeights, LokrWeights, LoraStateDict, LoraWeights
from .methods.algorithms.base import ADAPTER, LayerTarget

log = logging.getLogger(__name__)


def init_lora_path(config: TsuikaConfig) -> Path:
    """``network.init_lora`` as an existing ``.safetensors`` file, or a clear error."""
    text = config.network.init_lora
    path = Path(text).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(f"network.init_lora = {text!r} is not an existing .safetensors LoRA "
                          "file; give the path of a LoRA file (or leave it empty to start "
                          "from fresh adapters).")
    return path


def read_init_lora(config: TsuikaConfig, bundle: ModelBundle) -> LoraStateDict:
    """The file named by ``network.init_lora``, read against the bundle's own modules.

    Args:
        config: the run's config (``network.init_lora`` set).
        bundle: the base model, before adapters are injected.
    """
    path = init_lora_path(config)
    ldm_map = None
    from .formats.ldm_unet_keys import LdmCheckpointError, unet_module_map

    try:  # ComfyUI-layout files name UNet modules the LDM way
        ldm_map = {ldm: ours for ours, ldm in unet_module_map(bundle.unet.config).items()}
    except (LdmCheckpointError, KeyError) as e:  # a UNet the SD1/SD2 tables do not describe
        log.debug("no LDM module map for this UNet (%s): ComfyUI-layout LoRAs unreadable", e)
    try:
        return read_lora(path, ModuleIndex.from_models(bundle.components),
                         ldm_to_diffusers_module_map=ldm_map)
    except ValueError as e:
        raise ConfigError(f"network.init_lora = {path.name!r} cannot be read for this model: "
                          f"{e}") from None


def _algorithm_of(lsd: LoraStateDict, bundle: ModelBundle) -> str:
    kinds = {type(w) for w in lsd.modules.values()}
    dora = {w.dora_scale is not None for w in lsd.modules.values()}
    if len(kinds) > 1 or len(dora) > 1:
        raise ConfigError("network.init_lora: the file mixes adapter kinds (LoRA / LoHa / LoKr, "
                          "with and without DoRA); Tsuika trains one algorithm per file.")
    kind = kinds.pop()
    if kind is LohaWeights:
        return "loha"
    if kind is LokrWeights:
        return "lokr"
    if dora.pop():
        return "dora"
    return "locon" if any(_is_conv3x3(bundle, c, p) for c, p in lsd.modules) else "lora"


def _is_conv3x3(bundle: ModelBundle, component: str, path: str) -> bool:
    module = bundle.components[component].get_submodule(path)
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def layer_target(weights) -> LayerTarget:
    """The rank and alpha that make peft build ``weights``' shapes and scale.

    A LoKr whose factors are both whole has no rank: its scale is 1, so rank = alpha (the
    convention LyCORIS writes and Tsuika's export follows).
    """
    rank = weights.rank
    if rank is None:
        rank = max(1, round(weights.alpha))
        return LayerTarget(rank, float(rank))
    return LayerTarget(int(rank), float(weights.alpha))


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0] if values else None


def _lokr_factor(lsd: LoraStateDict) -> int:
    """-1 when peft's automatic split gives the file's small factors, else their one size."""
    from peft.tuners.lokr.layer import factorization

    sizes = set()
    auto = True
    for w in lsd.modules.values():
        w1 = w.w1 if w.w1 is not None else w.w1_a @ w.w1_b
        w2 = w.w2 if w.w2 is not None else w.w2_a
        out = w1.shape[0] * w2.shape[0]
        auto = auto and factorization(out, -1)[0] == w1.shape[0]
        sizes.add(int(w1.shape[0]))
    if auto:
        return -1
    if len(sizes) != 1:
        raise ConfigError(f"network.init_lora: the LoKr file splits its layers by several "
                          f"factors ({sorted(sizes)}); Tsuika trains one network.lokr_factor.")
    return sizes.pop()


def adopt_init_lora(config: TsuikaConfig, bundle: ModelBundle) -> tuple[list[str], int]:
    """Make ``config.network`` describe the file; returns the notes saying what changed, and
    the steps the file records (0 when it records none).

    Args:
        config: the run's config; ``config.network`` is replaced by a validated copy.
        bundle: the base model, before adapters are injected.
    """
    lsd = read_init_lora(config, bundle)
    net = config.network
    algorithm = _algorithm_of(lsd, bundle)
    plain = [layer_target(w) for (c, p), w in lsd.modules.items() if not _is_conv3x3(bundle, c, p)]
    convs = [layer_target(w) for (c, p), w in lsd.modules.items() if _is_conv3x3(bundle, c, p)]
    want = {"algorithm": algorithm,
            "train_text_encoder": any(c != "unet" for c, _ in lsd.modules),
            "conv_rank": _most_common([t.rank for t in convs]) or 0}
    if plain:
        want["rank"] = _most_common([t.rank for t in plain])
        want["alpha"] = _most_common([t.alpha for t in plain])
    if convs:
        want["conv_alpha"] = _most_common([t.alpha for t in convs])
    want["lokr_factor"] = _lokr_factor(lsd) if algorithm == "lokr" else -1
    if algorithm in ("loha", "lokr"):
        want["dropout"] = 0.0  # they have no input dropout (check_options refuses one)
    name = Path(net.init_lora).name
    notes = [f"network.{k} = {getattr(net, k)!r} -> {v!r}: taken from network.init_lora "
             f"({name})" for k, v in want.items() if getattr(net, k) != v]
    config.network = NetworkConfig(**{**dataclasses.asdict(net), **want})
    steps = config_steps(lsd.metadata)
    notes.append(f"training on from {name}: {len(lsd.modules)} {algorithm} modules"
                 + (f", {steps} steps already trained (counted on in the file's ss_steps)"
                    if steps else ""))
    return notes, steps


def config_steps(metadata: dict) -> int:
    """The steps a file records in ``ss_steps`` (0 when absent or not a count)."""
    try:
        return max(0, int(str(metadata.get("ss_steps", "0"))))
    except ValueError:
        return 0


def file_targets(lsd: LoraStateDict, component: str) -> dict[str, LayerTarget]:
    """``{module path: LayerTarget}`` of the file's modules of ``component``."""
    return {p: layer_target(w) for (c, p), w in lsd.modules.items() if c == component}


def _parameter(layer: torch.nn.Module, suffix: str) -> torch.Tensor | None:
    """The adapted layer's parameter a file suffix holds (None: the layer has no such part)."""
    if suffix == "lora_down.weight":
        return layer.lora_A[ADAPTER].weight
    if suffix == "lora_up.weight":
        return layer.lora_B[ADAPTER].weight
    if suffix == "dora_scale":
        return layer.lora_magnitude_vector[ADAPTER].weight
    parts = getattr(layer, suffix, None)
    return parts[ADAPTER] if parts is not None and ADAPTER in parts else None


@torch.no_grad()
def load_init_weights(lsd: LoraStateDict, components: dict[str, torch.nn.Module]) -> int:
    """Copy the file's weights into the adapters injected for its modules; every shape is
    checked before the first copy. Returns the tensors copied.

    Args:
        lsd: the file, read against the same models.
        components: ``{component: adapted module}``.
    """
    copies = []
    for (comp, path), weights in lsd.modules.items():
        layer = components[comp].get_submodule(path)
        for suffix, tensor in module_tensors_of(weights).items():
            if suffix == "alpha":
                continue  # peft's scaling was built from the same alpha (file_targets)
            param = _parameter(layer, suffix)
            if suffix == "dora_scale" and isinstance(weights, LoraWeights) and param is not None:
                if tensor.shape[0] != param.numel():
                    raise ConfigError(f"network.init_lora: {comp}:{path} has a per-input-"
                                      f"channel dora_scale {tuple(tensor.shape)}; peft's DoRA "
                                      "trains one magnitude per output channel.")
                tensor = tensor.reshape(param.shape)
            if param is None or param.shape != tensor.shape:
                have = None if param is None else tuple(param.shape)
                raise ConfigError(f"network.init_lora: {comp}:{path} {suffix} "
                                  f"{tuple(tensor.shape)} does not fit the adapter built for "
                                  f"it ({have}); the file was made with settings Tsuika cannot "
                                  "rebuild.")
            copies.append((param, tensor))
    for param, tensor in copies:
        param.copy_(tensor.to(param.device, param.dtype))
    return len(copies)
