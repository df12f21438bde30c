"""The ``tsuika`` command as a new user meets it: awkward folders, bad options, fixtures."""

import subprocess
import sys
from pathlib import Path

from conftest import make_images, tiny_overrides
from PIL import Image


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_awkward_folder_trains_and_names_every_skipped_file(tiny_model, tmp_path):
    data = tmp_path / "awkward"
    make_images(data / "3_mychar", n=2)
    Image.new("RGBA", (80, 48), (255, 0, 0, 0)).save(data / "透明 alpha.png")
    (data / "透明 alpha.txt").write_bytes("\ufeffred thing,\r\nsecond line\r\n".encode("utf-8"))
    Image.new("CMYK", (40, 64), (0, 200, 0, 0)).save(data / "cmyk.jpg")
    Image.new("I;16", (64, 64), 30000).save(data / "sixteen.png")
    (data / "empty.png").write_bytes(b"")
    (data / "notes.png").write_text("not an image")
    good = data / "3_mychar" / "img_00.png"
    (data / "truncated.png").write_bytes(good.read_bytes()[:200])
    r = _cli("train", "--quiet", *_sets(tiny_overrides(
        tiny_model["single_file"], data, tmp_path / "out", steps=2)))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    for name in ("empty.png", "notes.png", "truncated.png"):
        assert f"{name}:" in log, name
    assert "5 images used, 3 skipped" in log
    assert (tmp_path / "out" / "tsuika_lora.safetensors").is_file()


def test_unknown_option_lists_valid_ones_and_exits_2():
    r = _cli("train", "--set", "train.stepz=3")
    assert r.returncode == 2
    assert "train.stepz" in r.stderr and "train.steps" in r.stderr


def test_missing_dataset_folder_is_named(tiny_model, tmp_path):
    r = _cli("train", *_sets(tiny_overrides(tiny_model["single_file"], tmp_path / "nope",
                                            tmp_path / "out")))
    assert r.returncode == 2 and "nope" in r.stderr


def test_fixture_command_writes_both_layouts(tmp_path):
    r = _cli("fixture", "sd15-tiny", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "sd15-tiny.safetensors").is_file()
    assert (tmp_path / "m" / "diffusers" / "unet" / "config.json").is_file()
    again = _cli("fixture", "sd15-tiny", str(tmp_path / "m"))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert Path(tmp_path / "m" / "diffusers").is_dir()


def test_the_demo_has_its_own_entry_point_and_tsuika_demo_points_to_it():
    moved = _cli("demo")
    assert moved.returncode == 2 and "tsuika-demo" in moved.stderr, moved.stderr
    demo = subprocess.run([sys.executable, "-m", "tsuika.reference.demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0 and "tsuika-demo" in demo.stdout, demo.stderr


def test_fixture_single_file_writes_only_what_load_checkpoint_should_list(tmp_path):
    """For ComfyUI's models/checkpoints: one file, nothing Load Checkpoint would list besides."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "put_checkpoints_here").write_text("")
    r = _cli("fixture", "sd15-tiny", str(ckpts), "--single-file", "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["put_checkpoints_here",
                                                       "sd15-tiny.safetensors"]
    assert "diffusers" not in r.stdout and "sd15-tiny.safetensors" in r.stdout
    again = _cli("fixture", "sd15-tiny", str(ckpts), "--single-file")
    assert again.returncode == 2 and "already exists" in again.stderr
