"""Training teaches: a short LoRA run on the shipped reference model learns a concept the model
never saw, and the model keeps drawing what it knew (``reference.quality``).

``TSUIKA_QUALITY_TEST_LR=0 pytest tests/test_quality.py`` deliberately breaks the training
(learning rate 0): the first test must then fail.
"""

import os

import pytest

from tsuika.reference.quality import (
    REFERENCE_MODEL,
    Sampling,
    finetune,
    gate,
    load_reference,
    score,
    score_lora,
    vae_ceiling,
)

CONCEPT = "heart"
STEPS = 150
LEARNING_RATE = float(os.environ.get("TSUIKA_QUALITY_TEST_LR", "5e-4"))
SAMPLING = Sampling(images=16)  # 128 retention samples: steadier than 64


@pytest.fixture(scope="module")
def before():
    assert (REFERENCE_MODEL / "unet" / "config.json").is_file(), (
        f"the reference model must ship at {REFERENCE_MODEL}")
    return score(load_reference(), CONCEPT, SAMPLING)


def test_the_base_model_follows_prompts_and_does_not_know_the_concept(before):
    assert before["retention_subject"] >= 0.5, before
    assert before["concept_fidelity"] <= 0.25, before


def test_the_concept_is_within_reach_of_the_decoder():
    # Samples pass through the VAE decoder: a concept it cannot draw cannot be learned by
    # any UNet-side method, and the CI gate would test the VAE instead of the training.
    assert vae_ceiling(load_reference().vae, CONCEPT) >= 0.9


def test_short_lora_learns_the_concept_and_keeps_retention(before, tmp_path):
    run = finetune(CONCEPT, tmp_path, steps=STEPS, learning_rate=LEARNING_RATE)
    after = score_lora(run["file"], CONCEPT, SAMPLING)
    assert gate(before, after) == [], (before, after)


def test_the_gate_fails_a_training_that_changed_nothing(before, tmp_path):
    run = finetune(CONCEPT, tmp_path, steps=10, learning_rate=0.0)
    after = score_lora(run["file"], CONCEPT, SAMPLING)
    problems = gate(before, after)
    assert len(problems) == 1 and "concept fidelity rose by" in problems[0], problems
    # Nothing was learned, so the model is the base model: the same seeds give the same scores.
    assert after["concept_fidelity"] == before["concept_fidelity"]
    assert after["retention_subject"] == before["retention_subject"]
