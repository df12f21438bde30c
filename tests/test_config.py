import pytest

from tsuika.trainers.config import ConfigError, build_config, load_config, option_help, option_names


def test_issue_option_names_exist():
    for name in ["model.path", "data.dir", "data.resolution", "train.steps", "train.seed",
                 "train.learning_rate", "network.rank", "network.alpha", "output.dir"]:
        assert name in option_names()
        assert option_help(name)


def test_overrides_are_typed():
    c = build_config(overrides=["train.steps=12", "train.learning_rate=3e-4",
                                "data.flip=true", "sample.prompts=a cat | a dog"])
    assert c.train.steps == 12 and isinstance(c.train.steps, int)
    assert c.train.learning_rate == pytest.approx(3e-4)
    assert c.data.flip is True
    assert c.sample.prompts == ["a cat", "a dog"]


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["train.stepz=3"])
    assert "train.stepz" in str(e.value) and "train.steps" in str(e.value)


@pytest.mark.parametrize("override, words", [
    ("network.rank=0", ["network.rank", "0", "at least 1"]),
    ("train.steps=abc", ["train.steps", "abc"]),
    ("data.crop=diagonal", ["data.crop", "center", "random"]),
    ("output.name=../x", ["output.name", "../x"]),
    ("train.mixed_precision=fp8", ["train.mixed_precision", "bf16"]),
])
def test_bad_values_name_option_value_and_fix(override, words):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=[override])
    for w in words:
        assert w in str(e.value)


def test_toml_file_and_unknown_section(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nsteps = 7\n[network]\nrank = 2\nalpha = 1.0\n', encoding="utf-8")
    c = load_config(p, ["train.steps=9"])
    assert (c.train.steps, c.network.rank) == (9, 2)
    p.write_text('[trian]\nsteps = 7\n')
    with pytest.raises(ConfigError, match="trian"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
