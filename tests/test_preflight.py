"""The pre-flight check: a folder made to hold each problem once; each is found, nothing else."""

import json
import subprocess
import sys

from conftest import make_images
from PIL import Image, ImageDraw

from tsuika.trainers.config import DataConfig
from tsuika.trainers.data.folder import scan_folder
from tsuika.trainers.data.phash import (
    colour_signature,
    hamming,
    near_duplicate_groups,
    perceptual_hash,
)
from tsuika.trainers.preflight import check_dataset, default_tokenizers

LONG = ", ".join(f"detail number {i} of the outfit" for i in range(20))


def _awkward(root):
    """Four clean images plus one of each problem (file names say which)."""
    make_images(root, n=4, caption="sks, a red circle")
    Image.open(root / "img_00.png").resize((96, 96)).save(root / "dup_of_00.jpg", quality=90)
    (root / "dup_of_00.txt").write_text("sks, a copy", encoding="utf-8")
    wide = Image.new("RGB", (256, 64), (10, 200, 10))
    ImageDraw.Draw(wide).rectangle([20, 10, 80, 50], fill=(0, 0, 0))
    wide.save(root / "wide.png")
    (root / "wide.txt").write_text("sks, a wide banner", encoding="utf-8")
    small = Image.new("RGB", (40, 40), (0, 0, 0))
    ImageDraw.Draw(small).line([0, 0, 40, 40], fill=(255, 255, 255), width=5)
    small.save(root / "small.png")
    (root / "small.txt").write_text("sks, a small one", encoding="utf-8")
    nocap = Image.new("RGB", (64, 64), (255, 255, 0))
    ImageDraw.Draw(nocap).rectangle([0, 0, 30, 63], fill=(0, 0, 90))
    nocap.save(root / "no_caption.png")
    empty = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(empty).polygon([(32, 0), (0, 63), (63, 63)], fill=(200, 0, 200))
    empty.save(root / "empty_caption.png")
    (root / "empty_caption.txt").write_text("  \n", encoding="utf-8")
    (root / "orphan.txt").write_text("sks, the image went away", encoding="utf-8")
    notrig = Image.new("RGB", (64, 64), (0, 90, 120))
    ImageDraw.Draw(notrig).ellipse([5, 30, 60, 60], fill=(250, 250, 250))
    notrig.save(root / "no_trigger.png")
    (root / "no_trigger.txt").write_text("a white disc", encoding="utf-8")
    longcap = Image.new("RGB", (64, 64), (90, 30, 0))
    ImageDraw.Draw(longcap).rectangle([40, 0, 63, 63], fill=(0, 255, 255))
    longcap.save(root / "long_caption.png")
    (root / "long_caption.txt").write_text("sks, " + LONG, encoding="utf-8")
    (root / "broken.png").write_bytes(b"\x89PNG not really")


def _check(root, **kw):
    data = DataConfig(dir=str(root), resolution=64, bucket_step=32)
    return check_dataset(scan_folder(root), data, default_tokenizers(), trigger_word="sks",
                         **kw)


def test_each_planted_problem_is_found_and_nothing_else(tmp_path):
    root = tmp_path / "awkward"
    _awkward(root)
    report = _check(root)
    found = {(f.check, tuple(f.files)) for f in report.findings}
    assert found == {
        ("skipped", ("broken.png",)),
        ("missing_caption", ("no_caption.png",)),
        ("empty_caption", ("empty_caption.txt",)),
        ("orphan_caption", ("orphan.txt",)),
        # no_caption.png and empty_caption.png have no trigger either: their captions are empty
        ("trigger_missing", ("empty_caption.png", "no_caption.png", "no_trigger.png")),
        ("caption_too_long", ("long_caption.txt",)),
        ("near_duplicate", ("dup_of_00.jpg", "img_00.png")),
        ("too_small", ("small.png",)),
        ("lone_bucket", ("wide.png",)),
    }, report.to_text()
    long = report.by_check("caption_too_long")[0]
    tokens = default_tokenizers()[0][1]("sks, " + LONG).input_ids
    assert long.detail["tokens"] == len(tokens) > 77 and long.detail["limit"] == 77
    assert str(len(tokens)) in long.message
    small = report.by_check("too_small")[0]
    assert small.detail["upscale"] == 1.6  # 40 px to the 64 px square bucket
    assert report.buckets == {"64x64": 10, "128x32": 1}
    assert report.trigger == {"word": "sks", "in_captions": 8, "of": 11,
                              "added_by_training": False}
    text = report.to_text("awkward")
    assert text.splitlines()[0] == "pre-flight: 9 problems in 11 images of awkward"
    assert sum(line.startswith("warning:") for line in text.splitlines()) == 9


def test_clean_folder_has_no_problem(tmp_path):
    make_images(tmp_path / "clean", n=6, caption="sks, a red circle")
    report = _check(tmp_path / "clean")
    assert report.findings == [], report.to_text()
    assert report.buckets == {"64x64": 6}


def test_trigger_set_for_training_is_not_a_problem(tmp_path):
    make_images(tmp_path / "d", n=3, caption="a red circle")
    data = DataConfig(dir=str(tmp_path / "d"), resolution=64, bucket_step=32, trigger_word="sks")
    report = check_dataset(scan_folder(tmp_path / "d"), data, default_tokenizers())
    assert report.findings == []
    assert report.trigger["in_captions"] == 0 and report.trigger["added_by_training"]


def test_trigger_counts_toward_the_token_length(tmp_path):
    """A caption that fits alone but not with the trigger word training puts first."""
    make_images(tmp_path / "d", n=1)
    tok = default_tokenizers()[0][1]
    words = ["red"] * 80
    while len(tok(", ".join(words)).input_ids) > 77:
        words.pop()
    (tmp_path / "d" / "img_00.txt").write_text(", ".join(words), encoding="utf-8")
    plain = DataConfig(dir=str(tmp_path / "d"), resolution=64, bucket_step=32)
    assert not check_dataset(scan_folder(tmp_path / "d"), plain, default_tokenizers()).findings
    trig = DataConfig(dir=str(tmp_path / "d"), resolution=64, bucket_step=32,
                      trigger_word="a very long trigger phrase")
    found = check_dataset(scan_folder(tmp_path / "d"), trig, default_tokenizers()).findings
    assert [f.check for f in found] == ["caption_too_long"]


def test_perceptual_hash_separates_copies_from_other_pictures(tmp_path):
    paths = make_images(tmp_path, n=5, size=(128, 128))
    base = Image.open(paths[0])
    base.save(tmp_path / "copy.jpg", quality=70)
    copies = [base.resize((77, 77)), Image.open(tmp_path / "copy.jpg"),
              base.crop((2, 2, 126, 126))]
    h0 = perceptual_hash(base)
    assert all(hamming(h0, perceptual_hash(c)) <= 6 for c in copies)
    others = [perceptual_hash(Image.open(p)) for p in paths[1:]]
    assert all(hamming(h0, h) > 6 for h in others)
    assert near_duplicate_groups([h0, *others, perceptual_hash(copies[0])]) == [[0, 5]]
    # The same drawing on another background colour: same hash, not a duplicate.
    recoloured = Image.new("RGB", base.size, (0, 0, 0))
    recoloured.paste(base)
    px = recoloured.load()
    for x in range(recoloured.width):
        for y in range(recoloured.height):
            if px[x, y] != (220, 20, 20):
                px[x, y] = (20, 220, 40)
    pair = [base, recoloured]
    hashes = [perceptual_hash(im) for im in pair]
    assert near_duplicate_groups(hashes) == [[0, 1]]  # by shape alone
    assert near_duplicate_groups(hashes, colours=[colour_signature(im) for im in pair]) == []


def test_cli_lint_json_names_each_problem(tmp_path):
    root = tmp_path / "awkward"
    _awkward(root)
    r = subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "lint", str(root), "--json",
                        "--trigger", "sks", "--set", "data.resolution=64",
                        "--set", "data.bucket_step=32", "--strict"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 5, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["problems"] == 9
    assert out["counts"] == {"missing_caption": 1, "orphan_caption": 1, "empty_caption": 1,
                             "trigger_missing": 1, "caption_too_long": 1, "near_duplicate": 1,
                             "too_small": 1, "lone_bucket": 1, "skipped": 1}
    r = subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "lint",
                        str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_every_training_runs_the_check_and_starts_with_its_report(tiny_model, tmp_path):
    from conftest import tiny_overrides

    from tsuika.trainers.callbacks import Callbacks
    from tsuika.trainers.config import build_config
    from tsuika.trainers.loop import train

    data = tmp_path / "d"
    make_images(data, n=3)
    (data / "img_01.txt").unlink()

    class Listen(Callbacks):
        def __init__(self):
            self.start, self.messages = {}, []

        def on_start(self, info):
            self.start = info

        def on_message(self, text):
            self.messages.append(text)

    cb = Listen()
    train(build_config(overrides=tiny_overrides(tiny_model["single_file"], data,
                                                tmp_path / "out", steps=1)), cb)
    assert cb.start["preflight"].splitlines()[0] == f"pre-flight: 1 problem in 3 images of {data}"
    assert any(m.startswith("warning: img_01.png has no caption file") for m in cb.messages)
