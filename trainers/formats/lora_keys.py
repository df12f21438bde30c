"""Kohya LoRA key names: the names ComfyUI, A1111/Forge and diffusers all map.

A kohya name is a component prefix plus the module path with every ``.`` turned into ``_``
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``). Module names
themselves contain ``_`` (``to_q``, ``transformer_blocks``), so a kohya name cannot be split
back into a path by rule: the inverse works by flattening every module path of the real model
and looking the name up (:func:`flat_index`, :class:`ModuleIndex`).

Text encoders: every loader expects ``lora_te_text_model_encoder_...`` but transformers 5's
``CLIPTextModel`` has no ``text_model`` level (``encoder.layers.0.self_attn.q_proj``), so the
``text_model.`` part is written explicitly when the path lacks it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class LoraKeyError(ValueError):
    """A LoRA module name that does not match the model (or a bad component)."""


@dataclass(frozen=True)
class ComponentKeys:
    """How one model component is named in kohya files.

    Attributes:
        prefix: kohya name prefix (``lora_unet_``).
        root: module-path root the loaders expect but the model may lack (``text_model.``
            for CLIP text encoders, since transformers 5 dropped that level); empty for none.
    """

    prefix: str
    root: str = ""


# One row per component. SDXL's two text encoders are ``lora_te1_`` / ``lora_te2_`` (both
# CLIP, both written with ``text_model_``, as kohya and ComfyUI name them).
COMPONENTS: dict[str, ComponentKeys] = {
    "unet": ComponentKeys("lora_unet_"),
    "text_encoder": ComponentKeys("lora_te_", root="text_model."),
    "text_encoder_1": ComponentKeys("lora_te1_", root="text_model."),
    "text_encoder_2": ComponentKeys("lora_te2_", root="text_model."),
}
PREFIXES = {name: keys.prefix for name, keys in COMPONENTS.items()}
# Layouts that name a one-encoder family's encoder and the first of SDXL's pair alike
# (ComfyUI's clip_l, diffusers' text_encoder.): with two encoders it is text_encoder_1.
PAIR = {"text_encoder": "text_encoder_1"}


def two_encoders(keys, module_index: ModuleIndex | None, marker: str) -> bool:
    """Whether a LoRA is for a two-encoder family: its keys name the second encoder
    (start with ``marker``), or the model it is read for has ``text_encoder_1``."""
    return any(k.startswith(marker) for k in keys) or (
        module_index is not None and "text_encoder_1" in module_index.components)


def component_keys(component: str) -> ComponentKeys:
    """The :class:`ComponentKeys` row of ``component``; a clear error for an unknown one."""
    try:
        return COMPONENTS[component]
    except KeyError:
        raise LoraKeyError(f"unknown LoRA component {component!r}; known components: "
                           f"{', '.join(COMPONENTS)}.") from None


def component_of_kohya_name(name: str) -> str | None:
    """The component whose prefix starts ``name`` (``lora_te1_`` is not ``lora_te_``), or None."""
    for component, keys in COMPONENTS.items():
        if name.startswith(keys.prefix):
            return component
    return None


def kohya_name(component: str, module_path: str) -> str:
    """``lora_unet_down_blocks_0_..._to_q`` for a module path of ``component``.

    Args:
        component: a key of :data:`COMPONENTS` (``"unet"``, ``"text_encoder"``).
        module_path: the module's dotted path in the diffusers / transformers model
            (``"encoder.layers.0.self_attn.q_proj"``); the component root (``text_model.``)
            is added when missing.
    """
    keys = component_keys(component)
    if not module_path or module_path.startswith(".") or module_path.endswith("."):
        raise LoraKeyError(f"module path {module_path!r} of {component} is not a dotted module "
                           "path like 'down_blocks.0.attentions.0.proj_in'.")
    if keys.root and not module_path.startswith(keys.root):
        module_path = keys.root + module_path
    return keys.prefix + module_path.replace(".", "_")


def canonical_path(component: str, module_path: str) -> str:
    """``module_path`` without the component root (the transformers 5 form of a CLIP path).

    Used where no model is at hand to say which form it has; with a model, use
    :meth:`ModuleIndex.resolve`.
    """
    root = component_keys(component).root
    return module_path[len(root):] if root and module_path.startswith(root) else module_path


def _is_adapter_internal(segment: str) -> bool:
    # peft wraps a targeted layer: <path>.base_layer, <path>.lora_A.default, lora_dropout ...
    return segment.startswith("lora_") or segment == "base_layer"


def module_paths_of(model) -> list[str]:
    """Module paths of ``model`` as the un-adapted model names them.

    peft-injected internals (``.base_layer``, ``.lora_A.default`` ...) are folded back onto
    the wrapped layer and a ``PeftModel``'s ``base_model.model.`` prefix is removed, so a
    model with adapters gives the same paths as the plain model.

    Args:
        model: a ``torch.nn.Module``.
    """
    paths: dict[str, None] = {}
    for name, _ in model.named_modules():
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):]
        elif name in ("base_model", "base_model.model"):
            continue
        kept = []
        for segment in name.split("."):
            if _is_adapter_internal(segment):
                break
            kept.append(segment)
        path = ".".join(kept)
        if path:
            paths[path] = None
    return list(paths)


def flat_index(component: str, module_paths: Iterable[str]) -> dict[str, str]:
    """``{kohya name: module path}`` for every module path of one component.

    Args:
        component: a key of :data:`COMPONENTS`.
        module_paths: dotted module paths of the real model (see :func:`module_paths_of`).

    Raises:
        LoraKeyError: two paths flatten to the same kohya name (the name would be ambiguous).
    """
    index: dict[str, str] = {}
    for path in module_paths:
        name = kohya_name(component, path)
        other = index.setdefault(name, path)
        if other != path:
            raise LoraKeyError(f"module paths {other!r} and {path!r} of {component} both flatten "
                               f"to the kohya name {name!r}; such a model cannot be named in "
                               "kohya format.")
    return index


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" Closest names in the model: {', '.join(close)}." if close else ""


def module_path_from_kohya(name: str, module_paths_by_flat_name: Mapping[str, str]) -> str:
    """The module path a kohya name refers to, found in a :func:`flat_index`.

    Args:
        name: kohya module name (no ``.lora_down.weight`` suffix).
        module_paths_by_flat_name: ``{kohya name: module path}`` built from the model.

    Raises:
        LoraKeyError: the model has no module of that name.
    """
    try:
        return module_paths_by_flat_name[name]
    except KeyError:
        raise LoraKeyError(f"LoRA module {name!r} matches no module of the model; the LoRA was "
                           "made for a different model or architecture."
                           + _suggest(name, module_paths_by_flat_name)) from None


class ModuleIndex:
    """The module paths of a model's components, for naming and un-naming LoRA modules.

    Args:
        paths_by_component: ``{component: module paths}``; build one from live models with
            :meth:`from_models`.
    """

    def __init__(self, paths_by_component: Mapping[str, Iterable[str]]):
        self._paths = {c: frozenset(p) for c, p in paths_by_component.items()}
        self._by_kohya: dict[str, tuple[str, str]] = {}
        for component, paths in self._paths.items():
            for name, path in flat_index(component, paths).items():
                self._by_kohya[name] = (component, path)

    @classmethod
    def from_models(cls, models: Mapping[str, object]) -> ModuleIndex:
        """Index ``{component: torch module}`` (with or without peft adapters injected)."""
        return cls({component: module_paths_of(model) for component, model in models.items()})

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self._paths)

    def paths(self, component: str) -> frozenset[str]:
        """Module paths of ``component``; a clear error when the index lacks it."""
        if component not in self._paths:
            raise LoraKeyError(f"the LoRA has {component} modules but no {component} model was "
                               f"given (indexed components: {', '.join(self._paths) or 'none'}); "
                               f"pass the {component} too.")
        return self._paths[component]

    def resolve(self, component: str, module_path: str) -> str:
        """The model's own spelling of ``module_path`` (adds or drops the ``text_model.`` root).

        Raises:
            LoraKeyError: the model has no such module.
        """
        paths = self.paths(component)
        if module_path in paths:
            return module_path
        root = component_keys(component).root
        if root:
            other = module_path[len(root):] if module_path.startswith(root) else root + module_path
            if other in paths:
                return other
        raise LoraKeyError(f"LoRA module {module_path!r} matches no {component} module; the "
                           "LoRA was made for a different model or architecture."
                           + _suggest(module_path, paths))

    def from_kohya(self, name: str) -> tuple[str, str]:
        """``(component, module path)`` of a kohya module name."""
        component = component_of_kohya_name(name)
        if component is None:
            raise LoraKeyError(f"{name!r} is not a kohya LoRA name; kohya names start with one "
                               f"of: {', '.join(PREFIXES.values())}.")
        self.paths(component)  # names the missing component clearly
        if name in self._by_kohya:
            return self._by_kohya[name]
        same = {k: p for k, (c, p) in self._by_kohya.items() if c == component}
        return component, module_path_from_kohya(name, same)  # raises with suggestions
