"""Building a validated config from a TOML document, ``section.key=value`` overrides, or a
changed copy of another config: every value is converted to its field's type or refused."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from .fields import ConfigError
from .schema import CONFIG_VERSION, SECTIONS, TsuikaConfig, _field


def _coerce(name: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or say why not."""
    kind = f.type if isinstance(f.type, type) else eval(f.type, vars(typing), {})  # noqa: S307
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is list:
        if isinstance(value, (list, str)):
            return parse_list(name, value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{name} = {value!r} is not a valid {kind.__name__}.")


LIST_SEPARATORS = ("\n", "|")


def parse_list(name: str, value: Any) -> list[str]:
    """A list option (``sample.prompts``) from a TOML list or from text: the one syntax every
    path uses. Text holds one item per line, or items separated by ``|`` (what fits on a
    command line); items are stripped and empty ones dropped.

    Args:
        name: the option's ``section.key`` (named in errors).
        value: a list of strings, or text.
    """
    if isinstance(value, str):
        for sep in LIST_SEPARATORS[1:]:
            value = value.replace(sep, LIST_SEPARATORS[0])
        value = value.split(LIST_SEPARATORS[0])
    if not isinstance(value, list):
        raise ConfigError(f"{name} = {value!r} is not a list; give one item per line or "
                          "separate them with '|'.")
    items = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{name}: item {item!r} is not text; quote it.")
        if item.strip():
            items.append(item.strip())
    return items


def build_config(values: dict[str, dict[str, Any]] | None = None,
                 overrides: list[str] | None = None) -> TsuikaConfig:
    """Build a validated config from nested values (a TOML document) and ``a.b=value`` strings.

    Args:
        values: ``{"train": {"steps": 100}, ...}``; unknown sections or keys are an error.
        overrides: ``["train.steps=100", ...]`` applied after ``values``.
    """
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, entries in (values or {}).items():
        if section == "version":
            if entries != CONFIG_VERSION:
                raise ConfigError(f"config version {entries!r} is not supported; this Tsuika "
                                  f"reads version {CONFIG_VERSION}.")
            continue
        if section not in SECTIONS or not isinstance(entries, dict):
            raise ConfigError(f"unknown config section {section!r}; valid sections are: "
                              f"{', '.join(SECTIONS)}.")
        for key, value in entries.items():
            merged[section][key] = _coerce(f"{section}.{key}", _field(section, key), value)
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        if not sep or "." not in name:
            raise ConfigError(f"override {item!r} must look like section.key=value, "
                              "e.g. train.steps=200.")
        section, key = name.strip().split(".", 1)
        merged[section][key] = _coerce(name, _field(section, key), raw.strip())
    return TsuikaConfig(**{s: SECTIONS[s](**merged[s]) for s in SECTIONS})


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TsuikaConfig:
    """Read a TOML config file (optional) and apply ``section.key=value`` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; check the path.")
        try:
            values = tomllib.loads(p.read_text(encoding="utf-8-sig"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}.") from e
    return build_config(values, overrides)


def replace(config: TsuikaConfig, **sections: dict[str, Any]) -> TsuikaConfig:
    """A copy of ``config`` with some ``section={key: value}`` changed (validated again)."""
    values = config.to_dict()
    values.pop("version")
    for section, entries in sections.items():
        values[section].update(entries)
    return build_config(values)
