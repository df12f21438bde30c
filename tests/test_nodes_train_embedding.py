"""The Train Embedding nodes as ComfyUI reads them (ComfyUI's python, no server): inputs,
outputs, and textual inversion's options refused when queued, in widget words.

Skipped, visibly, without COMFYUI_DIR (the node modules import ComfyUI's V3 API).
"""

import os

import pytest
from test_train_node_seam import in_comfy

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"),
                                reason="set COMFYUI_DIR to a ComfyUI checkout")

CODE = """
import json
from tsuika.nodes.train_embedding import TsuikaTrainEmbedding, TsuikaTrainEmbeddingAdvanced
from tsuika.nodes.validation import InputRefused
from tsuika.nodes.options import section_options
out = {}
for cls in (TsuikaTrainEmbedding, TsuikaTrainEmbeddingAdvanced):
    s = cls.define_schema()
    out[s.node_id] = {"inputs": [i.id for i in s.inputs], "category": s.category,
                      "outputs": [o.display_name for o in s.outputs],
                      "defaults": {i.id: getattr(i, "default", None) for i in s.inputs}}
def refused(**kw):
    try:
        TsuikaTrainEmbedding.validate_inputs(**kw)
        return None
    except InputRefused as e:
        return str(e)
out["empty_token"] = refused(token="", init_word="dog")
out["upper_token"] = refused(token="MyChar", init_word="dog")
out["ok"] = TsuikaTrainEmbedding.validate_inputs(token="mychar", init_word="dog")
out["network_options"] = section_options("network")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def info() -> dict:
    return in_comfy(CODE)


def test_simple_node_shows_the_embedding_options_and_passes_clip_on(info):
    simple = info["TsuikaTrainEmbedding"]
    assert simple["category"] == "Tsuika/train"
    assert simple["inputs"][:4] == ["model", "clip", "vae", "dataset"]
    assert simple["inputs"][4:13] == ["steps", "learning_rate", "token", "init_word",
                                      "vectors_per_token", "templates", "training_seed",
                                      "resolution", "name"]
    assert simple["outputs"][:2] == ["clip", "embedding_name"]
    assert simple["defaults"]["learning_rate"] == 5e-3
    assert simple["defaults"]["name"] == "tsuika_embedding"
    advanced = info["TsuikaTrainEmbeddingAdvanced"]
    assert advanced["inputs"][:13] == simple["inputs"][:13] and advanced["inputs"][-1] == "options"


def test_bad_tokens_are_refused_when_queued_in_widget_words(info):
    assert info["empty_token"] and "token" in info["empty_token"], info
    assert "network." not in info["empty_token"]
    assert info["upper_token"] and "lowercase" in info["upper_token"], info
    assert info["ok"] is True


def test_the_shared_options_node_does_not_show_them(info):
    assert not {"network.token", "network.init_word", "network.vectors_per_token",
                "network.templates"} & set(info["network_options"])
