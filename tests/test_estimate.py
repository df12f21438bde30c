"""The pre-flight estimate (trainers/estimate.py): its extrapolation, and a real probe run.

How close it comes to real runs is measured in benchmarks/estimate_check.py (figures in
docs/BENCHMARKS.md), never here: timings are not asserted, only what the estimate is made of.
"""

from pathlib import Path

from conftest import make_images, tiny_overrides

from tsuika.trainers.config import build_config
from tsuika.trainers.data.folder import scan_folder
from tsuika.trainers.estimate import _extrapolate, estimate_run


def _config(tmp_path: Path, **extra):
    return build_config(overrides=tiny_overrides(Path("/nonexistent/model.safetensors"),
                                                 tmp_path, tmp_path / "out", **extra))


def test_the_fixed_part_of_the_data_phase_is_not_multiplied_by_the_images(tmp_path):
    config = _config(tmp_path, steps=10)
    times = {"load": 5.0, "data": 4.0, "per_image": 3.0, "per_image_fixed": 1.0,
             "samples_before": 0.0, "save": 0.5, "save_end": 100.0}
    # probe: 2 distinct images; run: 8. Per image (3 - 1) / 2 = 1; fixed 4 - 2 = 2 (the VAE
    # hash among it); steps: first 2.0 (1.0 warm-up), then 1.0; after the save: 0.25
    got = _extrapolate(config, times, [2.0, 1.0, 1.0], 100.25, 2, 8, [])
    assert got["setup"] == 5.0 + 2.0 + 8 * 1.0
    assert got["step"] == 1.0 and got["sampling"] == 0.0
    assert got["total"] == got["setup"] + 1.0 + 10 * 1.0 + 0.5 + 0.25
    # counted per image as before, the hash would have been 4 images' worth more
    old = dict(times, per_image_fixed=0.0)
    assert _extrapolate(config, old, [2.0, 1.0, 1.0], 100.25, 2, 8, [])["setup"] == 5 + 1 + 12


def test_sample_rounds_scale_with_their_denoising_steps(tmp_path):
    config = _config(tmp_path, steps=20, **{"sample.prompts": "a photo", "sample.every": 10,
                                            "sample.steps": 8})
    times = {"load": 0.0, "data": 0.0, "per_image": 0.0, "per_image_fixed": 0.0,
             "samples_before": 1.0, "save": 0.0, "save_end": 0.0}
    got = _extrapolate(config, times, [1.0, 1.0], 1.0, 2, 2, ["a photo"])
    # before training, at step 10, and at the end: 3 rounds of 8 steps (the probe ran 2)
    assert got["sampling"] == 3 * 1.0 * 8 / 2


def test_probe_runs_the_real_loop_and_leaves_the_dataset_alone(tiny_model, tmp_path):
    data = tmp_path / "data"
    make_images(data, n=5)
    before = sorted(p.name for p in data.iterdir())
    config = build_config(overrides=tiny_overrides(tiny_model["single_file"], data,
                                                   tmp_path / "out", steps=50))
    est = estimate_run(config, scan_folder(data))
    assert sorted(p.name for p in data.iterdir()) == before  # no cache, no caption written
    assert not (tmp_path / "out").exists()  # the probe wrote in its own throwaway folder
    assert est.images == 5 and est.steps == 50 and est.memory_kind == "cpu resident"
    assert 0 < est.step_seconds and est.setup_seconds > 0 and est.cpu_seconds > 0
    assert est.seconds > 50 * est.step_seconds  # every step, plus loading and caching
    assert est.peak_bytes > 50 * 2**20  # at least the model's weights resident
    assert "for 50 steps" in est.text and "peak memory" in est.text
