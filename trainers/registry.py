"""The registries: the one list of each kind of plug-in (methods, LoRA algorithms, families).

Each plug-in is registered once, by one explicit line in its package's ``__init__``
(``METHODS.register(LoraMethod())``); nothing scans directories. Registration is validated: a
name must be a plain lowercase identifier, an entry must have the attributes its kind needs,
and a second entry under a taken name is refused, naming both.

The config's choices (``network.method``, ``network.algorithm``, ``model.family``) and so the
nodes' combos and the CLI's help are read from here. This module imports nothing heavy, so
``config`` can name a registry at import time; the registry fills itself on first use by
importing its home package (which imports ``config``: resolving lazily breaks that circle).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from typing import Any

_NAME = re.compile(r"[a-z][a-z0-9_]*")


class RegistryError(ValueError):
    """A bad registration, or a name nothing is registered under."""


class Registry:
    """Named plug-ins of one kind, in registration order.

    Args:
        kind: what an entry is, for messages (``"method"``); ``plural`` if not kind + "s".
        option: the config option that picks one (``"network.method"``).
        required: attributes every entry must have (checked at registration).
        home: the module whose import registers the built-in entries (relative to this
            package, e.g. ``".methods"``).
    """

    def __init__(self, kind: str, option: str, required: tuple[str, ...], home: str,
                 plural: str = ""):
        self.kind = kind
        self.plural = plural or kind + "s"
        self.option = option
        self.required = required
        self.home = home
        self._entries: dict[str, Any] = {}
        self._loaded = False

    def register(self, entry: Any) -> Any:
        """Add ``entry`` under ``entry.name``; returns it.

        Raises:
            RegistryError: the name is not a lowercase identifier, an attribute the kind
                needs is missing, or the name is taken.
        """
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RegistryError(f"a {self.kind} needs a name of lowercase letters, digits and "
                                f"'_' (it becomes a {self.option} choice); "
                                f"{type(entry).__qualname__} has name = {name!r}.")
        missing = [a for a in self.required if not hasattr(entry, a)]
        if missing:
            raise RegistryError(f"{self.kind} {name!r} ({type(entry).__qualname__}) lacks "
                                f"{', '.join(missing)}; every {self.kind} must provide: "
                                f"{', '.join(self.required)}.")
        if name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is registered twice (by "
                                f"{type(self._entries[name]).__qualname__} and "
                                f"{type(entry).__qualname__}); give the new one another name.")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> Any:
        """Remove and return the entry called ``name`` (plug-ins and tests that add one)."""
        self._load()
        if name not in self._entries:
            raise RegistryError(f"no {self.kind} is registered as {name!r}.")
        return self._entries.pop(name)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before the import: the home module registers into us
        try:
            importlib.import_module(self.home, __package__)
        except BaseException:
            self._loaded = False
            raise

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        self._load()
        return tuple(self._entries)

    def get(self, name: str) -> Any:
        """The entry called ``name``; a clear error lists the known ones."""
        self._load()
        if name not in self._entries:
            raise RegistryError(f"{self.option} = {name!r} is not supported; known "
                                f"{self.plural}: {', '.join(self._entries)}.")
        return self._entries[name]

    def items(self) -> list[tuple[str, Any]]:
        self._load()
        return list(self._entries.items())

    def values(self) -> list[Any]:
        self._load()
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def choices(self, *fixed: str) -> Choices:
        """The option's choices: ``fixed`` ones (``"auto"``) first, then every name."""
        return Choices(self, fixed)


class Choices:
    """A config field's choices read from a registry when asked, not when ``config`` loads."""

    def __init__(self, registry: Registry, fixed: tuple[str, ...] = ()):
        self.registry = registry
        self.fixed = fixed

    def __iter__(self) -> Iterator[str]:
        return iter(self.fixed + self.registry.names())

    def __contains__(self, value: object) -> bool:
        return value in self.fixed or value in self.registry

    def __len__(self) -> int:
        return len(self.fixed) + len(self.registry)

    def __repr__(self) -> str:
        return f"Choices({', '.join(self)})"

    def describe(self) -> str:
        """``'lora': <summary>; ...`` from the entries that have a ``summary`` (help text)."""
        parts = [f"'{name}': {entry.summary}" for name, entry in self.registry.items()
                 if getattr(entry, "summary", "")]
        return "; ".join(parts) + "." if parts else ""


METHODS = Registry("method", "network.method", home=".methods", required=(
    "trains_base_weights", "validate", "prepare", "trains_text_encoder", "trainable_state",
    "load_trainable_state", "export", "file_metadata"))
ALGORITHMS = Registry("LoRA algorithm", "network.algorithm", home=".methods.algorithms",
                      required=("layer_types", "check_options", "targets", "peft_config",
                                "is_trained", "adapted_layers", "module_tensors"))
FAMILIES = Registry("family", "model.family", home=".families", plural="families",
                    required=("detect", "load", "encode_text", "predict", "facts",
                              "bundle_from_ldm"))

__all__ = ["ALGORITHMS", "FAMILIES", "METHODS", "Choices", "Registry", "RegistryError"]
