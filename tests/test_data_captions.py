"""CaptionAugment: trigger word, keep_tokens, shuffling and dropout, all seeded."""

from __future__ import annotations

import random

import pytest

from tsuika.trainers.data.captions import CaptionAugment, split_tags

CAPTION = "1girl, red hair, smiling, outdoors, blue sky, looking at viewer"


def test_trigger_is_prepended_once():
    aug = CaptionAugment(trigger_word="mychar")
    assert aug.apply(CAPTION, random.Random(0)) == "mychar, " + CAPTION
    assert aug.apply("", random.Random(0)) == "mychar"
    moved = aug.apply("red hair, MyChar, smiling, mychar", random.Random(0))
    assert moved == "mychar, red hair, smiling"
    already = aug.apply("mychar, red hair", random.Random(0))
    assert already == "mychar, red hair"


def test_static_caption_is_returned_as_given_and_rng_untouched():
    rng = random.Random(1)
    state = rng.getstate()
    aug = CaptionAugment()
    assert aug.is_static
    assert aug.apply("a photo,of  a cat ", rng) == "a photo,of  a cat "
    assert CaptionAugment(trigger_word="x").apply("a, b", rng) == "x, a, b"
    assert rng.getstate() == state


def test_same_rng_state_gives_same_caption():
    aug = CaptionAugment(trigger_word="mychar", shuffle_tags=True, tag_dropout=0.3,
                         caption_dropout=0.1)
    first = [aug.apply(CAPTION, random.Random(s)) for s in range(30)]
    again = [aug.apply(CAPTION, random.Random(s)) for s in range(30)]
    assert first == again
    assert len(set(first)) > 10  # and different seeds really differ


def test_shuffle_is_a_permutation_that_keeps_the_first_tags():
    aug = CaptionAugment(trigger_word="mychar", shuffle_tags=True, keep_tokens=2)
    tags = split_tags(CAPTION)
    orders = set()
    for seed in range(40):
        out = split_tags(aug.apply(CAPTION, random.Random(seed)))
        assert out[:2] == ["mychar", "1girl"]  # trigger counts as one of the kept tags
        assert sorted(out[1:]) == sorted(tags)
        orders.add(tuple(out))
    assert len(orders) > 20


def test_trigger_is_kept_even_with_keep_tokens_zero():
    aug = CaptionAugment(trigger_word="sks, red coat", shuffle_tags=True, tag_dropout=0.5)
    for seed in range(40):
        out = split_tags(aug.apply(CAPTION, random.Random(seed)))
        assert out[:2] == ["sks", "red coat"]
        assert set(out[2:]) <= set(split_tags(CAPTION))


def test_tag_dropout_drops_only_unkept_tags():
    everything = CaptionAugment(keep_tokens=2, tag_dropout=1.0)
    assert everything.apply(CAPTION, random.Random(0)) == "1girl, red hair"
    some = CaptionAugment(keep_tokens=1, tag_dropout=0.5)
    lengths = [len(split_tags(some.apply(CAPTION, random.Random(s)))) for s in range(200)]
    assert min(lengths) >= 1 and max(lengths) <= 6
    mean_dropped = 6 - sum(lengths) / len(lengths)
    assert 2.0 < mean_dropped < 3.0  # about half of the 5 unkept tags
    kept_order = some.apply(CAPTION, random.Random(3)).split(", ")
    assert kept_order == [t for t in split_tags(CAPTION) if t in kept_order]  # no shuffle


def test_caption_dropout_empties_everything_including_trigger():
    assert CaptionAugment(trigger_word="mychar", caption_dropout=1.0).apply(
        CAPTION, random.Random(0)) == ""
    aug = CaptionAugment(trigger_word="mychar", caption_dropout=0.25)
    empty = sum(aug.apply(CAPTION, random.Random(s)) == "" for s in range(2000))
    assert 400 < empty < 600


def test_is_static():
    assert CaptionAugment(trigger_word="x", keep_tokens=3).is_static
    assert not CaptionAugment(shuffle_tags=True).is_static
    assert not CaptionAugment(tag_dropout=0.1).is_static
    assert not CaptionAugment(caption_dropout=0.1).is_static


@pytest.mark.parametrize("kwargs,field", [
    ({"tag_dropout": 1.5}, "tag_dropout"), ({"caption_dropout": -0.1}, "caption_dropout"),
    ({"tag_dropout": float("nan")}, "tag_dropout"), ({"keep_tokens": -1}, "keep_tokens"),
    ({"keep_tokens": 1.5}, "keep_tokens"), ({"shuffle_tags": "yes"}, "shuffle_tags"),
    ({"trigger_word": 3}, "trigger_word"),
])
def test_invalid_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CaptionAugment(**kwargs)
