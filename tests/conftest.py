"""Shared fixtures: a tiny random SD1.5-architecture model and small image folders."""

from __future__ import annotations

import functools
import logging
import random
import sys
import tempfile
import types
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

logging.getLogger("tsuika").setLevel(logging.INFO)


@functools.lru_cache(maxsize=1)
def package_parent() -> str:
    """A folder from which another Python (ComfyUI's) imports this checkout as ``tsuika``,
    whatever the checkout's folder is called: its parent when it is ``tsuika``, else a
    temporary folder holding a ``tsuika`` link to it."""
    root = Path(__file__).resolve().parents[1]
    if root.name == "tsuika":
        return str(root.parent)
    folder = Path(tempfile.mkdtemp(prefix="tsuika-package-"))
    (folder / "tsuika").symlink_to(root, target_is_directory=True)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict[str, Path]:
    """``{"diffusers": folder, "single_file": path}`` of the sd15-tiny fixture (written once)."""
    from tsuika.trainers.fixtures import write_fixture

    return write_fixture("sd15-tiny", tmp_path_factory.mktemp("tiny_model"), seed=0)


def make_images(folder: Path, n: int = 4, size=(64, 64), caption: str = "a red circle",
                seed: int = 0) -> list[Path]:
    """``n`` simple drawings with same-name captions in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        img = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), 255))
        d = ImageDraw.Draw(img)
        x, y = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        d.ellipse([x, y, x + size[0] // 3, y + size[1] // 3], fill=(220, 20, 20))
        p = folder / f"img_{i:02d}.png"
        img.save(p)
        p.with_suffix(".txt").write_text(f"{caption}, number {i}", encoding="utf-8")
        paths.append(p)
    return paths


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "data"
    make_images(folder)
    return folder


def tiny_overrides(model: Path, data: Path, out: Path, steps: int = 4, **extra) -> list[str]:
    """``--set`` strings for a seconds-long run on the tiny model."""
    values = {"model.path": model, "data.dir": data, "output.dir": out, "train.steps": steps,
              "data.resolution": 64, "data.bucket_step": 32, "network.rank": 4,
              "network.alpha": 2, "train.learning_rate": 1e-3, "train.seed": 0,
              "train.mixed_precision": "no", "train.device": "cpu"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def fake_comfy(monkeypatch) -> list[str]:
    """A stand-in for ``comfy.model_management`` that records what the host bridge asked of
    it (the calls, in order), so ``nodes/_host.py`` is testable without a ComfyUI."""
    calls: list[str] = []
    mm = types.ModuleType("comfy.model_management")
    mm.unload_all_models = lambda: calls.append("unload_all_models")
    mm.soft_empty_cache = lambda: calls.append("soft_empty_cache")
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return calls
