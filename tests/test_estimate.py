"""The pre-flight estimate (trainers/estimate.py): its extrapolation, and a real probe run.

How close it comes to real runs is measured in benchmarks/estimate_check.py (figures in
docs/BENCHMARKS.md), never here: timings are not asserted, only what the estimate is made of.
"""

from pathlib import Path

import pytest
from conftest import make_images, tiny_overrides

from tsuika.trainers import estimate
from tsuika.trainers.config import build_config
from tsuika.trainers.data.folder import scan_folder
from tsuika.trainers.estimate import _extrapolate, estimate_run


def _config(tmp_path: Path, **extra):
    return build_config(overrides=tiny_overrides(Path("/nonexistent/model.safetensors"),
                                                 tmp_path, tmp_path / "out", **extra))


def test_the_fixed_part_of_the_data_phase_is_not_multiplied_by_the_images(tmp_path):
    config = _config(tmp_path, steps=10)
    times = {"load": 5.0, "data": 4.0, "per_image": 2.0, "captions": 0.0,
             "samples_before": 0.0, "save": 0.5, "save_end": 100.0}
    # probe: 2 distinct images; run: 8. Per image 2 / 2 = 1; fixed 4 - 2 = 2 (the VAE hash
    # among it); steps: first 2.0 (1.0 warm-up), then 1.0; after the save: 0.25
    got = _extrapolate(config, times, [2.0, 1.0, 1.0], 100.25, 2, 8, [])
    assert got["setup"] == 5.0 + 2.0 + 8 * 1.0
    assert got["step"] == 1.0 and got["sampling"] == 0.0
    assert got["total"] == got["setup"] + 1.0 + 10 * 1.0 + 0.5 + 0.25


def test_the_vae_hash_is_outside_the_per_image_work(tiny_model, tmp_path, monkeypatch):
    """The VAE's hash reads every VAE weight once per run, whatever the number of images: the
    loop computes it outside the part the probe multiplies by the images."""
    import contextlib

    from tsuika.trainers import loop, prepare

    inside, calls = [False], []
    real_hash, real_per_image = prepare.module_hash, loop.TrainingRun.per_image

    @contextlib.contextmanager
    def flagged(self):
        inside[0] = True
        try:
            with real_per_image(self):
                yield
        finally:
            inside[0] = False

    def hash_noting(module):
        calls.append(inside[0])
        return real_hash(module)

    monkeypatch.setattr(loop.TrainingRun, "per_image", flagged)
    monkeypatch.setattr(prepare, "module_hash", hash_noting)
    make_images(tmp_path / "data", n=2)
    loop.train(build_config(overrides=tiny_overrides(tiny_model["single_file"],
                                                     tmp_path / "data", tmp_path / "out",
                                                     steps=1)))
    assert calls == [False]


def test_sample_rounds_scale_with_their_denoising_steps(tmp_path):
    config = _config(tmp_path, steps=20, **{"sample.prompts": "a photo", "sample.every": 10,
                                            "sample.steps": 8})
    times = {"load": 0.0, "data": 0.0, "per_image": 0.0, "captions": 0.0,
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


def test_probe_times_each_phase_and_scales_the_per_image_work(tiny_model, tmp_path,
                                                               monkeypatch):
    small, large = tmp_path / "small", tmp_path / "large"
    make_images(small, n=2)
    make_images(large, n=12)
    seen = {}
    real = _extrapolate

    def keep(config, times, *args):
        seen.setdefault("times", dict(times))
        return real(config, times, *args)

    monkeypatch.setattr(estimate, "_extrapolate", keep)
    cfg = build_config(overrides=tiny_overrides(tiny_model["single_file"], small,
                                                tmp_path / "out", steps=50))
    est_small = estimate_run(cfg, scan_folder(small))
    times = seen["times"]
    # Every phase the formula uses was timed by the hooks of the real loop.
    for phase in ("load", "data", "per_image", "captions", "samples_before", "save"):
        assert phase in times and times[phase] >= 0, phase
    assert 0 < times["per_image"] <= times["data"]  # the per-image work lies inside the phase
    assert est_small.step_seconds > 0 and est_small.peak_bytes > 0
    assert est_small.seconds >= est_small.setup_seconds + 49 * est_small.step_seconds * 0.99
    assert "estimate on this machine (cpu)" in est_small.text


def test_setup_grows_with_the_images_and_captions_and_nothing_else(tiny_model, tmp_path):
    """The formula on fixed phase times: only the per-image and caption work scale with the
    dataset (the probe saw 2 distinct images)."""
    make_images(tmp_path / "d", n=2)
    cfg = build_config(overrides=tiny_overrides(tiny_model["single_file"], tmp_path / "d",
                                                tmp_path / "out", steps=10))
    times = {"load": 5.0, "data": 3.0, "per_image": 2.0, "captions": 0.5, "samples_before": 0.0,
             "save": 1.0, "save_end": 100.0}
    setups = [_extrapolate(cfg, times, [1.5, 1.0, 1.0], 100.0, 2, n, [])["setup"]
              for n in (2, 20)]
    assert setups[0] == pytest.approx(5.0 + 1.0 + 2.5)
    assert setups[1] - setups[0] == pytest.approx((2.0 + 0.5) / 2 * 18)


def test_an_estimate_needs_the_model_path(tmp_path):
    make_images(tmp_path / "d", n=2)
    cfg = build_config(overrides=[f"data.dir={tmp_path / 'd'}"])
    with pytest.raises(Exception, match="model.path"):
        estimate_run(cfg, scan_folder(tmp_path / "d"))
