"""The train-node seam (nodes/train_node.py): one spec gives a method's Simple and Advanced
nodes, with the shared inputs first and loss + samples last; Train LoRA is built on it with
its released schema.

The node modules import ComfyUI's V3 API, so these checks run in ComfyUI's python (no server);
skipped, visibly, without COMFYUI_DIR.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import package_parent

ROOT = Path(__file__).resolve().parents[1]
COMFY = os.environ.get("COMFYUI_DIR")

pytestmark = pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout")


def in_comfy(code: str) -> dict:
    """Run ``code`` in ComfyUI's python with the pack importable; its last stdout line is JSON."""
    python = os.environ.get("COMFYUI_PYTHON", str(Path(COMFY).parent / "comfy-venv/bin/python"))
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/", check=False,
                       env={**os.environ, "PYTHONPATH": f"{COMFY}{os.pathsep}{package_parent()}"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


TOY = """
import json
from comfy_api.latest import io
from tsuika.nodes import train_node as tn
from tsuika.nodes.validation import InputRefused

def finish(done):
    done.lines.append("toy line")
    return (done.model,)

spec = tn.TrainNodeSpec(
    method="dreambooth", node_id="ToyTrain", display_name="Train Toy (Tsuika)",
    description="A toy.", main=["train.steps", "output.name"],
    outputs=[io.Model.Output(display_name="model")], finish=finish, folder="checkpoints",
    file_word="checkpoint", loader="Load Checkpoint", defaults={"output.name": "toy"},
    extra_inputs=[io.String.Input("extra", default="", optional=True)])
simple, advanced = tn.make_train_nodes(spec)
out = {}
for cls in (simple, advanced):
    s = cls.define_schema()
    out[s.node_id] = {"name": s.display_name, "category": s.category,
                      "inputs": [i.id for i in s.inputs],
                      "outputs": [o.display_name for o in s.outputs],
                      "class": cls.__name__}
out["values"] = tn.node_values(spec, {"steps": 7, "name": None}, False,
                               {"network.method": "lora", "train.learning_rate": 0.5})
try:
    simple.validate_inputs(steps=0, name="x")
    out["refused"] = None
except InputRefused as e:
    out["refused"] = str(e)
try:
    simple.validate_inputs(steps=5, name="a/b")
    out["refused_name"] = None
except InputRefused as e:
    out["refused_name"] = str(e)
out["linked_ok"] = advanced.validate_inputs(name="ok", options=None)

# Prior preservation: a connected class dataset is used as it is, never drawn into.
from types import SimpleNamespace
values = {"data.class_images": 0}
tn.prior_folder(values, SimpleNamespace(root="/class/set"), None)
out["class_dir"] = values["data.class_dir"]
try:
    tn.prior_folder({"data.class_images": 3}, SimpleNamespace(root="/class/set"), None)
    out["draw_into_dataset"] = None
except InputRefused as e:
    out["draw_into_dataset"] = str(e)
prior = tn.TrainNodeSpec(method="dreambooth", node_id="ToyPrior", display_name="P (Tsuika)",
                         description="", main=["data.class_prompt", "data.class_images"],
                         outputs=[], finish=finish, prior=True)
psimple, _ = tn.make_train_nodes(prior)
out["prior_inputs"] = [i.id for i in psimple.define_schema().inputs]
try:
    psimple.validate_inputs(class_prompt="", class_images=4)
    out["no_prompt"] = None
except InputRefused as e:
    out["no_prompt"] = str(e)
out["prompt_ok"] = psimple.validate_inputs(class_prompt="a dog", class_images=4)

# Prior preservation on the Advanced node only (a node released without it): appended after
# options, checked the same way; the Simple node is unchanged.
late = tn.TrainNodeSpec(method="lora", node_id="ToyLate", display_name="L (Tsuika)",
                        description="", main=["train.steps"], outputs=[], finish=finish,
                        advanced_prior=True)
lsimple, ladvanced = tn.make_train_nodes(late)
out["late_simple"] = [i.id for i in lsimple.define_schema().inputs]
ladv = ladvanced.define_schema()
out["late_advanced"] = [i.id for i in ladv.inputs]
out["late_optional"] = [i.optional for i in ladv.inputs[-4:]]
out["late_description"] = ladv.description
try:
    ladvanced.validate_inputs(class_prompt=" ", class_images=2)
    out["late_no_prompt"] = None
except InputRefused as e:
    out["late_no_prompt"] = str(e)
out["late_simple_ignores"] = lsimple.validate_inputs(steps=3)
out["late_values"] = tn.node_values(late, {"class_prompt": "a dog", "class_images": 2,
                                           "prior_loss_weight": 0.5}, True)
out["late_values_simple"] = tn.node_values(late, {"class_prompt": "a dog"}, False)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def toy() -> dict:
    return in_comfy(TOY)


def test_one_spec_gives_simple_and_advanced_nodes_with_the_shared_inputs_and_outputs(toy):
    info = toy
    simple, adv = info["ToyTrain"], info["ToyTrainAdvanced"]
    assert simple["class"] == "ToyTrain" and adv["class"] == "ToyTrainAdvanced"
    assert adv["name"] == "Train Toy Advanced (Tsuika)"
    assert simple["category"] == adv["category"] == "Tsuika/train"
    assert simple["inputs"] == ["model", "clip", "vae", "dataset", "steps", "name",
                                "sample_prompt", "sample_every", "resume", "extra"]
    assert adv["inputs"] == simple["inputs"] + ["lr_warmup_steps", "options"]
    assert simple["outputs"] == adv["outputs"] == ["model", "loss", "samples"]


def test_the_node_trains_its_own_method_whatever_the_options_say(toy):
    values = toy["values"]
    assert values["network.method"] == "dreambooth"  # an options node cannot change it
    assert values["train.steps"] == 7 and values["train.learning_rate"] == 0.5
    assert values["output.name"] == "toy"  # the spec's default name; a linked widget adds none


def test_queued_checks_refuse_in_widget_words(toy):
    info = toy
    assert info["refused"].startswith("steps"), info["refused"]
    assert "name" in info["refused_name"] and "a/b" in info["refused_name"]
    assert info["linked_ok"] is True  # linked / connected values are left to the run


def test_train_lora_keeps_its_released_schema_on_the_seam():
    info = in_comfy("""
import json
from tsuika.nodes import train_lora
out = {}
for cls in (train_lora.TsuikaTrainLoRA, train_lora.TsuikaTrainLoRAAdvanced):
    s = cls.define_schema()
    out[s.node_id] = {"inputs": [i.id for i in s.inputs], "class": cls.__name__,
                      "outputs": [[o.display_name, o.io_type] for o in s.outputs],
                      "name": s.display_name}
out["method"] = train_lora.LORA.method
print(json.dumps(out))
""")
    simple, adv = info["TsuikaTrainLoRA"], info["TsuikaTrainLoRAAdvanced"]
    assert simple["inputs"] == ["model", "clip", "vae", "dataset", "steps", "learning_rate",
                                "rank", "trigger_word", "training_seed", "resolution",
                                "sample_prompt", "sample_every", "resume"]
    # Prior preservation came later: after 'options', so saved workflows keep widget order.
    assert adv["inputs"] == simple["inputs"] + ["lr_warmup_steps", "options", "class_prompt",
                                                "class_images", "prior_loss_weight",
                                                "class_dataset"]
    assert simple["outputs"] == adv["outputs"] == [
        ["model", "MODEL"], ["clip", "CLIP"], ["lora", "LORA_MODEL"], ["loss", "LOSS_MAP"],
        ["samples", "IMAGE"]]
    assert (simple["name"], adv["name"]) == ("Train LoRA (Tsuika)",
                                             "Train LoRA Advanced (Tsuika)")
    assert (simple["class"], adv["class"]) == ("TsuikaTrainLoRA", "TsuikaTrainLoRAAdvanced")
    assert info["method"] == "lora"


def test_prior_preservation_inputs_and_their_checks(toy):
    assert toy["prior_inputs"][-1] == "class_dataset"  # after resume: widget order kept
    assert toy["prior_inputs"][4:6] == ["class_prompt", "class_images"]
    assert toy["class_dir"] == "/class/set"
    assert toy["draw_into_dataset"].startswith("class_images = 3: class images are drawn only")
    # Drawing needs a class prompt: refused when queued, in the node's words (class_dir is
    # the host's, not a widget)
    assert toy["no_prompt"].startswith("class_images = 4 has the base model draw class "
                                       "images, which needs class_prompt"), toy["no_prompt"]
    assert "class_dir" not in toy["no_prompt"]
    assert toy["prompt_ok"] is True


def test_prior_preservation_on_the_advanced_node_only_appended_after_options(toy):
    assert toy["late_simple"] == ["model", "clip", "vae", "dataset", "steps", "sample_prompt",
                                  "sample_every", "resume"]
    assert toy["late_advanced"] == toy["late_simple"] + [
        "lr_warmup_steps", "options", "class_prompt", "class_images", "prior_loss_weight",
        "class_dataset"]
    assert toy["late_optional"] == [True] * 4  # prompts saved before them still validate
    assert "connect class_dataset" in toy["late_description"]
    assert toy["late_no_prompt"].startswith("class_images = 2 has the base model draw class "
                                            "images, which needs class_prompt")
    assert toy["late_simple_ignores"] is True
    values = toy["late_values"]
    assert (values["data.class_prompt"], values["data.class_images"],
            values["train.prior_loss_weight"]) == ("a dog", 2, 0.5)
    assert "data.class_prompt" not in toy["late_values_simple"]  # not a Simple widget


def test_train_lora_defaults_are_the_swept_recipe_and_follow_the_rank():
    """Unconnected, the LoRA nodes train the defaults sweep's recipe (LoCon rank 16 / conv 16,
    alpha = rank, lr 7e-4, 300 steps); alpha and the conv rank follow the rank widget; a
    Network Options node's own values win."""
    info = in_comfy("""
import json
from tsuika.nodes import train_lora
from tsuika.nodes import train_node as tn
from tsuika.nodes.options import build_checked
spec = train_lora.LORA
out = {}
s = train_lora.TsuikaTrainLoRA.define_schema()
out["widgets"] = {i.id: i.default for i in s.inputs if i.id in ("steps", "learning_rate", "rank")}
def net(kwargs, options=None):
    values = tn.node_values(spec, kwargs, options is not None, options)
    spec.prepare(values, kwargs)
    c = build_checked({**values, "data.dir": "/d"})
    return [c.network.algorithm, c.network.rank, c.network.alpha, c.network.conv_rank,
            c.network.conv_alpha, c.train.learning_rate, c.train.steps]
out["plain"] = net({"rank": 16, "learning_rate": 7e-4, "steps": 300})
out["rank4"] = net({"rank": 4})
out["options"] = net({"rank": 8}, {"network.algorithm": "lora", "network.conv_rank": 0,
                                   "network.alpha": 0, "network.conv_alpha": 1.0})
# An older Network Options node (no algorithm widget) that leaves convolutions off: LoRA.
out["partial"] = net({"rank": 8}, {"network.conv_rank": 0})
out["queued"] = train_lora.TsuikaTrainLoRA.validate_inputs(steps=300, learning_rate=7e-4,
                                                           rank=16, resolution=64)
print(json.dumps(out))
""")
    assert info["widgets"] == {"steps": 300, "learning_rate": 7e-4, "rank": 16}
    assert info["partial"] == ["lora", 8, 8, 0, 1.0, 7e-4, 300]
    assert info["queued"] is True
    assert info["plain"] == ["locon", 16, 16, 16, 16, 7e-4, 300]
    assert info["rank4"] == ["locon", 4, 4, 4, 4, 7e-4, 300]
    assert info["options"] == ["lora", 8, 4, 0, 1.0, 7e-4, 300]  # alpha 0: auto, half the rank
