"""The reference evaluator: a seconds-long training run, its file, its scores, and (when the
shipped weights exist) their accuracy on fresh renders."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tsuika.reference import world
from tsuika.reference.concepts import ATTRIBUTES, Scene, vocabulary
from tsuika.reference.evaluator import Evaluator
from tsuika.reference.train_evaluator import head_accuracy, main, render_batch, train_evaluator

SHIPPED = Path(__file__).resolve().parents[1] / "reference" / "evaluator.safetensors"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A net this small gains nothing from more threads, and on a busy machine torch's
    thread pool waiting for its peers made training here 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_evaluator(one_thread) -> Evaluator:
    return train_evaluator(steps=120, seed=0, image_size=32, batch_size=32, width=8, hidden=32,
                           val_size=64, log_every=1000)


def renders(n: int, seed: int, size: int = 32):
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, include_held_out=True) for _ in range(n)]
    return scenes, [world.render(s, size) for s in scenes]


def test_short_training_learns_something(tiny_evaluator):
    report = tiny_evaluator.report
    assert set(report["val_accuracy"]) == set(ATTRIBUTES)
    # 120 small steps: the background (4 plain colours) is learnt well above chance (0.25).
    assert report["val_accuracy"]["background"] > 0.6
    assert all(0.0 <= v <= 1.0 for v in report["val_accuracy"].values())


def test_predict_returns_labels_of_the_vocabulary(tiny_evaluator):
    _, images = renders(10, seed=5)
    preds = tiny_evaluator.predict(images)
    assert len(preds) == 10
    vocab = vocabulary()
    for p in preds:
        assert set(p) == set(ATTRIBUTES)
        for a, v in p.items():
            assert v in vocab[a] or (v is None and a in ("color", "texture")
                                     and p["shape"] == "zorbit")


def test_predict_accepts_pil_nchw_and_nhwc_alike(tiny_evaluator):
    _, images = renders(6, seed=6)
    nhwc = torch.from_numpy(np.stack([np.asarray(im) for im in images])).float() / 255
    from_pil = tiny_evaluator.predict(images)
    assert tiny_evaluator.predict(nhwc) == from_pil
    assert tiny_evaluator.predict(nhwc.permute(0, 3, 1, 2)) == from_pil
    big = [world.render(s, 64) for s in renders(6, seed=6)[0]]
    assert len(tiny_evaluator.predict(big)) == 6  # resized to the evaluator's 32 px
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        tiny_evaluator.predict(nhwc * 2 - 1)
    with pytest.raises(ValueError, match="empty"):
        tiny_evaluator.predict([])


def test_scores_are_fractions(tiny_evaluator):
    prompts = world.prompts_for_eval()
    images = {p: [world.render(p.scene, 32)] * 3 for p in prompts}
    heart = next(p for p in prompts if p.concept == "heart" and p.kind == "new_context")
    for value in (tiny_evaluator.concept_fidelity(images[heart], "heart"),
                  tiny_evaluator.prompt_fidelity(images[heart], heart),
                  tiny_evaluator.prompt_fidelity(images[heart], heart.text),
                  tiny_evaluator.retention({p: images[p] for p in prompts
                                            if p.kind == "retention"})):
        assert 0.0 <= value <= 1.0 and value * 3 == round(value * 3)


def test_score_definitions(tiny_evaluator, monkeypatch):
    """With the classifier replaced by fixed answers the scores are exact counts."""
    answers = [
        {"shape": "heart", "color": "green", "texture": "solid", "background": "gray",
         "position": "bottom right", "size": "large"},
        {"shape": "heart", "color": "red", "texture": "solid", "background": "gray",
         "position": "bottom right", "size": "large"},
        {"shape": "circle", "color": "green", "texture": "solid", "background": "gray",
         "position": "bottom right", "size": "large"},
        {"shape": "heart", "color": "green", "texture": "solid", "background": "gray",
         "position": "top left", "size": "large"},
    ]
    monkeypatch.setattr(tiny_evaluator, "predict", lambda images: answers[:len(images)])
    four = [None] * 4
    assert tiny_evaluator.concept_fidelity(four, "heart") == 0.75
    assert tiny_evaluator.concept_fidelity(four, "green") == 0.75
    new_context = {"shape": "heart", "color": "green", "position": "bottom right"}
    assert tiny_evaluator.prompt_fidelity(four, new_context) == 0.25
    assert tiny_evaluator.prompt_fidelity(four, "a green heart, bottom right") == 0.25
    full = Scene.from_spec(answers[0])
    assert tiny_evaluator.prompt_fidelity(four, full) == 0.25
    # Retention weighs prompts equally: (0.25 + 1.0) / 2, not (1 + 1) / 5.
    assert tiny_evaluator.retention({full: four, "a heart": [None]}) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="not a label"):
        tiny_evaluator.concept_fidelity(four, "hexagon")
    with pytest.raises(ValueError, match="empty"):
        tiny_evaluator.retention({})


def test_save_load_round_trip(tiny_evaluator, tmp_path):
    path, sidecar = tiny_evaluator.save(tmp_path / "ev.safetensors")
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    assert meta["vocab"] == {a: list(v) for a, v in vocabulary().items()}
    assert set(meta["val_accuracy"]) == set(ATTRIBUTES)
    loaded = Evaluator.load(path)
    _, images = renders(8, seed=7)
    assert loaded.predict(images) == tiny_evaluator.predict(images)
    assert loaded.report["val_accuracy"] == tiny_evaluator.report["val_accuracy"]
    with pytest.raises(FileExistsError, match="overwrite"):
        tiny_evaluator.save(path)
    with pytest.raises(FileNotFoundError, match="train_evaluator"):
        Evaluator.load(tmp_path / "missing.safetensors")


def test_command_line_writes_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cli.safetensors"
    args = ["--out", str(out), "--steps", "2", "--image-size", "32", "--batch-size", "4",
            "--val-size", "4"]
    assert main(args) == 0  # sets one thread, as the one_thread fixture does
    assert out.is_file() and out.with_suffix(".json").is_file()
    before = out.read_bytes()
    assert main(args) == 2
    assert out.read_bytes() == before


def test_roughened_training_batches_keep_their_labels():
    x, labels = render_batch(random.Random(0), 6, 32)
    assert x.shape == (6, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert all(len(v) == 6 for v in labels.values())


@pytest.mark.skipif(not SHIPPED.is_file(), reason="reference/evaluator.safetensors not built")
def test_shipped_evaluator_reads_fresh_clean_renders():
    evaluator = Evaluator.load(SHIPPED)
    assert SHIPPED.stat().st_size < 2 * 1024 * 1024
    x, labels = render_batch(random.Random(20240611), 400, evaluator.image_size)
    accuracy = head_accuracy(evaluator.net, x, labels)
    assert all(v > 0.95 for v in accuracy.values()), accuracy
    prompts = world.prompts_for_eval()
    images = {p: [world.render(p.scene, evaluator.image_size)] for p in prompts}
    assert evaluator.retention({p: v for p, v in images.items() if p.kind == "retention"}) == 1
    for p in prompts:
        if p.concept:
            assert evaluator.concept_fidelity(images[p], p.concept) == 1, p.text


@pytest.mark.skipif(not SHIPPED.is_file(), reason="reference/evaluator.safetensors not built")
def test_shipped_evaluator_reads_patterns_off_the_canvas_grid():
    """Generated stripes and checks do not keep the renderer's grid phase; an evaluator
    trained on that phase only called a checkered LoRA's samples "solid"."""
    evaluator = Evaluator.load(SHIPPED)
    rng = random.Random(11)
    for texture in ("striped", "checkered"):
        scenes = [world.sample_scene(rng) for _ in range(40)]
        scenes = [Scene.from_spec({**s.spec(), "texture": texture}) for s in scenes
                  if s.texture is not None]
        for phase in ((0.25, 0.25), (0.5, 0.5), (0.75, 0.0)):
            images = [world.render(s, evaluator.image_size, phase) for s in scenes]
            read = [q["texture"] for q in evaluator.predict(images)]
            assert read.count(texture) >= 0.9 * len(read), (texture, phase, read)
