"""Bad option values a careless user or an attacker gives: refused at validation, by name.

Rows come from the config's own field list: a float option added later is covered here
without editing this file.
"""

from __future__ import annotations

import dataclasses

import pytest

from tsuika.trainers.config import (
    MAX_NAME_BYTES,
    MAX_SEED,
    SECTIONS,
    ConfigError,
    build_config,
)

FLOAT_OPTIONS = [f"{s}.{f.name}" for s, cls in SECTIONS.items()
                 for f in dataclasses.fields(cls) if f.type in (float, "float")]


def test_the_float_options_named_in_the_issue_are_all_rows():
    for name in ("train.learning_rate", "network.alpha", "train.max_grad_norm",
                 "train.noise_offset", "train.min_snr_gamma"):
        assert name in FLOAT_OPTIONS


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "+inf"])
@pytest.mark.parametrize("option", FLOAT_OPTIONS)
def test_non_finite_floats_are_refused_on_the_command_line(option, value):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=[f"{option}={value}"])
    assert option in str(e.value) and "finite" in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("option", FLOAT_OPTIONS)
def test_non_finite_floats_are_refused_from_toml_values(option, value):
    # What a TOML file (nan/inf literals) or a node's typed values hand to build_config.
    section, key = option.split(".")
    with pytest.raises(ConfigError, match="finite"):
        build_config({section: {key: value}})


@pytest.mark.parametrize("option", ["train.seed", "sample.seed"])
def test_seeds_outside_what_torch_takes_are_refused(option):
    limit = MAX_SEED if option == "train.seed" else 2**63 - 1
    assert getattr(build_config(overrides=[f"{option}={limit}"]),
                   option.split(".")[0]).seed == limit
    for bad in (limit + 1, 2**64, -1):
        with pytest.raises(ConfigError) as e:
            build_config(overrides=[f"{option}={bad}"])
        assert option in str(e.value) and str(bad) in str(e.value)


def test_the_largest_train_seed_still_seeds_every_generator():
    import torch

    cfg = build_config(overrides=[f"train.seed={MAX_SEED}", "train.steps=10000000",
                                  "train.gradient_accumulation=1024"])
    # The loop's largest derived seed: class-image stream of the last micro-batch, with a
    # generous allowance for processes.
    m = cfg.train.steps * cfg.train.gradient_accumulation * 4096
    torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + m + (1 << 40))


@pytest.mark.parametrize("name, words", [
    ("a\nb", "control"), ("tab\there", "control"), ("bell\x07", "control"),
    (".hidden", "dot"), ("x" * (MAX_NAME_BYTES + 1), "bytes"),
    ("é" * (MAX_NAME_BYTES // 2 + 1), "bytes"),  # 2 bytes each in UTF-8
    ("../escape", "plain file name"), ("a/b", "plain file name"), ("", "plain file name"),
])
def test_bad_output_names_are_refused(name, words):
    with pytest.raises(ConfigError) as e:
        build_config({"output": {"name": name}})
    assert "output.name" in str(e.value) and words in str(e.value)


def test_ordinary_output_names_still_pass():
    for name in ("my_lora", "キャラ-v2", "x" * MAX_NAME_BYTES, "a.b"):
        assert build_config({"output": {"name": name}}).output.name == name
