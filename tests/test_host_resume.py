"""Which state a train node's 'resume' continues (nodes/_host.py: latest_state): the newest
sound one of the training's runs, newest run first, passing over damaged ones (kept, and
named in the node's words). Without ComfyUI: ``folder_paths`` is a stand-in."""

import sys
import types

import pytest
import torch

from tsuika.trainers.state import TrainingState, save_state, state_dir_for


@pytest.fixture
def runs(tmp_path, monkeypatch):
    fp = types.ModuleType("folder_paths")
    fp.get_output_directory = lambda: str(tmp_path / "output")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return tmp_path / "output" / "tsuika" / "mine"


def _state(run, step):
    return save_state(state_dir_for(run, step), TrainingState(
        step=step, trainable={"unet::w": torch.ones(64)},
        optimizer={"state": {}, "param_groups": []}, scheduler={}, info={}))


def _cut(path):
    path.write_bytes(path.read_bytes()[:40])


def test_resume_takes_the_newest_sound_state_and_names_the_damaged_ones(runs):
    from tsuika.nodes import _host

    with pytest.raises(ValueError, match="no saved state of a training named 'mine' yet"):
        _host.latest_state("mine")
    _state(runs / "run_20260101-000000", 4)
    newer = runs / "run_20260102-000000"
    _state(newer, 1)
    newest = _state(newer, 2)
    (runs / "run_20260103-000000").mkdir()  # a run that saved nothing: not a state
    assert _host.latest_state("mine") == (str(newest), [])

    _cut(newest / "trainable.safetensors")
    (newer / "states" / "step_00000001" / "scheduler.pt").unlink()
    state, skipped = _host.latest_state("mine")
    assert state == str(runs / "run_20260101-000000" / "states" / "step_00000004")
    assert skipped[0].startswith("skipped state run_20260102-000000/step_00000002: "
                                 "trainable.safetensors is damaged"), skipped
    assert skipped[1] == ("skipped state run_20260102-000000/step_00000001: missing "
                          "scheduler.pt (kept as it is)")
    assert all(str(runs) not in line for line in skipped)  # named within the training
    assert (newest / "trainable.safetensors").is_file()  # kept

    _cut(runs / "run_20260101-000000" / "states" / "step_00000004" / "optimizer.pt")
    with pytest.raises(ValueError) as e:
        _host.latest_state("mine")
    msg = str(e.value)
    assert msg.startswith("resume: no saved state of a training named 'mine' can be used: ")
    assert msg.count("skipped state") == 3 and "optimizer.pt is damaged" in msg
    assert msg.endswith("Turn 'resume' off to start again.")
