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
from tsuika.trainers.formats.embedding import read_embedding
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


def _read_lycoris(suffix: str) -> Callable[[Path, dict], int]:
    """A LyCORIS-keyed file (``suffix`` on every module) through our reader, with its
    ``lycoris.kohya`` metadata."""
    def read(path: Path, tiny: dict) -> int:
        count = _read_lora(path, tiny)
        tensors, metadata = load_safetensors(path)
        assert sum(k.endswith(f".{suffix}") for k in tensors) == count
        assert metadata["ss_network_module"] == "lycoris.kohya"
        return count
    return read


def _read_checkpoint(path: Path, tiny: dict) -> int:
    """A whole checkpoint through our single-file loader."""
    bundle = load_model(path)
    assert bundle.family == tiny["family"]
    return sum(1 for _ in bundle.unet.parameters())


def _read_embedding(path: Path, tiny: dict) -> int:
    """An embedding through our reader: one vector set per text encoder of the model."""
    emb = read_embedding(path)
    encoders = load_model(tiny["diffusers"]).text_encoders
    assert len(emb.vectors) == len(encoders) and emb.token == "tsktok"
    assert sorted(v.shape[1] for v in emb.vectors.values()) == sorted(
        te.get_input_embeddings().weight.shape[1] for te in encoders)
    return emb.num_vectors


def _read_conv_out(path: Path, tiny: dict) -> int:
    tensors, _ = load_safetensors(path)
    unet = load_model(tiny["diffusers"]).unet
    assert {k: v.shape for k, v in tensors.items()} == {
        f"unet.conv_out.{n}": p.shape for n, p in unet.conv_out.named_parameters()}
    return len(tensors)


def _read_hypernetwork(path: Path, tiny: dict) -> int:
    """A hypernetwork through our reader: one module pair per context width of the model,
    and the ``.pt`` beside it (what ComfyUI loads) holding the same tensors."""
    from tsuika.trainers.formats.hypernetwork import read_hypernetwork

    hn = read_hypernetwork(path)
    width = load_model(tiny["diffusers"]).unet.config.cross_attention_dim
    assert list(hn.modules) == [width]
    pt = read_hypernetwork(path.with_suffix(".pt"))
    assert pt.modules.keys() == hn.modules.keys()
    for dim, pair in hn.modules.items():
        assert all(torch.allclose(pt.modules[dim][i][n].float(), t, atol=1e-3)
                   for i in (0, 1) for n, t in pair[i].items())
    return len(hn.modules)


@dataclass(frozen=True)
class Row:
    """One matrix row: the options that pick a method (and algorithm), and how to read its file.

    Attributes:
        id: the row's test id.
        options: ``section.key`` overrides selecting the method / algorithm.
        read_back: ``(saved file, tiny model paths) -> things read``; raises if unreadable.
        learn: extra options of the falling-loss run (a learning rate it learns with).
        learn_steps: steps of that run (few: each step costs about a second on a busy CPU).
        paired: judge learning against an untrained run (learning rate 0) on the same noise
            draws, step by step, instead of against the run's own first steps: for a method
            that only moves the conditioning (textual inversion), whose effect on the tiny
            random UNet is real but far smaller than the step-to-step noise of the loss.
    """

    id: str
    options: dict
    read_back: Callable[[Path, dict], int]
    learn: dict = field(default_factory=dict)
    learn_steps: int = 12
    paired: bool = False

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
    Row("loha", {"network.method": "lora", "network.algorithm": "loha", "network.conv_rank": 2,
                 "network.conv_alpha": 1}, _read_lycoris("hada_w1_a"),
        {"train.learning_rate": 1e-2, "network.rank": 4}),
    Row("lokr", {"network.method": "lora", "network.algorithm": "lokr"},
        _read_lycoris("lokr_w1"), {"train.learning_rate": 3e-2, "network.rank": 4}),
    Row("dora", {"network.method": "lora", "network.algorithm": "dora"},
        _read_lycoris("dora_scale"), {"train.learning_rate": 3e-2, "network.rank": 8}),
    Row("dreambooth", {"network.method": "dreambooth"}, _read_checkpoint,
        {"train.learning_rate": 3e-4}),
    Row("hypernetwork", {"network.method": "hypernetwork",
                         "network.hypernetwork_activation": "relu"}, _read_hypernetwork,
        # A hypernetwork only changes attention keys/values: on the tiny model its loss falls
        # slower than an adapter's (measured: 12% in 24 steps at these options).
        {"train.learning_rate": 3e-2, "network.hypernetwork_layers": "1,4,1"}, learn_steps=24),
    Row("textual_inversion", {"network.method": "textual_inversion", "network.token": "tsktok",
                              "network.init_word": "circle", "network.vectors_per_token": 2},
        _read_embedding, {"train.learning_rate": 5e-2}, paired=True),
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
    if row.paired:
        base = _run(row, tiny, data, tmp_path / "untrained", row.learn_steps,
                    **{**row.learn, "train.learning_rate": 0.0})
        trained, untrained = res.losses[-window:], base.losses[-window:]
        assert all(a < b for a, b in zip(trained, untrained)), (trained, untrained)
        assert sum(untrained) - sum(trained) > 0.003 * window, (trained, untrained)
    else:
        first, last = sum(res.losses[:window]) / window, sum(res.losses[-window:]) / window
        assert last < first * 0.9, (first, last)
    assert res.file_path.is_file() and row.read_back(res.file_path, tiny) > 0


def test_a_fixed_seed_reproduces_the_run(row, tiny, image_folder, tmp_path):
    a = _run(row, tiny, image_folder, tmp_path / "a", 3)
    b = _run(row, tiny, image_folder, tmp_path / "b", 3)
    ta, tb = load_safetensors(a.file_path)[0], load_safetensors(b.file_path)[0]
    assert a.losses == b.losses
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# With EMA on (averaging from step 2, so the cut at step 3 falls inside it) the file holds the
# average: resuming must continue the average as well as the weights.
@pytest.mark.parametrize("ema", [{}, {"train.ema_decay": 0.5, "train.ema_start_step": 1}],
                         ids=["", "ema"])
def test_resume_ends_with_the_weights_of_one_run(row, tiny, image_folder, tmp_path, ema):
    extra = {"output.save_every": 2, "train.lr_scheduler": "cosine", **ema}
    full = _run(row, tiny, image_folder, tmp_path / "full", 4, **extra)
    with pytest.raises(TrainingStopped) as stopped:
        _run(row, tiny, image_folder, tmp_path / "cut", 4, StopAt(3), **extra)
    msg = str(stopped.value)
    assert "step 3/4" in msg and "resume" in msg and stopped.value.save.state_dir in msg
    resumed = _run(row, tiny, image_folder, tmp_path / "cut", 4,
                   **extra, **{"train.resume": "latest"})
    assert resumed.steps == 4 and resumed.losses == full.losses
    (a, meta_a), (b, meta_b) = load_safetensors(full.file_path), load_safetensors(resumed.file_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert meta_a["tsuika.weights"] == meta_b["tsuika.weights"] == ("ema" if ema else "raw")
