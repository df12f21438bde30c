"""The registries are the one list of methods, LoRA algorithms and families: validated when
something registers, and the config's choices (so the nodes' combos and the CLI) read them."""

from __future__ import annotations

import dataclasses

import pytest

from tsuika.trainers.config import SECTIONS, ConfigError, build_config
from tsuika.trainers.registry import ALGORITHMS, FAMILIES, METHODS, Registry, RegistryError

# option -> (registry, fixed choices listed before the registered names)
REGISTRY_OPTIONS = {"network.method": (METHODS, ()), "network.algorithm": (ALGORITHMS, ()),
                    "model.family": (FAMILIES, ("auto",))}


def _choices(option: str) -> list:
    section, key = option.split(".")
    field = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == key)
    return list(field.metadata["choices"])


@pytest.mark.parametrize("option", REGISTRY_OPTIONS)
def test_config_choices_are_the_registry(option):
    registry, fixed = REGISTRY_OPTIONS[option]
    assert _choices(option) == [*fixed, *registry.names()]
    assert registry.names(), f"nothing registered for {option}"


def test_the_built_in_entries_are_registered():
    assert {"lora", "dreambooth"} <= set(METHODS.names())
    assert {"lora", "locon"} <= set(ALGORITHMS.names())
    assert "sd15" in FAMILIES.names()


@pytest.mark.parametrize("registry", [METHODS, ALGORITHMS, FAMILIES], ids=lambda r: r.kind)
def test_a_second_entry_under_a_taken_name_is_refused_naming_it(registry):
    taken = registry.names()[0]
    clone = type(registry.get(taken))()
    with pytest.raises(RegistryError, match=f"'{taken}' is registered twice"):
        registry.register(clone)
    assert registry.get(taken) is not clone


def test_malformed_entries_are_refused_with_what_is_wrong():
    class Half:
        name = "half"
        trains_base_weights = False

    with pytest.raises(RegistryError, match="'half'.*lacks validate, prepare"):
        METHODS.register(Half())

    class BadName(Half):
        name = "Two Words"

    with pytest.raises(RegistryError, match="lowercase.*'Two Words'"):
        METHODS.register(BadName())
    assert "half" not in METHODS and "Two Words" not in METHODS


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match="network.algorithm = 'loha'.*lora, locon"):
        build_config(overrides=["network.algorithm=loha"])
    with pytest.raises(RegistryError, match="model.family = 'flux'.*known families: sd15, sdxl"):
        FAMILIES.get("flux")
    with pytest.raises(RegistryError, match="no method is registered as 'nope'"):
        METHODS.unregister("nope")


def test_a_registry_fills_itself_from_its_home_on_first_use():
    class Entry:
        name = "only"

    fresh = Registry("thing", "x.thing", required=(), home=".registry")
    assert fresh.names() == ()  # the home imported, registered nothing: empty, no error
    fresh.register(Entry())
    assert list(fresh.choices("auto")) == ["auto", "only"] and "only" in fresh.choices()


@pytest.mark.parametrize("overrides, words", [
    (["network.conv_rank=8"], ["network.conv_rank = 8", "network.algorithm = 'locon'"]),
    (["network.algorithm=locon"], ["network.algorithm = 'locon'", "network.conv_rank"]),
])
def test_algorithm_options_are_checked_by_the_algorithm(overrides, words):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=overrides)
    for w in words:
        assert w in str(e.value)


def test_algorithm_options_do_not_bind_methods_without_algorithms():
    c = build_config(overrides=["network.method=dreambooth", "network.conv_rank=8"])
    assert c.network.conv_rank == 8
    c = build_config(overrides=["network.algorithm=locon", "network.conv_rank=8"])
    assert (c.network.algorithm, c.network.conv_rank) == ("locon", 8)
