"""The WD14-style ONNX tagger on a tiny model built here with onnx's helper API.

The model's probabilities are a known function of the mean B, G and R of its input
(sigmoid(mean / 255 @ W + b)), so a pure red and a pure blue image give known scores: tags,
thresholds, order, channel order (BGR) and the input size are all checked against them.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_images
from onnx import TensorProto, helper
from PIL import Image

from tsuika.trainers.captioning.captioners import CaptionerError, caption_folder, load_captioner
from tsuika.trainers.captioning.tagger import clean_tag, load_tagger, prepare
from tsuika.trainers.captioning.tools import merge_caption
from tsuika.trainers.data.folder import scan_folder

SIZE = 16  # the model's declared input side (the published ones say 448)
# name, category, weight on (B, G, R) mean in 0..1, bias: logit = mean @ w + bias
TAGS = [
    ("general", 9, (0, 0, 0), 5.0),        # rating, p 0.993 always: never written
    ("red_hair", 0, (0, 0, 8), -4.0),      # red image 0.982, blue 0.018
    ("blue_sky", 0, (8, 0, 0), -4.0),      # blue image 0.982, red 0.018
    ("^_^", 0, (0, 0, 0), 1.0),            # 0.731 always; a kaomoji keeps its underscore
    ("solo", 0, (0, 0, 0), 2.0),           # 0.881 always
    ("hatsune_miku", 4, (0, 0, 6), -2.0),  # character: red 0.982, blue 0.119
    ("low_conf", 0, (0, 0, 0), -1.0),      # 0.269: under the general threshold
    ("mid_character", 4, (0, 0, 0), 1.0),  # 0.731: over 0.35 but under 0.85 (character)
]
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _tagger(folder: Path, size: int = SIZE, tags=TAGS) -> Path:
    """Write model.onnx + selected_tags.csv (the WD14 layout) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    w = np.array([t[2] for t in tags], dtype=np.float32).T  # (3, tags)
    b = np.array([t[3] for t in tags], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("Mul", ["mean", "scale"], ["unit"]),
         helper.make_node("MatMul", ["unit", "w"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT,
                                       ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT,
                                       ["batch", len(tags)])],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255]),
                     helper.make_tensor("w", TensorProto.FLOAT, list(w.shape), w.ravel()),
                     helper.make_tensor("b", TensorProto.FLOAT, list(b.shape), b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime releases of the last years all read
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"]
    rows += [f"{1000 + i},{name},{cat},{100 - i}" for i, (name, cat, _, _) in enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return _tagger(tmp_path_factory.mktemp("tagger"))


def _square(color, side=24):
    return Image.new("RGB", (side, side), color)


def test_tags_thresholds_and_order(tagger_dir):
    tagger = load_tagger(tagger_dir)
    assert tagger.size == SIZE and not tagger.channels_first
    # character tags first, then general, each most confident first; the rating tag, the
    # tags under their category's threshold, never; underscores as spaces except in ^_^
    assert tagger.caption([_square(RED), _square(BLUE)]) == [
        "hatsune miku, red hair, solo, ^_^", "blue sky, solo, ^_^"]
    low = load_tagger(tagger_dir, threshold=0.2, character_threshold=0.7)
    assert low.caption([_square(RED)]) == [
        "hatsune miku, mid character, red hair, solo, ^_^, low conf"]
    probs = tagger.scores([_square(RED)])[0]
    assert probs.shape == (len(TAGS),)
    assert abs(probs[1] - 1 / (1 + np.exp(-4))) < 1e-4  # the model saw R = 255 in BGR slot 2


def test_exclude_max_tags_and_underscores(tagger_dir):
    red = [_square(RED)]
    # an excluded tag in either spelling, case-insensitive
    assert load_tagger(tagger_dir, exclude=["SOLO", "red_hair"]).caption(red) == [
        "hatsune miku, ^_^"]
    assert load_tagger(tagger_dir, max_tags=2).caption(red) == ["hatsune miku, red hair"]
    assert load_tagger(tagger_dir, keep_underscores=True).caption(red) == [
        "hatsune_miku, red_hair, solo, ^_^"]


def test_clean_tag_keeps_kaomoji():
    assert clean_tag("long_hair") == "long hair"
    assert clean_tag("looking_at_viewer") == "looking at viewer"
    for face in ("^_^", "o_o", "x_x", "3_3", "(o)_(o)", ">_<", "||_||"):
        assert clean_tag(face) == face
    assert clean_tag("long_hair", keep_underscores=True) == "long_hair"


def test_prepare_pads_with_white_to_a_bgr_square():
    wide = Image.new("RGB", (40, 20), RED)
    x = prepare(wide, 16)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    assert x[0, 0].tolist() == [255, 255, 255]  # the padding above the image: white
    assert x[8, 8].tolist() == [0, 0, 255]  # red, in BGR order, 0..255 (not normalised)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))  # fully transparent blue
    assert prepare(rgba, 16)[4, 4].tolist() == [255, 255, 255]  # onto white


def test_wide_image_is_padded_not_stretched(tagger_dir):
    # a 2:1 red image is half white after padding: B and G means 0.5, so blue_sky's logit is
    # 8 * 0.5 - 4 = 0 (p 0.5, over 0.35); stretched or black-padded it would stay at 0.018
    tagger = load_tagger(tagger_dir)
    probs = tagger.scores([Image.new("RGB", (48, 24), RED)])[0]
    assert abs(probs[2] - 0.5) < 0.02


def test_folder_captions_merge_and_load_through_the_captioner_entry(tagger_dir, tmp_path):
    make_images(tmp_path, n=3)
    for i, color in enumerate((RED, BLUE, RED)):
        Image.new("RGB", (24, 24), color).save(tmp_path / f"img_{i:02d}.png")
    (tmp_path / "img_00.txt").write_text("1girl, solo")
    (tmp_path / "img_01.txt").unlink()
    (tmp_path / "img_02.txt").write_text("a drawing")
    tagger = load_captioner(tagger_dir, tagger={"threshold": 0.5})
    assert tagger.kind == "tagger"
    res = caption_folder(scan_folder(tmp_path), tagger, prefix="sks")
    assert res.written == [tmp_path / "img_01.txt"]  # only where a caption was missing
    assert (tmp_path / "img_01.txt").read_text() == "sks, blue sky, solo, ^_^"
    assert (tmp_path / "img_00.txt").read_text() == "1girl, solo"
    res = caption_folder(scan_folder(tmp_path), tagger, overwrite=True, merge="append")
    assert len(res.written) == 3
    assert (tmp_path / "img_00.txt").read_text() == (
        "1girl, solo, hatsune miku, red hair, ^_^")  # solo once, where it was
    assert (tmp_path / "img_02.txt").read_text() == (
        "a drawing, hatsune miku, red hair, solo, ^_^")
    (tmp_path / "img_02.txt").write_text("a drawing, solo")
    caption_folder(scan_folder(tmp_path), tagger, overwrite=True, merge="prefix")
    assert (tmp_path / "img_02.txt").read_text() == (
        "hatsune miku, red hair, solo, ^_^, a drawing")
    caption_folder(scan_folder(tmp_path), tagger, overwrite=True, merge="replace")
    assert (tmp_path / "img_02.txt").read_text() == "hatsune miku, red hair, solo, ^_^"
    with pytest.raises(ValueError, match="merge 'mix' is not one of replace, prefix, append"):
        caption_folder(scan_folder(tmp_path), tagger, merge="mix")


def test_merge_caption():
    assert merge_caption("", "a, b", "append") == "a, b"
    assert merge_caption("x, a", "a, b", "append") == "x, a, b"
    assert merge_caption("x, a", "a, b", "prefix") == "a, b, x"
    assert merge_caption("x, a", "a, b", "replace") == "a, b"


def test_bad_tagger_folders_are_named(tagger_dir, tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.onnx").write_bytes((tagger_dir / "model.onnx").read_bytes())
    with pytest.raises(CaptionerError) as e:
        load_captioner(half)
    assert str(half) in str(e.value) and "selected_tags.csv" in str(e.value)
    assert "model.onnx (" not in str(e.value)  # it is there: not asked for
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaptionerError, match="model.onnx and selected_tags.csv"):
        load_captioner(empty)  # neither layout: both named
    short = _tagger(tmp_path / "short", tags=TAGS)
    (short / "selected_tags.csv").write_text("tag_id,name,category\n1,solo,0\n")
    with pytest.raises(CaptionerError, match="gives 8 outputs but its selected_tags.csv "
                       "lists 1 tags"):
        load_tagger(short).caption([_square(RED)])
    (short / "selected_tags.csv").write_text("tag,kind\nsolo,0\n")
    with pytest.raises(CaptionerError, match="needs the columns 'name' and 'category'"):
        load_tagger(short)
    (short / "model.onnx").write_bytes(b"not a model")
    (short / "selected_tags.csv").write_text("name,category\nsolo,0\n")
    with pytest.raises(CaptionerError, match="cannot be loaded by onnxruntime"):
        load_tagger(short)
    with pytest.raises(CaptionerError, match="threshold 1.5 is not a probability"):
        load_tagger(tagger_dir, threshold=1.5)


def test_cli_caption_with_a_tagger(tagger_dir, tmp_path):
    make_images(tmp_path, n=2)
    Image.new("RGB", (24, 24), RED).save(tmp_path / "img_01.png")
    (tmp_path / "img_01.txt").unlink()
    r = subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "caption", str(tmp_path),
                        "--model", str(tagger_dir), "--threshold", "0.5",
                        "--character-threshold", "0.9", "--exclude", "solo",
                        "--max-tags", "3", "--prefix", "sks"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 1 caption files; 1 kept" in r.stdout
    assert (tmp_path / "img_01.txt").read_text() == "sks, hatsune miku, red hair, ^_^"
    r = subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "caption", str(tmp_path),
                        "--model", str(tagger_dir), "--overwrite", "--merge", "append",
                        "--threshold", "0.5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "img_01.txt").read_text() == "sks, hatsune miku, red hair, ^_^, solo"
