"""What every config section is built from: ``opt`` (a field with its help text and limits),
the per-field check, the ``_Section`` base that runs it, and ``ConfigError``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """An option has a bad value, or an unknown option was given."""


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, factory: Any = None) -> Any:
    """A config field with its help text and limits (read by validation, CLI help, nodes).

    ``choices`` is a tuple, or a registry's ``choices()`` (read when validating, so the
    registry is the one list of methods, algorithms and families)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _check_field(section: str, f: dataclasses.Field, value: Any) -> None:
    name = f"{section}.{f.name}"
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name} = {value!r} is not a valid choice; use one of: "
                          f"{', '.join(map(str, meta['choices']))}.")
    if isinstance(value, float) and not math.isfinite(value):
        # NaN fails every < and > test, so the range checks below would let it through.
        limits = [f"{k} {meta[k]}" for k in ("min", "max") if meta.get(k) is not None]
        raise ConfigError(f"{name} = {value!r} is not a finite number; give a real number"
                          + (f" ({', '.join(limits)})." if limits else "."))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{name} = {value!r} is below its minimum {meta['min']}; "
                              f"set it to at least {meta['min']}.")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{name} = {value!r} is above its maximum {meta['max']}; "
                              f"set it to at most {meta['max']}.")


class _Section:
    """Validates every field's choices and range after construction."""

    SECTION = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(self.SECTION, f, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:  # cross-field rules, overridden per section
        pass
