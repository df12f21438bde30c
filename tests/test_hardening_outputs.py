"""Output folders and the environment: shared folders, locks, unusable folders, full disks,
file permissions, private paths in metadata, and the CLI's one-line errors."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_images, tiny_overrides

from tsuika.trainers import cli
from tsuika.trainers.config import build_config
from tsuika.trainers.formats.metadata import training_metadata
from tsuika.trainers.formats.safetensors_io import save_safetensors
from tsuika.trainers.loop import train
from tsuika.trainers.run_lock import LOCK_NAME, OutputError, output_lock

MISSING_MODEL = "/nonexistent/model.safetensors"


def _cfg(model, data, out, steps=2, **extra):
    return build_config(overrides=tiny_overrides(model, data, out, steps, **extra))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs_data")
    make_images(folder, n=2)
    return folder


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _cli_in_process(capsys, overrides):
    code = cli.main(["train", "--quiet", *_sets(overrides)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tsuika:")]
    return code, lines, err


# -- unusable output folders: named before the model is loaded -------------------------------
def test_output_dir_that_is_a_file_is_named_before_the_model_loads(data, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    # The model path does not exist: reaching the model loader would be a ModelLoadError.
    with pytest.raises(OutputError, match="is a file, not a folder"):
        train(_cfg(MISSING_MODEL, data, file))


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_output_dir_that_cannot_be_created_is_named(data, tmp_path, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "sub" if where == "under_a_file" else "/proc/tsuika_cannot_be_here"
    with pytest.raises(OutputError, match="cannot be created"):
        train(_cfg(MISSING_MODEL, data, out))


def test_output_dir_that_is_not_writable_is_named(data, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o500)
    else:  # root writes anywhere: have the permission check answer as for another user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if str(p) == str(out)
                            else real(p, m, *a, **k))
    try:
        with pytest.raises(OutputError, match="not writable"):
            train(_cfg(MISSING_MODEL, data, out))
    finally:
        out.chmod(0o700)


def test_a_full_disk_is_one_message_and_keeps_what_was_saved(tiny_model, data, tmp_path,
                                                             monkeypatch):
    import tsuika.trainers.formats.safetensors_io as io

    real, calls = io._write_tensors, []

    def fills_up(fh, tensors, *a):
        calls.append(1)
        if len(calls) >= 3:  # step 1: file + state trainable; step 2's file fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, tensors, *a)

    monkeypatch.setattr(io, "_write_tensors", fills_up)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        train(_cfg(tiny_model["single_file"], data, out, steps=2,
                   **{"output.save_every": 1}))
    msg = str(e.value)
    assert "No space left" in msg and "free disk space" in msg and "resume" in msg
    assert "tsuika_lora-step00000001.safetensors" in msg  # the last good save is named
    assert (out / "states" / "step_00000001" / "state.json").is_file()
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()


# -- shared output folders -------------------------------------------------------------------
def test_a_fresh_start_over_an_earlier_runs_states_needs_overwrite(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    train(_cfg(tiny_model["single_file"], data, out, steps=1))
    with pytest.raises(OutputError, match="holds resumable states.*train.resume = 'latest'"):
        train(_cfg(tiny_model["single_file"], data, out, steps=1, **{"output.name": "other"}))
    old = (out / "states" / "step_00000001" / "trainable.safetensors").read_bytes()
    train(_cfg(tiny_model["single_file"], data, out, steps=2,
               **{"output.name": "other", "output.overwrite": "true"}))
    aside = [p for p in out.iterdir() if p.name.startswith("states.replaced-")]
    assert len(aside) == 1, "the earlier run's states are moved aside, not deleted"
    assert (aside[0] / "step_00000001" / "trainable.safetensors").read_bytes() == old
    assert sorted(p.name for p in (out / "states").iterdir()) == ["step_00000002"]


def test_a_second_writer_is_refused_by_the_lock(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputError, match=f"in use by another training.*{os.getpid()}"):
            train(_cfg(tiny_model["single_file"], data, out, steps=1))
    assert not (out / LOCK_NAME).exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("lock, blocks", [
    ("dead_pid", False), ("other_host", True), ("empty_old", False), ("empty_new", True),
])
def test_stale_locks_do_not_block_forever(tmp_path, lock, blocks):
    out = tmp_path / "out"
    out.mkdir()
    path = out / LOCK_NAME
    if lock == "dead_pid":
        path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    elif lock == "other_host":
        path.write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    else:
        path.write_text("")
        if lock == "empty_old":
            old = time.time() - 3600
            os.utime(path, (old, old))
    if blocks:
        with pytest.raises(OutputError, match="delete"), output_lock(out):
            pass
        assert path.exists()
    else:
        with output_lock(out):
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not path.exists()


# -- permissions and metadata ----------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_trained_files_and_states_get_the_umask_mode(tiny_model, data, tmp_path, umask):
    old = os.umask(umask)
    try:
        res = train(_cfg(tiny_model["single_file"], data, tmp_path / "out", steps=1))
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    assert res.file_path.stat().st_mode & 0o777 == want_file
    assert res.state_dir.stat().st_mode & 0o777 == want_dir
    for f in res.state_dir.iterdir():
        assert f.stat().st_mode & 0o777 == want_file, f
    for f in res.files.values():
        assert f.stat().st_mode & 0o777 == want_file, f


def test_save_safetensors_gives_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = save_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_relative_paths_are_reduced_in_metadata_like_absolute_ones():
    cfg = build_config({"data": {"dir": "datasets/mine/private_name", "class_dir":
                                 "secret/place/dogs", "class_prompt": "a dog"},
                        "model": {"path": "models/me/base.safetensors"},
                        "output": {"dir": "runs/hidden_project"}})
    meta = training_metadata(config=cfg)
    blob = json.dumps(meta)
    for private in ("secret/place", "datasets/mine", "models/me", "runs/hidden"):
        assert private not in blob, private
    stored = json.loads(meta["tsuika.config"])
    assert stored["data"]["class_dir"] == "dogs" and stored["data"]["dir"] == "private_name"
    kept = json.loads(training_metadata(config=cfg, include_paths=True)["tsuika.config"])
    assert kept["data"]["class_dir"] == "secret/place/dogs"


# -- the CLI: one line, the fix, a non-zero exit ---------------------------------------------
def test_cli_non_finite_loss_is_one_line_exit_4(tiny_model, data, tmp_path, capsys,
                                                monkeypatch):
    from tsuika.trainers.families.sd15 import Sd15Family

    real = Sd15Family.predict
    monkeypatch.setattr(Sd15Family, "predict", lambda self, *a: real(self, *a) * float("nan"))
    code, lines, err = _cli_in_process(capsys, tiny_overrides(
        tiny_model["single_file"], data, tmp_path / "out", steps=2))
    assert code == 4 and len(lines) == 1, err[-2000:]
    assert "the loss became nan" in lines[0] and "learning_rate" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case, code, words", [
    ("output_is_file", 1, "is a file, not a folder"),
    ("bad_state", 2, "trainable.safetensors is damaged"),
    ("locked", 1, "in use by another training"),
    ("nan_option", 2, "train.learning_rate = nan is not a finite number"),
    ("seed", 2, "train.seed"),
])
def test_cli_errors_of_ours_are_one_line(tiny_model, data, tmp_path, capsys, case, code, words):
    out = tmp_path / "out"
    extra = {}
    if case == "output_is_file":
        out.write_text("x")
    elif case == "bad_state":
        state = out / "states" / "step_00000001"
        state.mkdir(parents=True)
        for name in ("trainable.safetensors", "scheduler.pt", "state.json"):
            (state / name).write_text("{}")
        (state / "state.json").write_text(json.dumps({"step": 1, "version": 1}))
        (state / "optimizer.pt").write_bytes(b"nonsense")
        extra["train.resume"] = str(state)
    elif case == "locked":
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(),
                                                 "host": socket.gethostname()}))
    elif case == "nan_option":
        extra["train.learning_rate"] = "nan"
    elif case == "seed":
        extra["train.seed"] = str(2**64)
    got, lines, err = _cli_in_process(capsys, tiny_overrides(tiny_model["single_file"], data,
                                                             out, steps=1, **extra))
    assert got == code and len(lines) == 1, err[-2000:]
    assert words in lines[0] and "Traceback" not in err


def test_cli_full_disk_is_one_line(tiny_model, data, tmp_path, capsys, monkeypatch):
    import tsuika.trainers.formats.safetensors_io as io

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_write_tensors", full)
    code, lines, err = _cli_in_process(capsys, tiny_overrides(
        tiny_model["single_file"], data, tmp_path / "out", steps=1))
    assert code == 1 and len(lines) == 1, err[-2000:]
    assert "No space left" in lines[0] and "free disk space" in lines[0]


def test_cli_unexpected_errors_are_one_line_unless_debugging(tiny_model, data, tmp_path, capsys,
                                                             monkeypatch):
    from tsuika.trainers import loop

    def bug(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(loop, "train", bug)
    code, lines, _ = _cli_in_process(capsys, tiny_overrides(
        tiny_model["single_file"], data, tmp_path / "out", steps=1))
    assert code == 1 and len(lines) == 1 and "TSUIKA_DEBUG=1" in lines[0]
    monkeypatch.setenv("TSUIKA_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["train", "--quiet", *_sets(tiny_overrides(
            tiny_model["single_file"], data, tmp_path / "out", steps=1))])
