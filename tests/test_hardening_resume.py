"""Resumes that do not fit, states that are damaged, saves that are interrupted.

Rows run over every registered method where the case applies (``METHODS``): a new method
gets these checks by being registered.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_images, tiny_overrides

from tsuika.trainers.callbacks import Callbacks
from tsuika.trainers.config import build_config
from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
from tsuika.trainers.guards import check_optimizer_fits, compare_identity
from tsuika.trainers.loop import train
from tsuika.trainers.methods import METHODS, MethodError
from tsuika.trainers.methods.base import load_named_tensors
from tsuika.trainers.state import (
    StateError,
    TrainingState,
    check_state,
    clean_interrupted_saves,
    load_resume,
    load_state,
    newest_sound_state,
    save_state,
)

METHOD_NAMES = sorted(METHODS)
FAST = {"dreambooth": {"output.save_dtype": "fp32"}}


def _cfg(tiny_model, data, out, steps=2, method="lora", **extra):
    extra = {"network.method": method, **FAST.get(method, {}), **extra}
    return build_config(overrides=tiny_overrides(tiny_model["single_file"], data, out, steps,
                                                 **extra))


def _train(tiny_model, data, out, steps=2, method="lora", callbacks=None, **extra):
    return train(_cfg(tiny_model, data, out, steps, method, **extra), callbacks)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening_data")
    make_images(folder, n=2)
    return folder


@pytest.fixture(scope="module")
def lora_states(tiny_model, data, tmp_path_factory):
    """A LoRA run (rank 1) with states at steps 1 and 2."""
    out = tmp_path_factory.mktemp("lora_states") / "out"
    _train(tiny_model, data, out, steps=2, **{"network.rank": 1, "output.save_every": 1})
    return out


def _copy(out, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    return dst


# -- resumes that do not fit -----------------------------------------------------------------
@pytest.mark.parametrize("rank", [4, 2])
def test_a_state_of_another_rank_is_refused_by_name_not_crashed(tiny_model, data, lora_states,
                                                                tmp_path, rank):
    out = _copy(lora_states, tmp_path)
    with pytest.raises(StateError) as e:
        _train(tiny_model, data, out, steps=4, **{"network.rank": rank, "output.name": "b",
                                                  "train.resume": "latest"})
    msg = str(e.value)
    assert "step_00000002" in msg and "network.rank" in msg
    assert "state 1" in msg and f"this run {rank}" in msg


@pytest.mark.parametrize("rank", [4, 2])
def test_without_a_recorded_identity_the_shapes_still_refuse_it(tiny_model, data, lora_states,
                                                                tmp_path, rank):
    # A state from before run identities existed: the tensor/moment shape checks stand alone.
    out = _copy(lora_states, tmp_path)
    meta = out / "states" / "step_00000002" / "state.json"
    info = json.loads(meta.read_text())
    info.pop("identity")
    meta.write_text(json.dumps(info))
    with pytest.raises(StateError) as e:
        _train(tiny_model, data, out, steps=4, **{"network.rank": rank, "output.name": "b",
                                                  "train.resume": "latest"})
    msg = str(e.value)
    assert "step_00000002" in msg and "shape" in msg and "network.rank" in msg
    assert f"({rank}," in msg or f", {rank}" in msg, msg  # this run's shape is named


class _Bundle:
    def __init__(self, **components):
        self.components = components


def test_trainable_tensors_are_all_checked_before_the_first_copy():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    bundle = _Bundle(unet=torch.nn.ModuleDict({"a": a, "b": b}))
    state = {"unet::a.weight": torch.ones(3, 4), "unet::a.bias": torch.ones(3),
             "unet::b.weight": torch.ones(1, 4), "unet::b.bias": torch.ones(2)}
    with pytest.raises(MethodError) as e:
        load_named_tensors(bundle, state, lambda n, p: True, "network options (network.rank?)")
    assert "unet::b.weight" in str(e.value) and "(1, 4)" in str(e.value)
    assert "(2, 4)" in str(e.value) and "network.rank" in str(e.value)
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "copied before checking"


def test_optimizer_moments_and_groups_are_checked_against_the_parameters(tmp_path):
    params = [torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}])
    good = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4, 2),
                          "exp_avg_sq": torch.zeros(4, 2)}},
            "param_groups": [{"params": [0]}, {"params": [1]}]}
    check_optimizer_fits(tmp_path, good, opt)
    bad_moment = json.loads(json.dumps({"param_groups": good["param_groups"]}))
    bad_moment["state"] = {0: {"exp_avg": torch.zeros(1, 2), "exp_avg_sq": torch.zeros(4, 2)}}
    with pytest.raises(StateError, match=r"exp_avg of parameter 0 has shape \(1, 2\).*\(4, 2\)"):
        check_optimizer_fits(tmp_path, bad_moment, opt)
    with pytest.raises(StateError, match="1 parameter groups, this run has 2"):
        check_optimizer_fits(tmp_path, {"state": {}, "param_groups": [{"params": [0, 1]}]},
                             opt)
    with pytest.raises(StateError, match="group 1 has 2 parameters, this run has 1"):
        check_optimizer_fits(tmp_path, {"state": {}, "param_groups": [{"params": [0]},
                                                                      {"params": [1, 2]}]}, opt)


@pytest.mark.parametrize("saved_method", METHOD_NAMES)
def test_a_state_of_another_method_is_refused(tiny_model, data, tmp_path, saved_method):
    other = next(m for m in METHOD_NAMES if m != saved_method)
    out = tmp_path / "out"
    _train(tiny_model, data, out, steps=1, method=saved_method)
    with pytest.raises(StateError) as e:
        _train(tiny_model, data, out, steps=2, method=other,
               **{"output.name": "b", "train.resume": "latest"})
    assert "network.method" in str(e.value) and saved_method in str(e.value)


def test_dreambooth_state_with_another_text_encoder_choice_is_refused(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    _train(tiny_model, data, out, steps=1, method="dreambooth")
    with pytest.raises(StateError, match="network.train_text_encoder: state False"):
        _train(tiny_model, data, out, steps=2, method="dreambooth",
               **{"output.name": "b", "train.resume": "latest",
                  "network.train_text_encoder": "true"})


def test_a_state_of_another_base_model_is_refused(tiny_model, data, lora_states, tmp_path):
    from tsuika.trainers.fixtures import write_fixture

    other = write_fixture("sd15-tiny", tmp_path / "other_model", seed=1)
    out = _copy(lora_states, tmp_path)
    cfg = build_config(overrides=tiny_overrides(
        other["single_file"], data, out, 4, **{"network.rank": 1, "output.name": "b",
                                               "train.resume": "latest"}))
    with pytest.raises(StateError, match="base model"):
        train(cfg)


def test_another_dataset_or_seed_only_warns(tiny_model, lora_states, tmp_path):
    out = _copy(lora_states, tmp_path)
    new_data = tmp_path / "more"
    make_images(new_data, n=3, seed=5)
    messages = []

    class Listen(Callbacks):
        def on_message(self, text):
            messages.append(text)

    res = _train(tiny_model, new_data, out, steps=3, callbacks=Listen(),
                 **{"network.rank": 1, "output.name": "b", "train.resume": "latest",
                    "train.seed": 7})
    assert res.steps == 3
    text = "\n".join(messages)
    assert "dataset changed" in text and "train.seed: state 0, this run 7" in text


def test_identity_comparison_tolerates_precision_but_not_other_weights():
    now = {"method": "lora", "network": {"rank": 4}, "dataset": "d", "seed": 0,
           "model": {"family": "sd15", "source": "a", "probe": [0.1234, -0.5, 2.0]}}
    bf16 = dict(now, model=dict(now["model"], source="b", probe=[0.1235, -0.5, 2.0]))
    assert compare_identity(bf16, now) == ([], [])
    other = dict(now, model=dict(now["model"], probe=[0.3, -0.5, 2.0]))
    assert "base model" in compare_identity(other, now)[0][0]


# -- nothing non-finite is saved or resumed --------------------------------------------------
class _PoisonAt(Callbacks):
    """Breaks the trained weights right after optimizer step ``at`` (as a bad step would)."""

    def __init__(self, bundle, method, at):
        self.bundle, self.method, self.at = bundle, method, at

    def on_step(self, info):
        if info.step == self.at:
            for module in self.bundle.components.values():
                for p in module.parameters():
                    if p.requires_grad:
                        with torch.no_grad():
                            p.view(-1)[0] = float("nan")
                        return


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_weights_broken_after_the_last_finite_loss_are_never_saved(tiny_model, data, tmp_path,
                                                                   method):
    from tsuika.trainers.families import load_model
    from tsuika.trainers.guards import NonFiniteLoss

    cfg = _cfg(tiny_model, data, tmp_path / "out", steps=5, method=method,
               **{"output.save_every": 1})
    bundle = load_model(cfg.model.path)
    with pytest.raises(NonFiniteLoss) as e:
        train(cfg, _PoisonAt(bundle, METHODS[method], at=3), bundle=bundle)
    msg = str(e.value)
    assert "step 3" in msg and "not saved" in msg
    assert "step00000002.safetensors" in msg and "step_00000002" in msg  # last GOOD save
    out = tmp_path / "out"
    assert not (out / "states" / "step_00000003").exists()
    assert not list(out.glob("*step00000003*"))
    for sdir in (out / "states").iterdir():
        tensors, _ = load_safetensors(sdir / "trainable.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), sdir


def test_a_non_finite_state_is_not_resumed(tiny_model, data, lora_states, tmp_path):
    out = _copy(lora_states, tmp_path)
    path = out / "states" / "step_00000002" / "trainable.safetensors"
    tensors, _ = load_safetensors(path)
    first = min(tensors)
    tensors[first] = tensors[first].clone().fill_(float("inf"))
    save_safetensors(path, tensors, overwrite=True)
    with pytest.raises(StateError, match="NaN or infinite"):
        _train(tiny_model, data, out, steps=4, **{"network.rank": 1, "output.name": "b",
                                                  "train.resume": str(path.parent)})


# -- damaged states --------------------------------------------------------------------------
def _truncate(p):
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


DAMAGES = {
    "state.json: garbage": ("state.json", lambda p: p.write_bytes(b"\x00\xffnot json")),
    "state.json: a list": ("state.json", lambda p: p.write_text("[1, 2]")),
    "state.json: step text": ("state.json", lambda p: p.write_text(json.dumps(
        dict(json.loads(p.read_text()), step="12")))),
    "state.json: step 0": ("state.json", lambda p: p.write_text(json.dumps(
        dict(json.loads(p.read_text()), step=0)))),
    "state.json: step -5": ("state.json", lambda p: p.write_text(json.dumps(
        dict(json.loads(p.read_text()), step=-5)))),
    "state.json: step true": ("state.json", lambda p: p.write_text(json.dumps(
        dict(json.loads(p.read_text()), step=True)))),
    "state.json: step 2.5": ("state.json", lambda p: p.write_text(json.dumps(
        dict(json.loads(p.read_text()), step=2.5)))),
    "state.json: version": ("state.json", lambda p: p.write_text(json.dumps(
        dict(json.loads(p.read_text()), version=99)))),
    "state.json: empty": ("state.json", lambda p: p.write_bytes(b"")),
    "optimizer.pt: garbage": ("optimizer.pt", lambda p: p.write_bytes(b"garbage" * 10)),
    "optimizer.pt: truncated": ("optimizer.pt", _truncate),
    "optimizer.pt: empty": ("optimizer.pt", lambda p: p.write_bytes(b"")),
    "optimizer.pt: a list": ("optimizer.pt", lambda p: torch.save([1, 2], p)),
    "optimizer.pt: no groups": ("optimizer.pt", lambda p: torch.save({"state": {}}, p)),
    "optimizer.pt: an object": ("optimizer.pt", lambda p: torch.save(
        {"state": {}, "param_groups": [], "x": torch.nn.Linear(1, 1)}, p)),
    "scheduler.pt: garbage": ("scheduler.pt", lambda p: p.write_bytes(b"\x80\x04garbage")),
    "scheduler.pt: truncated": ("scheduler.pt", _truncate),
    "scheduler.pt: a number": ("scheduler.pt", lambda p: torch.save(3, p)),
    "trainable.safetensors: truncated": ("trainable.safetensors", _truncate),
    "trainable.safetensors: garbage": ("trainable.safetensors",
                                       lambda p: p.write_bytes(b"\x10" + b"\x00" * 7 + b"{")),
    "trainable.safetensors: missing": ("trainable.safetensors", lambda p: p.unlink()),
    "state.json: missing": ("state.json", lambda p: p.unlink()),
    "optimizer.pt: a folder": ("optimizer.pt", lambda p: (p.unlink(), p.mkdir())),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_every_damage_gives_one_message_naming_the_folder_and_the_file(lora_states, tmp_path,
                                                                       case):
    out = _copy(lora_states, tmp_path)
    folder = out / "states" / "step_00000002"
    name, damage = DAMAGES[case]
    damage(folder / name)
    with pytest.raises(StateError) as e:
        load_state(folder, max_step=100)
    msg = str(e.value)
    assert str(folder) in msg and name in msg, msg
    assert "\n" not in msg
    # 'latest' passes over the damaged state to the newest one that loads, and says why.
    found, state, skipped = load_resume("latest", out, max_step=100)
    assert found.name == "step_00000001" and state.step == 1
    assert len(skipped) == 1 and "step_00000002" in skipped[0] and name in skipped[0]
    # The check the nodes choose a state with (tensors not read) finds every damage too.
    with pytest.raises(StateError) as e:
        check_state(folder)
    assert str(folder) in str(e.value) and name in e.value.reason, e.value.reason
    assert str(folder) not in e.value.reason and "train.resume" not in e.value.reason
    found, passed = newest_sound_state([out])
    assert found == out / "states" / "step_00000001"
    assert [f.name for f, _ in passed] == ["step_00000002"]


def test_the_newest_sound_state_across_runs_passes_over_damaged_ones_and_keeps_them(
        lora_states, tmp_path):
    older, newer = _copy(lora_states, tmp_path / "run_1"), _copy(lora_states, tmp_path / "run_2")
    assert check_state(newer / "states" / "step_00000002") == 2
    for step in ("step_00000001", "step_00000002"):  # every state of the newer run damaged
        _truncate(newer / "states" / step / "trainable.safetensors")
    (newer / "states" / "step_00000001" / "optimizer.pt").unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    found, passed = newest_sound_state([newer, older])
    assert found == older / "states" / "step_00000002"
    assert [(f.parent.parent.parent.name, f.name) for f, _ in passed] == [
        ("run_2", "step_00000002"), ("run_2", "step_00000001")]
    assert "trainable.safetensors is damaged" in passed[0][1].reason
    assert passed[1][1].reason == "missing optimizer.pt"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # kept
    # None sound: nothing found, every one named; no run at all: nothing either.
    _truncate(older / "states" / "step_00000002" / "scheduler.pt")
    (older / "states" / "step_00000001" / "state.json").write_text("{")
    found, passed = newest_sound_state([newer, older])
    assert found is None and len(passed) == 4
    assert newest_sound_state([tmp_path / "nothing"]) == (None, [])


def test_latest_with_every_state_damaged_names_them_all(lora_states, tmp_path):
    out = _copy(lora_states, tmp_path)
    for folder in (out / "states").iterdir():
        (folder / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(StateError) as e:
        load_resume("latest", out)
    assert "step_00000001" in str(e.value) and "step_00000002" in str(e.value)


def test_a_state_past_train_steps_is_refused(lora_states, tiny_model, data, tmp_path):
    out = _copy(lora_states, tmp_path)
    with pytest.raises(StateError, match="past train.steps = 1"):
        _train(tiny_model, data, out, steps=1, **{"network.rank": 1, "output.name": "b",
                                                  "train.resume": "latest"})


def test_latest_falls_back_in_a_real_run_and_says_which_state_it_skipped(tiny_model, data,
                                                                        lora_states, tmp_path):
    out = _copy(lora_states, tmp_path)
    (out / "states" / "step_00000002" / "scheduler.pt").write_bytes(b"junk")
    (out / "states" / ".tmp-killed").mkdir()  # what a save killed mid-way leaves
    (out / ".b.safetensors.k1ll3d.tmp").write_bytes(b"half a file")
    messages = []

    class Listen(Callbacks):
        def on_message(self, text):
            messages.append(text)

    res = _train(tiny_model, data, out, steps=3, callbacks=Listen(),
                 **{"network.rank": 1, "output.name": "b", "train.resume": "latest"})
    assert res.steps == 3
    text = "\n".join(messages)
    assert "skipped state step_00000002" in text and "scheduler.pt" in text
    assert "resumed from" in text and "step_00000001" in text
    assert "removed the unfinished state" in text and "removed the half-written file" in text
    assert not (out / "states" / ".tmp-killed").exists()
    assert not (out / ".b.safetensors.k1ll3d.tmp").exists()


# -- interrupted saves -----------------------------------------------------------------------
def _tiny_state(step, value):
    return TrainingState(step=step, trainable={"unet::w": torch.full((2,), value)},
                         optimizer={"state": {}, "param_groups": []}, scheduler={}, info={})


def test_leftovers_of_a_killed_save_are_cleaned_at_the_next_start(tmp_path):
    out = tmp_path / "out"
    states = out / "states"
    save_state(states / "step_00000001", _tiny_state(1, 1.0))
    save_state(states / "step_00000002", _tiny_state(2, 2.0))
    (states / ".tmp-abc123").mkdir()
    (states / ".tmp-abc123" / "optimizer.pt").write_bytes(b"half")
    shutil.copytree(states / "step_00000001", states / ".replaced-step_00000001")
    shutil.move(states / "step_00000002", states / ".replaced-step_00000002")
    (out / ".tsuika_lora.safetensors.x1y2.tmp").write_bytes(b"half")
    (out / "tsuika_lora-loss.csv.tmp").write_text("half")
    (out / "user.tmp").write_text("not ours")
    done = clean_interrupted_saves(out)
    assert sorted(p.name for p in states.iterdir()) == ["step_00000001", "step_00000002"]
    assert load_state(states / "step_00000002").trainable["unet::w"][0] == 2.0  # restored
    assert not (out / ".tsuika_lora.safetensors.x1y2.tmp").exists()
    assert not (out / "tsuika_lora-loss.csv.tmp").exists()
    assert (out / "user.tmp").exists()
    assert any("restored" in d for d in done)


@pytest.mark.parametrize("fail_at", ["writing", "renaming"])
def test_replacing_a_state_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch,
                                                                          fail_at):
    import os

    import tsuika.trainers.state as state_mod

    folder = tmp_path / "states" / "step_00000002"
    save_state(folder, _tiny_state(2, 1.0))
    if fail_at == "writing":
        def broken(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(state_mod.torch, "save", broken)
    else:
        real = os.replace

        def broken(src, dst):
            if str(src).rsplit("/", 1)[-1].startswith(".tmp-"):
                raise OSError(5, "Input/output error")
            return real(src, dst)
        monkeypatch.setattr(state_mod.os, "replace", broken)
    with pytest.raises(OSError):
        save_state(folder, _tiny_state(2, 9.0))
    monkeypatch.undo()
    assert load_state(folder).trainable["unet::w"][0] == 1.0
    assert sorted(p.name for p in folder.parent.iterdir()) == ["step_00000002"]


def test_a_damaged_moving_average_fails_the_check_too(lora_states, tmp_path):
    out = _copy(lora_states, tmp_path)
    folder = out / "states" / "step_00000002"
    (folder / "ema.safetensors").write_bytes((folder / "trainable.safetensors").read_bytes())
    assert check_state(folder) == 2  # a whole one is read as part of the state
    _truncate(folder / "ema.safetensors")
    with pytest.raises(StateError) as e:
        check_state(folder)
    assert e.value.reason.startswith("ema.safetensors is damaged"), e.value.reason
