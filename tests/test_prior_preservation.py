"""Prior preservation: class images drawn by the base model once, kept, and trained beside the
instance images with their own weight."""

from __future__ import annotations

import pytest
import torch
from conftest import make_images, tiny_overrides

from tsuika.trainers.callbacks import Callbacks
from tsuika.trainers.config import ConfigError, build_config
from tsuika.trainers.formats.safetensors_io import load_safetensors
from tsuika.trainers.loop import train


class Messages(Callbacks):
    def __init__(self):
        self.lines: list[str] = []

    def on_message(self, text):
        self.lines.append(text)


def _config(tiny_model, data, out, steps=2, **extra):
    return build_config(overrides=tiny_overrides(tiny_model["single_file"], data, out, steps,
                                                 **extra))


def test_missing_class_images_are_drawn_once_and_never_over_a_users_file(
        tiny_model, image_folder, tmp_path):
    classes = tmp_path / "classes"
    classes.mkdir()
    mine = classes / "class_00000.png"
    make_images(tmp_path / "mine", n=1)
    (tmp_path / "mine" / "img_00.png").rename(mine)
    before = mine.read_bytes()
    extra = {"data.class_dir": classes, "data.class_prompt": "a photo of a circle",
             "data.class_images": 3, "sample.steps": 2}
    cb = Messages()
    train(_config(tiny_model, image_folder, tmp_path / "a", **extra), cb)
    pngs = sorted(p.name for p in classes.glob("*.png"))
    assert pngs == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert mine.read_bytes() == before, "a user's file was overwritten"
    assert (classes / "class_00001.txt").read_text() == "a photo of a circle"
    assert any("drawing 2 class images" in m for m in cb.lines), cb.lines
    assert any("prior preservation: 3 class images" in m for m in cb.lines), cb.lines
    again = Messages()
    train(_config(tiny_model, image_folder, tmp_path / "b", **extra), again)
    assert not any("drawing" in m for m in again.lines), "class images were drawn twice"
    assert len(list(classes.glob("*.png"))) == 3


@pytest.mark.parametrize("method", ["lora", "dreambooth", "hypernetwork"])
def test_class_images_change_what_is_trained_by_their_weight(tiny_model, image_folder,
                                                             tmp_path, method):
    classes = tmp_path / "classes"
    make_images(classes, n=2, caption="a blue square", seed=5)
    base = {"network.method": method, "output.save_dtype": "fp32"}
    plain = train(_config(tiny_model, image_folder, tmp_path / "plain", **base))
    weighted = {**base, "data.class_dir": classes, "data.class_prompt": "a photo of a square"}
    with_prior = train(_config(tiny_model, image_folder, tmp_path / "prior", **weighted))
    zero = train(_config(tiny_model, image_folder, tmp_path / "zero",
                         **{**weighted, "train.prior_loss_weight": 0}))
    a, _ = load_safetensors(plain.file_path)
    b, _ = load_safetensors(with_prior.file_path)
    c, _ = load_safetensors(zero.file_path)
    assert any(not torch.equal(a[k], b[k]) for k in a), "class images changed nothing"
    # Weight 0 leaves only the instance loss: the same training as without class images.
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert with_prior.losses != plain.losses


def test_prior_preservation_options_are_checked_before_any_work(tiny_model, image_folder,
                                                                tmp_path):
    with pytest.raises(ConfigError, match="data.class_images = 4 needs data.class_dir"):
        _config(tiny_model, image_folder, tmp_path, **{"data.class_images": 4,
                                                        "data.class_dir": tmp_path})
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="data.class_dir = .*nowhere.* does not exist"):
        train(_config(tiny_model, image_folder, tmp_path / "o",
                      **{"data.class_dir": missing}))
    bare = tmp_path / "bare"
    make_images(bare, n=1)
    for txt in bare.glob("*.txt"):
        txt.unlink()
    with pytest.raises(ConfigError, match="no caption.*data.class_prompt"):
        train(_config(tiny_model, image_folder, tmp_path / "p", **{"data.class_dir": bare}))
