"""The kohya / LyCORIS layout: ``lora_unet_<path_with_underscores>.<suffix>``, and its one writer.

Every kohya-named file Tsuika writes goes through :func:`kohya_tensors` (the training export
included), so the name-collision check cannot be skipped. An algorithm gives each module's
tensors by suffix (:func:`lora_module_tensors` for LoRA / LoCon); the writer names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .lora_keys import ModuleIndex, component_of_kohya_name, flat_index, kohya_name
from .lora_state import (
    LYCORIS_SUFFIXES,
    KeyPool,
    LohaWeights,
    LokrWeights,
    LoraFormatError,
    LoraStateDict,
    LoraWeights,
    ModuleWeights,
    assemble,
    normalise_ldm_map,
    refuse_unsupported,
    split_key,
)

# kohya suffix -> role of a LoRA / LoCon module's tensors.
LORA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def lora_module_tensors(down: torch.Tensor, up: torch.Tensor,
                        alpha: float) -> dict[str, torch.Tensor]:
    """One LoRA module's tensors by kohya suffix.

    Args:
        down: ``(rank, in)`` or ``(rank, in, kh, kw)``, already in the file's dtype.
        up: ``(out, rank)`` or ``(out, rank, 1, 1)``.
        alpha: the trained alpha (scale = alpha / rank); written float32 so an alpha like
            0.1 survives an fp16 file (the loaders read it with ``.item()``).
    """
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def module_tensors_of(weights: ModuleWeights) -> dict[str, torch.Tensor]:
    """One module's canonical weights by kohya / LyCORIS suffix (what :func:`kohya_tensors`
    names): ``lora_down.weight`` ... for LoRA, ``hada_w1_a`` ... for LoHa, ``lokr_w1`` /
    ``lokr_w2_a`` ... for LoKr, plus ``dora_scale`` when the module has one.

    Args:
        weights: a ``LoraWeights``, ``LohaWeights`` or ``LokrWeights``; tensors are written as
            they are (convert their dtype first), alpha float32.
    """
    if isinstance(weights, LoraWeights):
        out = lora_module_tensors(weights.down, weights.up, weights.alpha)
    elif isinstance(weights, LohaWeights):
        out = {f"hada_{n}": getattr(weights, n).contiguous()
               for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
    elif isinstance(weights, LokrWeights):
        out = {f"lokr_{n}": t.contiguous() for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
               if (t := getattr(weights, n)) is not None}
    else:
        raise LoraFormatError(f"no kohya layout for {type(weights).__name__}.")
    out["alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
    if weights.dora_scale is not None:
        out["dora_scale"] = weights.dora_scale.contiguous()
    return out


def kohya_tensors(modules: Mapping[tuple[str, str], Mapping[str, torch.Tensor]]
                  ) -> dict[str, torch.Tensor]:
    """``{<kohya name>.<suffix>: tensor}`` for ``{(component, module path): {suffix: tensor}}``.

    Args:
        modules: each module's tensors by suffix (``lora_down.weight``, ``alpha``,
            ``hada_w1_a`` ...), module paths as the diffusers / transformers model names them.

    Raises:
        LoraFormatError: two modules get the same kohya name (``a_b.c`` and ``a.b_c``).
    """
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[str, tuple[str, str]] = {}
    for (component, path), parts in sorted(modules.items()):
        name = kohya_name(component, path)
        if owner.setdefault(name, (component, path)) != (component, path):
            raise LoraFormatError(f"modules {owner[name]} and {(component, path)} both get "
                                  f"the kohya name {name!r}.")
        for suffix, tensor in parts.items():
            tensors[f"{name}.{suffix}"] = tensor
    return tensors


class KohyaFormat:
    """``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
    and the LyCORIS suffixes on the same names (``hada_*``, ``lokr_*``, ``dora_scale``)."""

    name = "kohya"
    _SUFFIXES = {**{f".{suffix}": role for suffix, role in LORA_SUFFIXES.items()},
                 **LYCORIS_SUFFIXES}

    def detect(self, keys: Iterable[str]) -> bool:
        return any(component_of_kohya_name(k) is not None for k in keys)

    def read(self, tensors, metadata=None, module_index: ModuleIndex | None = None, *,
             ldm_to_diffusers_module_map=None, **_unused) -> LoraStateDict:
        if module_index is None:
            raise LoraFormatError("reading a kohya LoRA needs the model's module paths ('_' in "
                                  "kohya names is ambiguous): pass module_index="
                                  "ModuleIndex.from_models({'unet': unet, 'text_encoder': te}).")
        refuse_unsupported(tensors, self.name)
        pool = KeyPool(tensors, self.name)
        ldm_map = normalise_ldm_map(ldm_to_diffusers_module_map) or {}
        ldm_names = flat_index("unet", ldm_map)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for key in tensors:
            split = split_key(key, self._SUFFIXES)
            if split is None or component_of_kohya_name(split[0]) is None:
                continue
            name, role = split
            if name in ldm_names:  # kohya names in LDM module naming (lora_unet_input_blocks_)
                component = "unet"
                path = module_index.resolve("unet", ldm_map[ldm_names[name]])
            else:
                component, path = module_index.from_kohya(name)
            groups.setdefault((component, path), {})[role] = key
        lsd = LoraStateDict(metadata=dict(metadata or {}))
        assemble(pool, groups, lsd, self.name)
        pool.finish()
        return lsd
