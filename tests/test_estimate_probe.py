"""The pre-flight estimate's probe (trainers/estimate.py): it runs the real loop on a few of
the dataset's images and scales what grows with the data by the dataset's size."""

import pytest
from conftest import make_images, tiny_overrides

from tsuika.trainers import estimate
from tsuika.trainers.config import build_config
from tsuika.trainers.data.folder import scan_folder


def test_probe_times_each_phase_and_scales_the_per_image_work(tiny_model, tmp_path,
                                                               monkeypatch):
    small, large = tmp_path / "small", tmp_path / "large"
    make_images(small, n=2)
    make_images(large, n=12)
    seen = {}
    real = estimate._extrapolate

    def keep(config, times, *args):
        seen.setdefault("times", dict(times))
        return real(config, times, *args)

    monkeypatch.setattr(estimate, "_extrapolate", keep)
    cfg = build_config(overrides=tiny_overrides(tiny_model["single_file"], small,
                                                tmp_path / "out", steps=50))
    est_small = estimate.estimate_run(cfg, scan_folder(small))
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
    setups = [estimate._extrapolate(cfg, times, [1.5, 1.0, 1.0], 100.0, 2, n, [])["setup"]
              for n in (2, 20)]
    assert setups[0] == pytest.approx(5.0 + 1.0 + 2.5)
    assert setups[1] - setups[0] == pytest.approx((2.0 + 0.5) / 2 * 18)


def test_an_estimate_needs_the_model_path(tmp_path):
    make_images(tmp_path / "d", n=2)
    cfg = build_config(overrides=[f"data.dir={tmp_path / 'd'}"])
    with pytest.raises(Exception, match="model.path"):
        estimate.estimate_run(cfg, scan_folder(tmp_path / "d"))
