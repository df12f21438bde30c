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
    assert not any("text encoders moved" in m for m in messages)


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
