"""Caption tools: tag edits in a fixed order, tag frequency, safe sidecar files, the CLI."""

import json
import subprocess
import sys

import pytest
from conftest import make_images

from tsuika.trainers.captioning.tools import (
    TagEdit,
    edit_caption_folder,
    parse_replacements,
    tag_frequency,
    write_caption_files,
)
from tsuika.trainers.data.folder import scan_folder


@pytest.mark.parametrize("edit, caption, expected", [
    (TagEdit(prefix="sks"), "red hair, smiling", "sks, red hair, smiling"),
    (TagEdit(prefix="sks"), "red hair, SKS, smiling", "sks, red hair, smiling"),  # moved
    (TagEdit(suffix="masterpiece"), "a, b", "a, b, masterpiece"),
    (TagEdit(remove=["Smiling", "b"]), "a, smiling, b, c", "a, c"),
    (TagEdit(replace={"1girl": "woman", "bad": ""}), "1Girl, bad, red", "woman, red"),
    (TagEdit(dedupe=True), "a, B, b, c, a", "a, B, c"),
    (TagEdit(sort=True, prefix="sks", suffix="z end"), "c, A, b", "sks, A, b, c, z end"),
    (TagEdit(replace={"x": "a"}, dedupe=True, sort=True), "x, a, b", "a, b"),
    (TagEdit(), "  free text, as written ", "  free text, as written "),  # no edit: as is
])
def test_tag_edits(edit, caption, expected):
    assert edit.apply(caption) == expected


def test_bad_replacement_names_the_item():
    assert parse_replacements("1girl=woman, old=") == {"1girl": "woman", "old": ""}
    with pytest.raises(ValueError, match="'nope' is not of the form old=new"):
        parse_replacements("a=b, nope")


def test_tag_frequency_counts_each_caption_once():
    freq = tag_frequency(["a, b, a", "B, c", "a"])
    assert freq == [("a", 2), ("b", 2), ("c", 1)]


def test_sidecar_files_are_never_overwritten_unless_asked(tmp_path):
    imgs = make_images(tmp_path, n=3)
    (tmp_path / "img_01.txt").unlink()
    before = (tmp_path / "img_00.txt").read_text()
    res = write_caption_files({p: "new caption" for p in imgs})
    assert res.written == [tmp_path / "img_01.txt"]
    assert res.kept == [tmp_path / "img_00.txt", tmp_path / "img_02.txt"]
    assert (tmp_path / "img_00.txt").read_text() == before
    assert (tmp_path / "img_01.txt").read_text() == "new caption"
    res = write_caption_files({imgs[0]: "again"}, overwrite=True)
    assert res.written == [tmp_path / "img_00.txt"]
    assert (tmp_path / "img_00.txt").read_text() == "again"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_folder_edit_previews_then_writes(tmp_path):
    make_images(tmp_path, n=2, caption="red circle, red circle")
    (tmp_path / "img_01.txt").unlink()
    edit = TagEdit(prefix="sks", dedupe=True)
    preview = edit_caption_folder(scan_folder(tmp_path), edit)
    assert preview.changes == {tmp_path / "img_00.txt": ("red circle, red circle, number 0",
                                                         "sks, red circle, number 0")}
    assert preview.without_file == [tmp_path / "img_01.png"]
    assert (tmp_path / "img_00.txt").read_text() == "red circle, red circle, number 0"
    edit_caption_folder(scan_folder(tmp_path), edit, write=True)
    assert (tmp_path / "img_00.txt").read_text() == "sks, red circle, number 0"
    assert not edit_caption_folder(scan_folder(tmp_path), edit).changes  # idempotent


def test_cli_captions(tmp_path):
    make_images(tmp_path, n=2, caption="1girl, smile")
    cmd = [sys.executable, "-m", "tsuika.trainers.cli", "captions", str(tmp_path),
           "--prefix", "sks", "--replace", "1girl=woman", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["changed"]["img_00.txt"] == {"old": "1girl, smile, number 0",
                                            "new": "sks, woman, smile, number 0"}
    assert out["written"] is False and ["sks", 2] in out["tag_frequency"]
    assert (tmp_path / "img_00.txt").read_text() == "1girl, smile, number 0"
    r = subprocess.run(cmd[:-1] + ["--write", "--freq"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "rewrote 2 caption files" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "img_01.txt").read_text() == "sks, woman, smile, number 1"
    r = subprocess.run(cmd[:5] + ["--replace", "oops"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "'oops' is not of the form old=new" in r.stderr
