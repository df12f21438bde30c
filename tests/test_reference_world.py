"""The reference world: deterministic renders, distinct attribute values, captions, datasets."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from tsuika.reference import world
from tsuika.reference.concepts import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    Scene,
    vocabulary,
)


def scene(**kw) -> Scene:
    spec = {"shape": "circle", "color": "red", "texture": "solid", "background": "gray",
            "position": "center", "size": "large", **kw}
    if spec["shape"] == "zorbit":  # objects have fixed colours
        del spec["color"], spec["texture"]
    return Scene.from_spec(spec)


def pixels(s: Scene, size: int = 32) -> np.ndarray:
    return np.asarray(world.render(s, size)).astype(int)


def subject_mask(s: Scene, size: int = 32) -> np.ndarray:
    """Pixels that differ from the background colour."""
    return np.abs(pixels(s, size) - np.array(BACKGROUNDS[s.background])).sum(-1) > 30


def test_render_is_deterministic_and_sized():
    s = world.sample_scene(random.Random(3), include_held_out=True)
    a, b = world.render(s, 64), world.render(s, 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert world.render(s, 32).size == (32, 32)
    moved = Scene.from_spec(s.spec(), offset=(0.03, 0.0))
    assert world.render(moved, 64).tobytes() != a.tobytes()
    with pytest.raises(ValueError, match="at least 16"):
        world.render(s, 8)


@pytest.mark.parametrize("color", list(COLORS))
def test_every_colour_shows_at_the_subject_centre(color):
    centre = pixels(scene(color=color))[16, 16]
    assert np.abs(centre - np.array(COLORS[color])).max() <= 2


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_every_background_fills_the_corners(background):
    px = pixels(scene(background=background, position="center", size="small"))
    for corner in (px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]):
        assert np.abs(corner - np.array(BACKGROUNDS[background])).max() <= 1


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("shape", list(SHAPES) + ["zorbit"])
def test_subject_centroid_lies_in_its_position(position, shape):
    s = scene(shape=shape, position=position, size="small")
    ys, xs = np.nonzero(subject_mask(s, 64))
    cx, cy = xs.mean() / 64, ys.mean() / 64
    want_x, want_y = POSITIONS[position]
    assert abs(cx - want_x) < 0.08 and abs(cy - want_y) < 0.08, (cx, cy)


@pytest.mark.parametrize("shape", SHAPES)
def test_large_is_clearly_larger_than_small(shape):
    small = subject_mask(scene(shape=shape, size="small"), 64).sum()
    large = subject_mask(scene(shape=shape, size="large"), 64).sum()
    assert large > 2.0 * small > 0


def test_shapes_differ_from_each_other():
    masks = {s: subject_mask(scene(shape=s), 64) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                differing = (masks[a] ^ masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert differing > 0.15, (a, b, differing)


def test_the_named_object_shows_both_part_colours():
    px = pixels(Scene.from_spec({"shape": "zorbit", "background": "gray",
                                 "position": "center", "size": "large"}), 64).reshape(-1, 3)
    for color in ("blue", "orange"):
        close = np.abs(px - np.array(COLORS[color])).max(1) <= 2
        assert close.sum() > 40, color


def test_textures_have_their_own_pattern():
    def interior(texture):  # the middle of a large square, inside the shape
        return pixels(scene(shape="square", texture=texture, color="blue"), 64)[24:40, 24:40]

    def spread(a, axis):  # mean colour spread along rows (axis=1) or columns (axis=0)
        return a.std(axis=axis).mean()

    solid, striped, checkered = (interior(t) for t in ("solid", "striped", "checkered"))
    assert spread(solid, 0) < 1 and spread(solid, 1) < 1
    assert spread(striped, 1) < 1 < 20 < spread(striped, 0)  # horizontal stripes
    assert spread(checkered, 0) > 20 and spread(checkered, 1) > 20


def test_pattern_phase_moves_the_grid_not_the_shape():
    s = scene(shape="square", texture="checkered", color="blue")
    fixed = np.asarray(world.render(s, 64)).astype(int)
    assert np.array_equal(np.asarray(world.render(s, 64, (0.0, 0.0))), fixed)
    half = np.asarray(world.render(s, 64, (0.5, 0.0))).astype(int)  # 4 px: cells swap
    inside = (slice(24, 40), slice(24, 40))
    assert np.abs(half[inside] - fixed[inside]).max() > 40
    assert np.array_equal(half[inside], fixed[24:40, 20:36])  # same grid, moved 4 px
    assert np.array_equal(subject_mask(s, 64), np.abs(
        half - np.array(BACKGROUNDS[s.background])).sum(-1) > 30)  # the outline stays put
    solid = scene(texture="solid")
    assert world.render(solid, 32, (0.3, 0.7)).tobytes() == world.render(solid, 32).tobytes()
    with pytest.raises(ValueError, match="pattern_phase"):
        world.render(s, 64, (1.0, 0.0))


def test_scene_validation_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match="Scene.color = 'mauve'.*red"):
        scene(color="mauve")
    with pytest.raises(ValueError, match="object with fixed colours"):
        Scene("zorbit", "red", None, "gray", "center", "large")
    with pytest.raises(ValueError, match="lacks"):
        Scene.from_spec({"shape": "circle"})


def test_pretraining_samples_never_show_held_out_values():
    held = {(c.attribute, c.value) for c in HELD_OUT.values()}
    rng = random.Random(0)
    seen_known, seen_all = set(), set()
    for _ in range(600):
        seen_known |= set(world.sample_scene(rng).spec().items())
        seen_all |= set(world.sample_scene(rng, include_held_out=True).spec().items())
    assert not held & seen_known
    assert held <= seen_all
    assert {(a, v) for a, vs in vocabulary(False).items() for v in vs} <= seen_known


def test_finetune_scenes_show_the_concept_in_its_context():
    rng = random.Random(1)
    for name, held in HELD_OUT.items():
        for _ in range(20):
            spec = world.sample_finetune_scene(rng, name).spec()
            assert spec[held.attribute] == name
            assert held.finetune_context.items() <= spec.items()
    with pytest.raises(ValueError, match="not held out"):
        world.sample_finetune_scene(rng, "circle")


def test_new_contexts_are_never_in_the_finetuning_set():
    for held in HELD_OUT.values():
        assert held.new_contexts
        for ctx in held.new_contexts:
            assert any(ctx.get(a) != v for a, v in held.finetune_context.items()), ctx


@pytest.mark.parametrize("seed", range(4))
def test_captions_name_every_attribute_and_parse_back(seed):
    rng = random.Random(seed)
    for _ in range(25):
        s = world.sample_scene(rng, include_held_out=True)
        text = world.caption(s, rng)
        for value in s.spec().values():
            assert value in text
        assert world.parse_prompt(text) == s.spec()
    assert world.caption(scene(texture="striped", size="small", position="top left")) == \
        "a striped red circle on a gray background, small, top left"


def test_trigger_words_replace_the_concept_name():
    s = Scene.from_spec({"shape": "zorbit", "background": "teal", "position": "center",
                         "size": "small"})
    text = world.caption(s, words={"zorbit": "sks"})
    assert "sks" in text and "zorbit" not in text
    assert world.parse_prompt(text, words={"zorbit": "sks"})["shape"] == "zorbit"


def test_make_dataset_writes_png_caption_pairs(tmp_path):
    paths = world.make_dataset(tmp_path / "pre", n=6, seed=0, size=32)
    assert len(paths) == 6
    assert sorted(p.stem for p in (tmp_path / "pre").glob("*.png")) == \
        sorted(p.stem for p in (tmp_path / "pre").glob("*.txt"))
    for p in paths:
        assert Image.open(p).size == (32, 32)
        spec = world.parse_prompt(p.with_suffix(".txt").read_text(encoding="utf-8"))
        assert "heart" not in spec.values() and "zorbit" not in spec.values()
        assert set(spec) >= {"shape", "background", "position", "size"}
    again = world.make_dataset(tmp_path / "again", n=6, seed=0, size=32)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    with pytest.raises(FileExistsError, match="not empty"):
        world.make_dataset(tmp_path / "pre", n=1, seed=0, size=32)


def test_make_dataset_of_a_held_out_concept(tmp_path):
    paths = world.make_dataset(tmp_path, n=5, seed=2, size=32, held_out_concept="heart",
                               words={"heart": "zxq heart"})
    for p in paths:
        text = p.with_suffix(".txt").read_text(encoding="utf-8")
        assert "zxq heart" in text and "red" in text and "gray" in text
    with pytest.raises(ValueError, match="not held out"):
        world.make_dataset(tmp_path / "x", n=1, held_out_concept="hexagon")


def test_evaluation_prompts():
    prompts = world.prompts_for_eval()
    held = {(c.attribute, c.value) for c in HELD_OUT.values()}
    retention = [p for p in prompts if p.kind == "retention"]
    assert retention and all(not held & set(p.spec.items()) for p in retention)
    covered = {(a, v) for p in retention for a, v in p.spec.items()}
    assert covered == {(a, v) for a, vs in vocabulary(False).items() for v in vs}
    for name in HELD_OUT:
        kinds = [p.kind for p in prompts if p.concept == name]
        assert kinds.count("concept") == 1 and kinds.count("new_context") >= 1
    assert len({p.text for p in prompts}) == len(prompts)
    for p in prompts:
        assert world.parse_prompt(p.text) == p.spec
    sks = world.prompts_for_eval(words={"zorbit": "sks"})
    assert all("zorbit" not in p.text for p in sks)
    assert any("sks" in p.text for p in sks)
