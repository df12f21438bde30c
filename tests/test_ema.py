"""EMA of the trained weights (trainers/ema.py): the average's arithmetic, what the saved file
and the state hold, the metadata, resume. The matrix (test_train_matrix.py) checks that a run
stopped and resumed with EMA on ends with the file of one run, for every method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from tsuika.trainers.callbacks import Callbacks, TrainingStopped
from tsuika.trainers.config import ConfigError, build_config
from tsuika.trainers.ema import Ema, check_ema_fits, resume_ema
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.loop import train
from tsuika.trainers.state import EMA_FILE, StateError, TrainingState, load_state


def _param(*values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def test_the_average_follows_until_the_start_step_then_moves_by_decay_every_n():
    p = _param(0.0)
    ema = Ema({"x": p}, decay=0.5, start_step=2, every=2)
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], start=1):
        p.data.fill_(value)
        ema.update(step)
        if step == 2:
            assert ema.shadow["x"].item() == 2.0 and not ema.averaging  # equals the weights
        if step == 3:
            assert ema.shadow["x"].item() == 2.0  # every 2: step 3 is skipped
    # step 4: 0.5 * 2 + 0.5 * 8 = 5; step 6: 0.5 * 5 + 0.5 * 32 = 18.5
    assert ema.shadow["x"].item() == 18.5 and ema.averaging


def test_applied_swaps_the_average_in_and_leaves_the_weights_untouched():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = Ema({"x": p}, decay=0.9)
    p.data.fill_(3.0)
    ema.update(1)
    raw = p.data.data_ptr()
    with ema.applied():
        assert p.dtype == torch.bfloat16  # in the weights' own dtype
        assert torch.allclose(p.data.float(), torch.tensor([1.2, 2.1]), atol=1e-2)
    assert p.data.data_ptr() == raw
    assert torch.equal(p.data, torch.full((2,), 3.0, dtype=torch.bfloat16))
    assert ema.shadow["x"].dtype == torch.float32  # the average itself stays fp32


def test_a_saved_average_of_other_shapes_is_refused_before_anything_is_copied(tmp_path):
    ema = Ema({"x": _param(1.0, 2.0)}, decay=0.9)
    before = ema.shadow["x"].clone()
    state = TrainingState(step=2, trainable={}, optimizer={}, scheduler={}, info={},
                          ema={"x": torch.zeros(3)})
    with pytest.raises(StateError) as e:
        check_ema_fits(ema, tmp_path, state)
    assert EMA_FILE in str(e.value) and "x" in str(e.value) and "(3,)" in str(e.value)
    state.ema = {"y": torch.zeros(2)}
    with pytest.raises(StateError, match="lacks"):
        check_ema_fits(ema, tmp_path, state)
    assert torch.equal(ema.shadow["x"], before)


def test_resuming_a_state_without_average_starts_it_from_the_weights_and_says_so(tmp_path):
    p = _param(4.0)
    ema = Ema({"x": p}, decay=0.9)
    ema.shadow["x"].fill_(0.0)
    state = TrainingState(step=5, trainable={}, optimizer={}, scheduler={}, info={})
    notes = resume_ema(ema, tmp_path, state)
    assert ema.shadow["x"].item() == 4.0 and "without EMA" in notes[0] and ema.step == 5
    notes = resume_ema(None, tmp_path, TrainingState(5, {}, {}, {}, {}, ema={"x": p.data}))
    assert "left unused" in notes[0]


def test_the_start_step_must_lie_inside_the_run():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["train.steps=10", "train.ema_decay=0.99",
                                "train.ema_start_step=10"])
    assert "train.ema_start_step = 10" in str(e.value) and "ema_decay = 0" in str(e.value)
    build_config(overrides=["train.steps=10", "train.ema_start_step=10"])  # EMA off: unused
    with pytest.raises(ConfigError, match="train.ema_decay"):
        build_config(overrides=["train.ema_decay=1"])


class Samples(Callbacks):
    def __init__(self):
        self.messages: list[str] = []

    def on_message(self, text):
        self.messages.append(text)


def _train(tiny_model, data, out, steps, callbacks=None, **extra):
    options = {"output.save_dtype": "fp32", "train.learning_rate": 3e-2, **extra}
    return train(build_config(overrides=tiny_overrides(tiny_model["single_file"], data, out,
                                                       steps, **options)), callbacks)


def test_the_file_holds_the_average_and_the_state_both(tiny_model, image_folder, tmp_path):
    cb = Samples()
    res = _train(tiny_model, image_folder, tmp_path / "ema", 4, cb,
                 **{"train.ema_decay": 0.7, "train.ema_start_step": 1})
    raw = _train(tiny_model, image_folder, tmp_path / "raw", 4)
    assert res.losses == raw.losses  # the average never feeds back into training
    tensors, meta = load_safetensors(res.file_path)
    raw_tensors, raw_meta = load_safetensors(raw.file_path)
    assert meta["tsuika.weights"] == "ema" and meta["tsuika.ema_decay"] == "0.7"
    assert meta["tsuika.ema_start_step"] == "1" and meta["tsuika.ema_every"] == "1"
    assert raw_meta["tsuika.weights"] == "raw" and "tsuika.ema_decay" not in raw_meta
    state = load_state(res.state_dir)
    assert state.ema is not None and state.ema.keys() == state.trainable.keys()
    assert state.info["ema"] == {"decay": 0.7, "start_step": 1, "every": 1}
    assert load_state(raw.state_dir).ema is None
    # The state's trained weights are the raw run's; the average is something else.
    raw_state = load_state(raw.state_dir)
    assert all(torch.equal(state.trainable[k], raw_state.trainable[k]) for k in state.trainable)
    assert any(not torch.equal(state.ema[k], state.trainable[k]) for k in state.ema)
    ups = [k for k in tensors if k.endswith(".lora_up.weight")]
    assert ups and any(not torch.equal(tensors[k], raw_tensors[k]) for k in ups)
    # A LoRA's up weight is exported as it is: the file's is the state's average.
    name = "unet::down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default" \
           ".weight"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    assert torch.equal(tensors[key], state.ema[name])
    assert any("EMA (decay 0.7)" in m for m in cb.messages)


def test_cancel_saves_the_average_and_resume_continues_it(tiny_model, image_folder, tmp_path):
    class StopAt2(Callbacks):
        step = 0

        def on_step(self, info):
            self.step = info.step

        def should_stop(self):
            return self.step >= 2

    ema = {"train.ema_decay": 0.5}
    with pytest.raises(TrainingStopped) as stopped:
        _train(tiny_model, image_folder, tmp_path / "cut", 4, StopAt2(), **ema)
    partial, meta = load_safetensors(stopped.value.save.file_path)
    assert meta["tsuika.weights"] == "ema"
    assert load_state(Path(stopped.value.save.state_dir)).ema is not None
    cb = Samples()
    resumed = _train(tiny_model, image_folder, tmp_path / "cut", 4, cb,
                     **ema, **{"train.resume": "latest"})
    full = _train(tiny_model, image_folder, tmp_path / "full", 4, **ema)
    a, b = load_safetensors(full.file_path)[0], load_safetensors(resumed.file_path)[0]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert not any("without EMA" in m for m in cb.messages)
