"""Resuming a state trained before the Train LoRA nodes' default changed (plain LoRA -> the
LoCon recipe): what a state records of its network (``guards.recorded_network``), the node
taking the state's values for the options it filled in itself and refusing, in the graph's
words, what the user chose otherwise (``nodes/train_node_resume.py``).

The backend and the node logic run here; the same path with the real Train LoRA spec and its
``follow_rank`` runs in ComfyUI's python (skipped, visibly, without COMFYUI_DIR), and through
a real ComfyUI server in tests/test_real_host_resume.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import make_images, tiny_overrides

from tsuika.nodes.options import build_checked
from tsuika.nodes.train_node_resume import (
    adopt_trained_network,
    filled_by_node,
    refuse_other_network,
    refuse_past_steps,
)
from tsuika.nodes.train_node_spec import TrainNodeSpec
from tsuika.nodes.validation import InputRefused
from tsuika.trainers.config import build_config
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.guards import recorded_network, shape_differences
from tsuika.trainers.loop import train
from tsuika.trainers.state import StateError, load_state

# The old Simple node's network: plain LoRA, alpha 0 = auto (half the rank).
OLD = {"network.algorithm": "lora", "network.rank": 4, "network.alpha": 0,
       "output.save_every": 1, "output.name": "mine"}
SPEC = TrainNodeSpec(method="lora", node_id="TsuikaTrainLoRA",
                     display_name="Train LoRA (Tsuika)", description="", main=[
                         "train.steps", "train.learning_rate", "network.rank",
                         "data.trigger_word", "train.seed", "data.resolution"],
                     outputs=[], finish=lambda done: ())


@pytest.fixture(scope="module")
def old_run(tiny_model, tmp_path_factory):
    """A plain-LoRA run of 2 steps with a state at each step (what the old node trained)."""
    root = tmp_path_factory.mktemp("old_run")
    make_images(root / "data", n=2)
    out = root / "out"
    train(build_config(overrides=tiny_overrides(tiny_model["single_file"], root / "data", out,
                                                2, **OLD)))
    return root


def _copy(old_run, tmp_path):
    shutil.copytree(old_run, tmp_path / "r")
    return tmp_path / "r"


def _forget_identity(state):
    """What an older Tsuika wrote: a state.json without ``identity``."""
    info = json.loads((state / "state.json").read_text())
    info.pop("identity")
    (state / "state.json").write_text(json.dumps(info))


def _node_values(rank=4):
    """The Simple node's values once ``follow_rank`` filled in the LoCon recipe (the real
    spec's prepare runs in test_the_real_train_lora_node_adopts_in_comfyui)."""
    chosen = {"train.steps": 4, "train.learning_rate": 1e-3, "network.rank": rank,
              "data.trigger_word": "", "train.seed": 0, "data.resolution": 64,
              "network.method": "lora", "output.name": "mine"}
    values = dict(chosen, **{"network.alpha": rank, "network.algorithm": "locon",
                             "network.conv_rank": rank, "network.conv_alpha": rank})
    return chosen, values


# -- what a state records ------------------------------------------------------------------
def test_a_state_records_the_network_it_was_trained_with(old_run):
    state = old_run / "out" / "states" / "step_00000002"
    net, where = recorded_network(state)
    assert where == "state.json"
    assert (net["method"], net["algorithm"], net["rank"], net["alpha"], net["conv_rank"],
            net["conv_alpha"]) == ("lora", "lora", 4, 2.0, 0, 1.0)  # alpha resolved: rank / 2


def test_an_older_state_without_identity_is_read_from_the_file_saved_with_it(old_run,
                                                                             tmp_path):
    out = _copy(old_run, tmp_path) / "out"
    for step in (1, 2):
        _forget_identity(out / "states" / f"step_{step:08d}")
    # Step 1: the intermediate file of that step; step 2: the final file (ss_steps 2), not
    # the step-1 file beside it.
    net, where = recorded_network(out / "states" / "step_00000001")
    assert where == "mine-step00000001.safetensors"
    assert (net["method"], net["algorithm"], net["rank"], net["alpha"]) == ("lora", "lora",
                                                                           4, 2.0)
    net, where = recorded_network(out / "states" / "step_00000002")
    assert where == "mine.safetensors" and net["algorithm"] == "lora"
    (out / "mine.safetensors").unlink()
    assert recorded_network(out / "states" / "step_00000002") == (None, "")  # nothing says
    (out / "states" / "step_00000001" / "state.json").write_text("{not json")
    assert recorded_network(out / "states" / "step_00000001") == (None, "")


def test_shape_differences_name_the_options_that_change_the_tensors():
    old = {"rank": 4, "alpha": 2.0, "algorithm": "lora", "conv_rank": 0, "dropout": 0.0}
    now = {"rank": 4, "alpha": 4.0, "algorithm": "locon", "conv_rank": 4, "dropout": 0.1,
           "target": "transformer"}
    assert shape_differences("lora", old, now) == [("alpha", 2.0, 4.0),
                                                   ("algorithm", "lora", "locon"),
                                                   ("conv_rank", 0, 4)]  # in ``now``'s order
    assert shape_differences("hypernetwork", old, now) == []  # not its shape options


# -- the node --------------------------------------------------------------------------------
def test_the_node_keeps_the_trained_network_for_what_it_filled_in(old_run, tiny_model,
                                                                  tmp_path):
    """The old run resumed by the Simple node with no options: the node's LoCon defaults
    give way to the state's plain LoRA, it says so, and training continues from the state's
    step with tensors of the state's shapes."""
    root = _copy(old_run, tmp_path)
    state = root / "out" / "states" / "step_00000002"
    chosen, values = _node_values()
    lines = adopt_trained_network(SPEC, values, filled_by_node(chosen, values), state)
    assert lines == ["resuming a LoRA state: network kept as it was trained: algorithm lora, "
                     "alpha 2, conv_rank 0, conv_alpha 1 (this node's defaults now: "
                     "algorithm locon, alpha 4, conv_rank 4, conv_alpha 4; turn 'resume' off "
                     "to train a new one with them)"]
    assert values["network.rank"] == 4 and values["train.steps"] == 4  # the user's, kept
    run = {"model.path": str(tiny_model["single_file"]), "data.dir": str(root / "data"),
           "output.dir": str(root / "out2"), "data.bucket_step": 32, "train.device": "cpu",
           "train.mixed_precision": "no"}
    config = build_checked({**values, **run})
    refuse_other_network(SPEC, config, state, advanced=False, options=None)  # fits
    config.train.resume = str(state)
    result = train(config)
    assert result.steps == 4 and len(result.losses) == 4  # steps 1-2 from the state, then 3-4
    before = load_state(state).trainable
    after = load_state(root / "out2" / "states" / "step_00000004").trainable
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    saved, _ = load_safetensors(root / "out2" / "mine.safetensors")
    assert not any(k.endswith("lora_down.weight") and v.dim() == 4 and v.shape[-1] == 3
                   for k, v in saved.items())  # no 3x3 convolution adapters: plain LoRA


def test_without_adoption_the_loop_refuses_in_backend_words(old_run, tiny_model, tmp_path):
    """Why the node adopts: the same resume with the LoCon defaults is refused."""
    root = _copy(old_run, tmp_path)
    over = tiny_overrides(tiny_model["single_file"], root / "data", root / "out", 4,
                          **{"network.algorithm": "locon", "network.conv_rank": 4,
                             "network.alpha": 4, "output.name": "mine2",
                             "train.resume": str(root / "out" / "states" / "step_00000002")})
    with pytest.raises(StateError, match="network.algorithm: state 'lora', this run 'locon'"):
        train(build_config(overrides=over))


def test_what_the_user_chose_is_never_overridden_and_the_refusal_names_the_graph_fix(
        old_run, tmp_path):
    state = old_run / "out" / "states" / "step_00000002"
    # Advanced, a Network Options node saying locon (and its conv rank / alphas).
    options = {"network.algorithm": "locon", "network.conv_rank": 4, "network.alpha": 4,
               "network.conv_alpha": 4}
    chosen, _ = _node_values()
    values = {**chosen, **options}
    assert adopt_trained_network(SPEC, values, filled_by_node(values, values), state) == []
    config = build_checked({**values, "data.dir": "/d"})
    with pytest.raises(InputRefused) as e:
        refuse_other_network(SPEC, config, state, advanced=True, options=options)
    msg = str(e.value)
    assert msg.startswith("resume: the state out/step_00000002 of the training named 'mine' ")
    assert "step_00000002 of the training named 'mine' was trained with other network " \
           "options: algorithm lora (this run locon); alpha 2 (this run 4); conv_rank 0 (this " \
           "run 4); conv_alpha 1 (this run 4)." in msg, msg
    assert ("set algorithm to lora on the Network Options (Tsuika) node connected to "
            "'options'") in msg, msg
    assert "set alpha to 2 on the Network Options (Tsuika) node" in msg, msg
    assert "turn 'resume' off" in msg and str(old_run) not in msg, msg
    # The Simple node's rank widget, set to another rank: the fix is that widget.
    chosen, values = _node_values(rank=8)
    adopt_trained_network(SPEC, values, filled_by_node(chosen, values), state)
    config = build_checked({**values, "data.dir": "/d"})
    with pytest.raises(InputRefused, match=r"rank 4 \(this run 8\)\. To continue it: set rank "
                                           r"to 4 on this node\."):
        refuse_other_network(SPEC, config, state, advanced=False, options=None)
    # Advanced with no Network Options node, its state trained on attention layers only.
    config = build_checked({**chosen, "data.dir": "/d", "network.target": "transformer"})
    net = dict(recorded_network(state)[0], target="attention")
    info = json.loads((state / "state.json").read_text())
    copy = tmp_path / "states" / "step_00000002"
    shutil.copytree(state, copy)
    info["identity"]["network"] = {k: v for k, v in net.items() if k != "method"}
    (copy / "state.json").write_text(json.dumps(info))
    with pytest.raises(InputRefused, match="connect a Network Options \\(Tsuika\\) node with "
                                           "target = attention to 'options'"):
        refuse_other_network(SPEC, config, copy, advanced=True, options={})


def test_with_an_init_lora_file_the_file_decides_the_network_not_the_state(old_run):
    """network.init_lora: the loop takes the file's algorithm / rank / alpha before it checks
    the state, so the node neither adopts nor refuses on the node's values."""
    state = old_run / "out" / "states" / "step_00000002"
    chosen, values = _node_values(rank=8)
    values["network.init_lora"] = "a_loha.safetensors"
    assert adopt_trained_network(SPEC, values, filled_by_node(chosen, values), state) == []
    assert values["network.algorithm"] == "locon"
    config = build_checked({**values, "network.init_lora": "none", "data.dir": "/d"})
    with pytest.raises(InputRefused, match="rank 4 \\(this run 8\\)"):
        refuse_other_network(SPEC, config, state, advanced=False, options=None)
    config.network.init_lora = "/models/loras/a_loha.safetensors"
    refuse_other_network(SPEC, config, state, advanced=False, options=None)  # the loop's


def test_a_state_past_the_node_steps_is_refused_naming_the_steps_widget(old_run):
    state = old_run / "out" / "states" / "step_00000002"
    chosen, values = _node_values()
    refuse_past_steps(build_checked({**values, "train.steps": 2, "data.dir": "/d"}), state)
    with pytest.raises(InputRefused, match=r"is at step 2, past steps = 1; set steps above 2 "
                                           r"on this node to train on from it"):
        refuse_past_steps(build_checked({**values, "train.steps": 1, "data.dir": "/d"}), state)


COMFY = os.environ.get("COMFYUI_DIR")


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout")
def test_the_real_train_lora_node_adopts_in_comfyui(old_run):
    """The real Train LoRA spec: node_values, then its follow_rank, then the adoption."""
    from test_train_node_seam import in_comfy

    state = old_run / "out" / "states" / "step_00000002"
    info = in_comfy(f"""
import json
from pathlib import Path
from tsuika.nodes import train_lora
from tsuika.nodes import train_node as tn
from tsuika.nodes.train_node_resume import adopt_trained_network, filled_by_node
spec = train_lora.LORA
values = tn.node_values(spec, {{"rank": 4, "steps": 300, "learning_rate": 7e-4}}, False)
chosen = dict(values)
spec.prepare(values, {{}})
lines = adopt_trained_network(spec, values, filled_by_node(chosen, values), Path({str(state)!r}))
print(json.dumps({{"lines": lines, "net": [values[k] for k in ("network.algorithm",
    "network.rank", "network.alpha", "network.conv_rank", "network.conv_alpha")]}}))
""")
    assert info["net"] == ["lora", 4, 2.0, 0, 1.0]
    assert info["lines"][0].startswith("resuming a LoRA state: network kept as it was "
                                       "trained: algorithm lora, alpha 2"), info
