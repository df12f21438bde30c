"""Captions encoded once and text encoders moved off the device (train.offload_text_encoders).

The move itself needs an accelerator (tests/test_gpu.py measures it); here: which runs encode
everything up front, that no step then calls a text encoder, that the result is the run
without it, and that the bookkeeping refuses what it did not see.
"""

import pytest
import torch
from conftest import tiny_overrides

from tsuika.trainers.callbacks import Callbacks
from tsuika.trainers.config import build_config
from tsuika.trainers.data.captions import split_tags
from tsuika.trainers.families import get_family
from tsuika.trainers.loop import train
from tsuika.trainers.text_conditioning import TextConditioning


def _counted_run(monkeypatch, tiny_model, image_folder, out, **extra):
    """(losses, encoder calls made during the steps, messages) of a 4-step run."""
    family = type(get_family("sd15"))
    real = family.encode_text
    monkeypatch = monkeypatch.context().__enter__()  # undone below: runs don't stack wrappers
    calls = {"n": 0, "in_steps": 0, "started": False}

    def counting(self, bundle, captions, device):
        calls["n"] += 1
        calls["in_steps"] += calls["started"]
        return real(self, bundle, captions, device)

    monkeypatch.setattr(family, "encode_text", counting)
    messages = []

    class Listen(Callbacks):
        def on_start(self, info):
            calls["started"] = True

        def on_message(self, text):
            messages.append(text)

    cfg = build_config(overrides=tiny_overrides(tiny_model["single_file"], image_folder, out,
                                                steps=4, **extra))
    try:
        res = train(cfg, Listen())
    finally:
        monkeypatch.undo()
    return res.losses, calls, messages


def test_fixed_captions_are_encoded_before_the_first_step(monkeypatch, tiny_model,
                                                          image_folder, tmp_path):
    losses_on, on, _ = _counted_run(monkeypatch, tiny_model, image_folder, tmp_path / "on")
    losses_off, off, _ = _counted_run(monkeypatch, tiny_model, image_folder, tmp_path / "off",
                                      **{"train.offload_text_encoders": "false"})
    assert on["in_steps"] == 0 and on["n"] >= 1  # all four captions in one batch, up front
    assert off["in_steps"] > 0  # without the option the cache fills as captions turn up
    assert losses_on == pytest.approx(losses_off, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("extra", [{"data.shuffle_tags": "true"},
                                   {"data.caption_dropout": "0.5"},
                                   {"network.train_text_encoder": "true"}],
                         ids=["shuffled", "dropout", "trained-encoder"])
def test_captions_that_can_change_are_encoded_per_step(monkeypatch, tiny_model, image_folder,
                                                       tmp_path, extra):
    _, calls, messages = _counted_run(monkeypatch, tiny_model, image_folder, tmp_path, **extra)
    assert calls["in_steps"] >= 4  # every step encodes its captions
    assert not any("encoded once" in m for m in messages)
    hinted = any("data.caption_variants" in m for m in messages)
    assert hinted == ("network.train_text_encoder" not in extra)  # the way to cache them


def test_previews_still_sample_with_the_encoders_parked(monkeypatch, tiny_model, image_folder,
                                                        tmp_path):
    """A preview mid-run and at the end, with the text encoders (and the VAE) parked."""
    cfg = build_config(overrides=tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path, steps=4,
        **{"sample.prompts": '["a red circle"]', "sample.every": 2, "sample.steps": 2}))
    seen = []

    class Listen(Callbacks):
        def on_sample(self, step, images, prompts):
            seen.append(step)

    res = train(cfg, Listen())
    assert seen == [0, 2, 4] and len(res.samples_after) == 1


class _Family:
    def __init__(self):
        self.calls = []

    def encode_text(self, bundle, captions, device):
        self.calls.append(list(captions))
        return {"context": torch.arange(len(captions), dtype=torch.float32)[:, None]
                + torch.tensor([[0.5]]) * torch.tensor([hash(c) % 7 for c in captions])[:, None]}


class _Bundle:
    text_encoders: list = []


def test_cached_rows_come_back_in_caption_order_and_unseen_captions_are_refused():
    fam = _Family()
    tc = TextConditioning(fam, _Bundle(), torch.device("cpu"), cacheable=True)
    assert tc.encode_all(["b", "a", "b"]) == 2 and fam.calls == [["b", "a"]]
    direct = {c: tc.cache[c]["context"] for c in ("a", "b")}
    got = tc(["a", "b", "a"])["context"]
    assert torch.equal(got, torch.cat([direct["a"], direct["b"], direct["a"]]))
    assert len(fam.calls) == 1  # nothing encoded again
    tc.offload()
    with pytest.raises(RuntimeError, match="'c' was not encoded.*offload_text_encoders"):
        tc(["c"])
    tc.restore()
    tc(["c"])  # encoders back: a new caption is encoded again
    assert fam.calls[-1] == ["c"]


@pytest.mark.parametrize("extra", [{"data.shuffle_tags": "true"},
                                   {"data.shuffle_tags": "true", "data.caption_dropout": "0.5"},
                                   {"data.tag_dropout": "0.5"}],
                         ids=["shuffled", "shuffled+dropout", "tag-dropout"])
def test_caption_variants_are_encoded_before_the_first_step(monkeypatch, tiny_model,
                                                            image_folder, tmp_path, extra):
    """data.caption_variants: augmented captions drawn up front, so no step encodes; the same
    seed gives the same run."""
    extra = {**extra, "data.caption_variants": 3}
    losses, calls, messages = _counted_run(monkeypatch, tiny_model, image_folder,
                                           tmp_path / "a", **extra)
    again, _, _ = _counted_run(monkeypatch, tiny_model, image_folder, tmp_path / "b", **extra)
    assert calls["in_steps"] == 0 and calls["n"] >= 1
    told = [m for m in messages if "encoded once before the first step" in m]
    assert len(told) == 1 and int(told[0].split()[0]) > 4, messages  # 4 images, >1 version
    assert losses == again


def _data(folder, **options):
    """TrainingData on ``folder`` without a model (captions only: nothing is encoded)."""
    from types import SimpleNamespace

    from tsuika.trainers.prepare import TrainingData

    values = {"data.dir": folder, "output.dir": folder.parent / "out", "train.seed": 7,
              "data.cache_latents": "false", **options}
    cfg = build_config(overrides=[f"{k}={v}" for k, v in values.items()])
    bundle = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5)))
    return TrainingData(cfg, bundle, precision=None, cache_root=folder.parent / "cache")


def test_each_step_draws_one_of_its_images_variants_and_dropout_keeps_its_rate(tmp_path):
    import random

    from conftest import make_images

    folder = tmp_path / "data"
    make_images(folder, n=3, caption="red, circle, small, drawing")
    data = _data(folder, **{"data.shuffle_tags": "true", "data.caption_dropout": "0.25",
                            "data.caption_variants": 6})
    assert data.captions_static
    known = set(data.fixed_captions())
    assert "" in known and len(known) > 3  # the empty caption and several arrangements
    drawn = {i: [data._step_caption(i, random.Random(f"step:{s}")) for s in range(400)]
             for i in range(3)}
    for i, captions in drawn.items():
        words = set(split_tags(data.examples[i].caption))
        kept = [c for c in captions if c]
        assert set(kept) <= set(data.variants[i]) and set(kept) <= known
        assert all(set(split_tags(c)) == words for c in kept)  # shuffled, nothing dropped
        assert len(set(kept)) > 1  # the steps do not all use one arrangement
        assert 0.15 < captions.count("") / len(captions) < 0.35  # caption_dropout 0.25
    same = _data(folder, **{"data.shuffle_tags": "true", "data.caption_dropout": "0.25",
                            "data.caption_variants": 6})
    assert same.variants == data.variants  # drawn from the seed: a resumed run draws these
    other = _data(folder, **{"data.shuffle_tags": "true", "data.caption_dropout": "0.25",
                             "data.caption_variants": 6, "train.seed": 8})
    assert other.variants != data.variants


def test_caption_variants_change_nothing_where_captions_do_not_vary(tmp_path):
    from conftest import make_images

    folder = tmp_path / "data"
    make_images(folder, n=2)
    plain = _data(folder, **{"data.caption_variants": 4})
    assert plain.variants is None and plain.captions_static
    per_step = _data(folder, **{"data.shuffle_tags": "true"})
    assert per_step.variants is None and not per_step.captions_static
    assert per_step.fixed_captions() is None
