"""The node side's pure helpers (no ComfyUI needed): allowed folders, plain names, widget
names and the /prompt checks in widget words, node reports, and the config policies the nodes
and the CLI share (alpha = rank / 2, one list syntax)."""

import dataclasses
import math
import os

import pytest

from tsuika.nodes import options, paths, reports, validation
from tsuika.nodes.validation import InputRefused
from tsuika.trainers.config import SECTIONS, ConfigError, build_config, load_config

# --------------------------------------------------------------------------- allowed folders


@pytest.fixture
def server(tmp_path):
    """An input folder with a dataset, a secret folder outside, and links pointing out."""
    inputs, secret = tmp_path / "input", tmp_path / "secret"
    (inputs / "mine").mkdir(parents=True)
    (secret / "stuff").mkdir(parents=True)
    os.symlink(secret, inputs / "link_out")
    return inputs, secret


def _resolve(text, inputs, extra=()):
    return paths.resolve_input_folder("folder", text, [inputs, *extra], [inputs])


def test_a_folder_inside_the_input_folder_is_found_by_name(server):
    inputs, _ = server
    assert _resolve("mine", inputs) == (inputs / "mine").resolve()
    assert _resolve(str(inputs / "mine"), inputs) == (inputs / "mine").resolve()


@pytest.mark.parametrize("text", ["{secret}", "{secret}/stuff", "{secret}/missing",
                                  "/no/such/place", "../secret/stuff", "../secret/missing",
                                  "link_out", "link_out/stuff", "mine/../../secret",
                                  "a\x00b"])
def test_every_path_outside_gets_the_same_answer_existing_or_not(server, text):
    inputs, secret = server
    text = text.format(secret=secret)
    with pytest.raises(paths.PathRefused) as e:
        _resolve(text, inputs)
    assert str(e.value) == paths.refusal("folder", text)
    assert str(secret) not in str(e.value).replace(text, "")  # names no server path


def test_the_owner_allow_list_opens_a_folder_outside(server):
    inputs, secret = server
    assert _resolve(str(secret / "stuff"), inputs, extra=[secret]) == (secret / "stuff").resolve()


def test_a_missing_folder_inside_is_named_as_missing(server):
    inputs, _ = server
    with pytest.raises(paths.PathRefused, match="'nope' does not exist"):
        _resolve("nope", inputs)
    with pytest.raises(paths.PathRefused, match="is empty"):
        _resolve("  ", inputs)


def test_links_inside_a_dataset_that_point_out_are_found(server):
    inputs, secret = server
    (secret / "stuff" / "a.png").write_bytes(b"x")
    os.symlink(secret / "stuff" / "a.png", inputs / "mine" / "a.png")
    (inputs / "mine" / "b.png").write_bytes(b"x")
    outside = paths.files_outside([inputs / "mine" / "a.png", inputs / "mine" / "b.png"],
                                  [inputs])
    assert outside == [inputs / "mine" / "a.png"]


# ------------------------------------------------------------------------------ plain names

@pytest.mark.parametrize("name,why", [
    ("../../x", "folder separator"), ("..", "starts with a dot"), ("a/b", "folder separator"),
    ("a\\b", "folder separator"), (".hidden", "starts with a dot"), ("", "is empty"),
    ("bad\x07name", "control character"), ("x" * 201, "too long"), (" x", "space"),
    ("a:b", "file systems refuse"), ("con", "Windows reserves"), ("x.", "ends with a dot")])
def test_names_that_are_not_plain_file_names_are_refused_with_the_reason(name, why):
    assert why in validation.plain_name_problem(name)
    with pytest.raises(InputRefused, match="filename"):
        validation.check_plain_name("filename", name)


@pytest.mark.parametrize("name", ["my_lora", "heart v2", "ハート", "a.b-c_d"])
def test_plain_names_pass_unchanged(name):
    assert validation.plain_name_problem(name) is None


# --------------------------------------------------------------------------- widget names

def test_every_shown_option_has_one_widget_name_and_every_field_is_placed():
    names = options.widget_names()
    assert len(set(names.values())) == len(names)  # one name per option, no clashes
    assert names["train.steps"] == "steps" and names["sample.steps"] == "sample_steps"
    assert names["train.seed"] == "training_seed" and names["sample.seed"] == "sample_seed"
    assert "seed" not in names.values()  # the frontend would randomize it after each queue
    every = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(names) | options.HIDDEN == every  # shown, or hidden on purpose
    assert not set(names) & options.HIDDEN


def test_options_nodes_follow_field_order_so_new_fields_come_last():
    for _, _, section in options.OPTION_NODES:
        order = [f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section])]
        shown = options.section_options(section)
        assert shown == [o for o in order if o in shown]


def test_widget_specs_take_limits_defaults_and_help_from_the_config():
    rank = options.widget_spec("network.rank")
    assert (rank["max"], rank["default"]) == (1024, 16)
    assert rank["tooltip"].startswith("LoRA rank")
    assert options.widget_spec("train.steps")["default"] == 500  # the node default table
    assert options.widget_spec("network.alpha")["default"] == 0  # auto


def test_config_messages_are_told_in_widget_names():
    msg = "train.lr_warmup_steps = 600 must be smaller than train.steps = 500."
    assert options.node_words(msg) == "lr_warmup_steps = 600 must be smaller than steps = 500."
    assert "(on Data Options (Tsuika))" in options.node_words("data.bucket_step = 3", True)


def test_queued_checks_refuse_in_widget_words_and_skip_rules_of_unknown_values():
    with pytest.raises(InputRefused, match=r"^lr_warmup_steps = 600 must be smaller than st"):
        options.build_checked({"train.steps": 500, "train.lr_warmup_steps": 600},
                              known={"train.steps", "train.lr_warmup_steps"})
    # steps is linked (unknown at /prompt): the rule is left to the run...
    assert options.build_checked({"train.lr_warmup_steps": 1500},  # default steps: 1000
                                 known={"train.lr_warmup_steps"}) is None
    # ...where every problem is refused, saying which options node a widget is on.
    with pytest.raises(InputRefused, match=r"bucket_step \(on Data Options"):
        options.build_checked({"data.resolution": 64, "data.bucket_step": 128})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_by_widget_name(value):
    with pytest.raises(InputRefused, match="learning_rate = .* is not a number"):
        options.check_widgets(["train.learning_rate"], {"learning_rate": value})


def test_an_options_widget_left_out_of_a_prompt_takes_the_config_default():
    # A workflow saved before network.algorithm existed has no such widget: still valid, and
    # the run gets the config's default; a value that is given is still checked.
    network = options.section_options("network")
    assert "network.algorithm" in network
    options.check_widgets(network, {"rank": 4})
    config = options.build_checked({"network.rank": 4})
    assert config.network.algorithm == "lora"
    with pytest.raises(validation.InputRefused, match="algorithm"):
        options.check_widgets(network, {"algorithm": "nope"})


def test_combo_values_are_checked_against_their_own_choices():
    with pytest.raises(InputRefused, match="optimizer = 'sgd' is not one of its choices"):
        options.check_widgets(["train.optimizer"], {"optimizer": "sgd"})
    with pytest.raises(InputRefused, match="name '../x' contains a folder separator"):
        options.check_widgets(["output.name"], {"name": "../x"})


# ------------------------------------------------------------------ shared config policies

@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (3, 1.0), (4, 2.0), (16, 8.0), (33, 16.0)])
def test_alpha_auto_is_half_the_rank_on_every_path(rank, alpha):
    assert build_config(values={"network": {"rank": rank}}).network.alpha == alpha  # nodes
    assert load_config(None, [f"network.rank={rank}"]).network.alpha == alpha  # CLI
    assert build_config(values={"network": {"rank": rank, "alpha": 5}}).network.alpha == 5


def test_list_options_have_one_syntax_on_both_paths():
    cli = load_config(None, ["sample.prompts=a heart | a heart on a car"]).sample.prompts
    node = build_config(values={"sample": {"prompts": "a heart\n\n a heart on a car \n"}})
    toml = build_config(values={"sample": {"prompts": ["a heart", "a heart on a car"]}})
    assert cli == node.sample.prompts == toml.sample.prompts == ["a heart", "a heart on a car"]
    with pytest.raises(ConfigError, match="sample.prompts"):
        build_config(values={"sample": {"prompts": [3]}})


def test_resolution_below_the_bucket_step_is_refused():
    with pytest.raises(ConfigError, match="data.resolution = 32 is below data.bucket_step"):
        build_config(values={"data": {"resolution": 32}})
    assert build_config(values={"data": {"resolution": 32, "bucket_step": 32}})


# ---------------------------------------------------------------------------------- reports

def test_reports_follow_the_shared_contract(tmp_path):
    from PIL import Image

    from tsuika.trainers.data.folder import scan_folder

    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    text, level = reports.dataset_report(scan_folder(tmp_path), "my_set")
    lines = text.splitlines()
    assert lines[0].startswith("2 images used from my_set") and "1 skipped" in lines[0]
    assert any(line.startswith("skipped broken.png: ") for line in lines)
    assert any(line.startswith("warning: 1 image trains with an empty caption") for line in lines)
    assert str(tmp_path) not in text and level == "warning"
    assert reports.ui_report(text, level) == {"tsuika_report": [text],
                                              "tsuika_level": ["warning"]}
    with pytest.raises(ValueError):
        reports.ui_report(text, "loud")
    stopped = reports.stopped_report(7, 100, "x-partial-step7.safetensors", "/s", "turn on")
    assert stopped.splitlines()[0] == "cancelled at step 7/100: what was trained is kept"


def test_init_lora_is_a_combo_of_the_loras_folder_never_a_path(monkeypatch, tmp_path):
    import sys
    import types

    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("mine.safetensors", "old.ckpt"):
        (loras / name).write_bytes(b"")
    fake = types.ModuleType("folder_paths")
    fake.get_filename_list = lambda folder: sorted(p.name for p in loras.iterdir())
    fake.get_full_path_or_raise = lambda folder, name: str(loras / name)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    spec = options.widget_spec("network.init_lora")
    assert spec["choices"] == ["none", "mine.safetensors"] and spec["default"] == "none"
    got = options.model_file_paths({"network.init_lora": "mine.safetensors", "network.rank": 4})
    assert got == {"network.init_lora": str(loras / "mine.safetensors"), "network.rank": 4}
    assert options.model_file_paths({"network.init_lora": "none"})["network.init_lora"] == ""
    for bad in ("old.ckpt", "../secret.safetensors", str(tmp_path / "x.safetensors")):
        with pytest.raises(InputRefused, match="init_lora .* is not a file in ComfyUI's "
                                               "models/loras folder") as err:
            options.build_checked({"network.init_lora": bad})
        assert str(tmp_path) not in str(err.value).replace(bad, "")
