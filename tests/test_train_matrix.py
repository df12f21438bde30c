"""The training matrix: every registered method, LoRA algorithm and family passes the same checks.

One row per method / algorithm (peft's ``TEST_CASES`` idea: the rows are data, the checks are
shared): a short run on the tiny model has a finite, falling loss and writes a file our own
readers read back; a fixed seed reproduces a run exactly; a run stopped and resumed ends with
the weights of one uninterrupted run. Adding a method or an algorithm is adding a row here,
a family is adding its tiny fixture to ``FAMILY_FIXTURES``; the coverage tests fail until
they are added.
What is particular to one method (kohya names, checkpoint layout) stays in its own test file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_images, tiny_overrides

from tsuika.trainers.callbacks import Callbacks, TrainingStopped
from tsuika.trainers.config import NetworkConfig, build_config, option_help
from tsuika.trainers.families import load_model
from tsuika.trainers.fixtures import write_fixture
from tsuika.trainers.formats.lora_keys import ModuleIndex
from tsuika.trainers.formats.lora_layouts import read_lora
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.loop import train
from tsuika.trainers.methods.base import load_named_tensors
from tsuika.trainers.registry import ALGORITHMS, FAMILIES, METHODS

# family -> its tiny fixture in trainers/fixtures.py; every row runs on every family.
FAMILY_FIXTURES = {"sd15": "sd15-tiny", "sdxl": "sdxl-tiny"}


# -- how each kind of file is read back ---------------------------------------------------------
def _read_lora(path: Path, tiny: dict) -> int:
    """A LoRA file through our reader, against the model's own module paths."""
    index = ModuleIndex.from_models(load_model(tiny["diffusers"]).components)
    lsd = read_lora(path, index)
    assert lsd.modules and all(math.isfinite(w.alpha) for w in lsd.modules.values())
    return len(lsd.modules)


def _read_locon(path: Path, tiny: dict) -> int:
    count = _read_lora(path, tiny)
    tensors, _ = load_safetensors(path)
    assert any("resnets" in k and k.endswith(".lora_down.weight") and v.ndim == 4
               for k, v in tensors.items()), "LoCon adapted no convolution"
    return count


def _read_checkpoint(path: Path, tiny: dict) -> int:
    """A whole checkpoint through our single-file loader."""
    bundle = load_model(path)
    assert bundle.family == tiny["family"]
    return sum(1 for _ in bundle.unet.parameters())


def _read_conv_out(path: Path, tiny: dict) -> int:
    tensors, _ = load_safetensors(path)
    unet = load_model(tiny["diffusers"]).unet
    assert {k: v.shape for k, v in tensors.items()} == {
        f"unet.conv_out.{n}": p.shape for n, p in unet.conv_out.named_parameters()}
    return len(tensors)


@dataclass(frozen=True)
class Row:
    """One matrix row: the options that pick a method (and algorithm), and how to read its file.

    Attributes:
        id: the row's test id.
        options: ``section.key`` overrides selecting the method / algorithm.
        read_back: ``(saved file, tiny model paths) -> things read``; raises if unreadable.
        learn: extra options of the falling-loss run (a learning rate it learns with).
        learn_steps: steps of that run (few: each step costs about a second on a busy CPU).
    """

    id: str
    options: dict
    read_back: Callable[[Path, dict], int]
    learn: dict = field(default_factory=dict)
    learn_steps: int = 12

    @property
    def method(self) -> str:
        return self.options.get("network.method", "lora")

    @property
    def algorithm(self) -> str:
        return self.options.get("network.algorithm", "lora")


ROWS = [
    Row("lora", {"network.method": "lora"}, _read_lora,
        {"train.learning_rate": 3e-2, "network.rank": 8}),
    Row("locon", {"network.method": "lora", "network.algorithm": "locon",
                  "network.conv_rank": 4, "network.conv_alpha": 2}, _read_locon,
        {"train.learning_rate": 1e-2, "network.rank": 8}),
    Row("dreambooth", {"network.method": "dreambooth"}, _read_checkpoint,
        {"train.learning_rate": 3e-4}),
    # Registered by the ``registered_dummy`` fixture only: proves a plug-in needs no more.
    Row("dummy_out", {"network.method": "dummy_out"}, _read_conv_out,
        {"train.learning_rate": 1e-2}),
]


# -- a method registered by a test ---------------------------------------------------------------
class DummyOutMethod:
    """Trains the UNet's output convolution and writes it as it is: a method from outside."""

    name = "dummy_out"
    summary = "trains conv_out (a test's method)"
    trains_base_weights = False

    def validate(self, config, bundle):
        pass

    def trains_text_encoder(self, config):
        return False

    def prepare(self, config, bundle):
        params = [p.requires_grad_(True) for p in bundle.unet.conv_out.parameters()]
        return [{"params": params, "lr": config.train.learning_rate, "name": "unet"}]

    def trainable_state(self, bundle):
        return {f"unet::{n}": p.detach().to("cpu").clone()
                for n, p in bundle.unet.named_parameters() if p.requires_grad}

    def load_trainable_state(self, bundle, state):
        load_named_tensors(bundle, state, lambda name, p: p.requires_grad, "dummy options")

    def export(self, config, bundle, dtype):
        return {f"unet.{n}": p.detach() for n, p in bundle.unet.named_parameters()
                if p.requires_grad}

    def file_metadata(self, *args):  # (bundle, metadata); (config, bundle, metadata) is coming
        return args[-1]


@pytest.fixture
def registered_dummy():
    METHODS.register(DummyOutMethod())
    try:
        yield
    finally:
        METHODS.unregister("dummy_out")


@pytest.fixture(scope="session", params=sorted(FAMILY_FIXTURES))
def tiny(request, tmp_path_factory, tiny_model) -> dict:
    """``{"diffusers", "single_file", "family"}`` of one family's tiny model."""
    name = FAMILY_FIXTURES[request.param]
    paths = tiny_model if name == "sd15-tiny" else write_fixture(
        name, tmp_path_factory.mktemp(name), seed=0)
    return {**paths, "family": request.param}


@pytest.fixture(params=ROWS, ids=[r.id for r in ROWS])
def row(request):
    if request.param.method == "dummy_out":
        request.getfixturevalue("registered_dummy")
    return request.param


def _run(row: Row, tiny, data, out, steps, callbacks=None, **extra):
    options = {**row.options, "output.save_dtype": "fp32", **extra}
    return train(build_config(overrides=tiny_overrides(tiny["single_file"], data, out, steps,
                                                       **options)), callbacks)


class StopAt(Callbacks):
    def __init__(self, step: int):
        self.at, self.step = step, 0

    def on_step(self, info):
        self.step = info.step

    def should_stop(self):
        return self.step >= self.at


# -- the checks every row gets -------------------------------------------------------------------
def test_every_registered_family_has_a_tiny_fixture():
    assert set(FAMILIES.names()) <= set(FAMILY_FIXTURES), "add the family's tiny fixture"


def test_every_registered_method_and_algorithm_has_a_row():
    methods = {r.method for r in ROWS}
    assert set(METHODS.names()) <= methods, "add a ROWS entry for the new method"
    algorithms = {r.algorithm for r in ROWS if r.method in METHODS
                  and getattr(METHODS.get(r.method), "uses_algorithms", False)}
    assert set(ALGORITHMS.names()) <= algorithms, "add a ROWS entry for the new algorithm"


def test_a_registered_method_is_a_choice_of_the_config(registered_dummy):
    method = next(f for f in dataclasses.fields(NetworkConfig) if f.name == "method")
    assert "dummy_out" in list(method.metadata["choices"])  # what the nodes' combo lists
    assert build_config(overrides=["network.method=dummy_out"]).network.method == "dummy_out"
    assert "'dummy_out': trains conv_out" in option_help("network.method")  # tooltip, CLI help


def test_short_run_has_a_finite_falling_loss_and_a_file_we_read_back(row, tiny, tmp_path):
    data = tmp_path / "one"
    make_images(data, n=1)
    res = _run(row, tiny, data, tmp_path / "out", row.learn_steps, **row.learn)
    assert res.steps == row.learn_steps and all(math.isfinite(v) for v in res.losses)
    window = max(4, row.learn_steps // 5)
    first, last = sum(res.losses[:window]) / window, sum(res.losses[-window:]) / window
    assert last < first * 0.9, (first, last)
    assert res.file_path.is_file() and row.read_back(res.file_path, tiny) > 0


def test_a_fixed_seed_reproduces_the_run(row, tiny, image_folder, tmp_path):
    a = _run(row, tiny, image_folder, tmp_path / "a", 3)
    b = _run(row, tiny, image_folder, tmp_path / "b", 3)
    ta, tb = load_safetensors(a.file_path)[0], load_safetensors(b.file_path)[0]
    assert a.losses == b.losses
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_ends_with_the_weights_of_one_run(row, tiny, image_folder, tmp_path):
    extra = {"output.save_every": 2, "train.lr_scheduler": "cosine"}
    full = _run(row, tiny, image_folder, tmp_path / "full", 4, **extra)
    with pytest.raises(TrainingStopped) as stopped:
        _run(row, tiny, image_folder, tmp_path / "cut", 4, StopAt(3), **extra)
    msg = str(stopped.value)
    assert "step 3/4" in msg and "resume" in msg and stopped.value.save.state_dir in msg
    resumed = _run(row, tiny, image_folder, tmp_path / "cut", 4,
                   **extra, **{"train.resume": "latest"})
    assert resumed.steps == 4 and resumed.losses == full.losses
    a, b = load_safetensors(full.file_path)[0], load_safetensors(resumed.file_path)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
