"""Textual inversion: only the new vectors train, in every text encoder; captions and options."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_images, tiny_overrides

from tsuika.trainers.config import ConfigError, build_config
from tsuika.trainers.families import load_model
from tsuika.trainers.families.base import ModelBundle
from tsuika.trainers.formats.embedding import read_embedding
from tsuika.trainers.loop import train
from tsuika.trainers.methods import get_method
from tsuika.trainers.methods.base import MethodError
from tsuika.trainers.methods.textual_inversion import TEMPLATES

TI = {"network.method": "textual_inversion", "network.token": "tsktok",
      "network.init_word": "circle", "network.vectors_per_token": 2,
      "train.learning_rate": 5e-2, "output.save_dtype": "fp32"}


def _config(tiny_model, data, out, steps=3, **extra):
    return build_config(overrides=tiny_overrides(tiny_model["single_file"], data, out, steps,
                                                 **{**TI, **extra}))


def _encode(bundle, prompt):
    tok = bundle.tokenizers[0]
    ids = tok([prompt], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, bundle.text_encoders[0](ids)[0]


def test_only_the_new_vectors_change(tiny_model, image_folder, tmp_path):
    bundle = load_model(tiny_model["single_file"])
    before = {f"{c}.{k}": v.clone() for c, m in {**bundle.components, "vae": bundle.vae}.items()
              for k, v in m.state_dict().items()}
    circle = bundle.text_encoders[0].get_input_embeddings().weight[
        bundle.tokenizers[0]("circle", add_special_tokens=False).input_ids].clone()
    res = train(_config(tiny_model, image_folder, tmp_path / "out"), bundle=bundle)

    after = {f"{c}.{k}": v for c, m in {**bundle.components, "vae": bundle.vae}.items()
             for k, v in m.state_dict().items()}
    new = {k for k in after if k.endswith("token_embedding.vectors")}
    assert len(new) == 1 and next(iter(new)).startswith("text_encoder.")
    # The whole embedding matrix (every old row), the rest of the text encoder, the UNet and
    # the VAE: bit for bit what they were.
    renamed = {k.replace("token_embedding.base.", "token_embedding."): v
               for k, v in after.items() if k not in new}
    assert renamed.keys() == before.keys()
    assert all(torch.equal(renamed[k], before[k]) for k in before)
    vectors = after[next(iter(new))]
    assert vectors.shape == (2, 32) and not torch.equal(vectors, circle.repeat(2, 1))
    emb = read_embedding(res.file_path)
    assert emb.token == "tsktok" and torch.equal(emb.vectors["emb_params"], vectors)


def test_the_word_stands_for_its_vectors_and_encodes_with_them(tiny_model, image_folder,
                                                               tmp_path):
    bundle = load_model(tiny_model["single_file"])
    res = train(_config(tiny_model, image_folder, tmp_path / "out"), bundle=bundle)
    ids, trained = _encode(bundle, "a photo of tsktok")
    first = bundle.text_encoders[0].get_input_embeddings().first_id
    assert ids[0, 4:6].tolist() == [first, first + 1]  # <bos> a photo of tsktok tsktok_1
    # The same vectors put into a plain copy of the model's text encoder (what a loader does:
    # two new rows) give the same conditioning.
    fresh = load_model(tiny_model["single_file"])
    te = fresh.text_encoders[0]
    vectors = read_embedding(res.file_path).vectors["emb_params"]
    te.resize_token_embeddings(first + 2)
    te.get_input_embeddings().weight.data[first:first + 2] = vectors
    with torch.no_grad():
        plain = te(ids)[0]
    assert torch.allclose(trained, plain, atol=1e-6)
    _, untrained = _encode(fresh, "a photo of circle circle")
    assert not torch.allclose(trained, untrained, atol=1e-3)


def test_diffusers_load_textual_inversion_reads_the_file(tiny_model, image_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    bundle = load_model(tiny_model["single_file"])
    res = train(_config(tiny_model, image_folder, tmp_path / "out"), bundle=bundle)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model["diffusers"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(res.file_path), token="tsktok")
    prompt = pipe.maybe_convert_prompt("a photo of tsktok", pipe.tokenizer)
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
    ours_ids, ours = _encode(bundle, "a photo of tsktok")
    assert torch.equal(ids, ours_ids)
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_captions_get_the_token_and_uncaptioned_images_get_templates(tiny_model):
    method = get_method("textual_inversion")
    config = build_config(overrides=[f"{k}={v}" for k, v in TI.items()])
    rng = random.Random(0)
    assert method.caption(config, "a dog", "a dog", rng) == "tsktok, a dog"
    assert method.caption(config, "tsktok sitting", "tsktok sitting", rng) == "tsktok sitting"
    assert method.caption(config, "a dog", "", rng) == ""  # caption dropout stays empty
    drawn = {method.caption(config, "", "", random.Random(i)) for i in range(30)}
    assert len(drawn) > 3 and drawn <= {t.format("tsktok") for t in TEMPLATES["object"]}
    style = build_config(overrides=[f"{k}={v}" for k, v in TI.items()]
                         + ["network.templates=style"])
    assert "in the style of tsktok" in method.caption(style, "", "", rng)


def test_uncaptioned_images_train(tiny_model, tmp_path):
    data = tmp_path / "data"
    for p in make_images(data, n=2):
        p.with_suffix(".txt").unlink()
    res = train(_config(tiny_model, data, tmp_path / "out", steps=2))
    assert res.steps == 2 and read_embedding(res.file_path).num_vectors == 2


@pytest.mark.parametrize("value,match", [("", "network.token is empty"),
                                         ("MyChar", "lowercase"),
                                         ("my char", "lowercase")])
def test_bad_tokens_fail_at_config_time(value, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides=[f"{k}={v}" for k, v in TI.items()] + [f"network.token={value}"])


def test_a_word_the_tokenizer_knows_is_refused(tiny_model, image_folder, tmp_path):
    with pytest.raises(MethodError, match="'cat' is already a word"):
        train(_config(tiny_model, image_folder, tmp_path / "out", **{"network.token": "cat"}))
    assert not (tmp_path / "out" / "tsuika_lora.safetensors").exists()


def test_every_text_encoder_gets_vectors_sdxl_shaped():
    """Two encoders, CLIP-L 768 and OpenCLIP-G 1280 wide (the SDXL bundle's shape): each
    learns its own vectors from the init word, and the file has clip_l and clip_g."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tsuika.trainers.families.sd15 import load_tokenizer

    def te(cls, width):
        return cls(CLIPTextConfig(hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=8, projection_dim=width,
                                  eos_token_id=49407)).requires_grad_(False)

    encoders = [te(CLIPTextModel, 768), te(CLIPTextModelWithProjection, 1280)]
    encoders[1].config.eos_token_id = 2
    for m in encoders[1].modules():
        if hasattr(m, "eos_token_id"):
            m.eos_token_id = 2
    bundle = ModelBundle(family="sdxl", unet=torch.nn.Identity(), vae=torch.nn.Identity(),
                         text_encoders=encoders, tokenizers=[load_tokenizer(), load_tokenizer()],
                         scheduler_config={}, prediction_type="epsilon", source_name="x")
    config = build_config(overrides=[f"{k}={v}" for k, v in TI.items()])
    method = get_method("textual_inversion")
    method.validate(config, bundle)
    groups = method.prepare(config, bundle)
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(2, 768), (2, 1280)]
    init_id = load_tokenizer()("circle", add_special_tokens=False).input_ids[0]
    for enc, p in zip(encoders, groups[0]["params"]):
        assert torch.equal(p[0], enc.get_input_embeddings().base.weight[init_id])
    for tok in bundle.tokenizers:
        assert tok("tsktok", add_special_tokens=False).input_ids == [49408, 49409]
    # An old-style config (eos_token_id 2, as many SDXL text_encoder_2 configs have) pools at
    # the end token, not at the new word's larger ids.
    ids = bundle.tokenizers[1](["a tsktok"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoders[1](ids, output_hidden_states=False)
    eos = int((ids[0] == 49407).nonzero()[0])
    assert eos == 4 and torch.equal(out.text_embeds, encoders[1].text_projection(
        out.last_hidden_state[:, eos]))
    tensors = method.export(config, bundle, torch.float32)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, 768),
                                                               "clip_g": (2, 1280)}
    state = sorted(method.trainable_state(bundle))
    assert [k.split("::")[0] for k in state] == ["text_encoder_1", "text_encoder_2"]
    assert all(k.endswith("embeddings.token_embedding.vectors") for k in state)


def test_a_saved_embedding_applied_to_a_fresh_model_encodes_as_trained(tiny_model, image_folder,
                                                                       tmp_path):
    """``apply_file`` (how the quality benchmark scores an embedding) gives a fresh model the
    trained word: the same token ids and conditioning as the model that trained it."""
    from tsuika.trainers.methods.textual_inversion import apply_file

    bundle = load_model(tiny_model["single_file"])
    res = train(_config(tiny_model, image_folder, tmp_path / "out"), bundle=bundle)
    ids, trained = _encode(bundle, "a photo of tsktok")
    fresh = load_model(tiny_model["single_file"])
    _, untrained = _encode(fresh, "a photo of tsktok")
    assert apply_file(fresh, read_embedding(res.file_path)) == "tsktok"
    fresh_ids, applied = _encode(fresh, "a photo of tsktok")
    assert torch.equal(ids, fresh_ids)
    assert torch.allclose(trained, applied, atol=1e-6)
    assert not torch.allclose(untrained, applied, atol=1e-3)
    assert not any(p.requires_grad for p in fresh.text_encoders[0].parameters())


def test_an_embedding_of_another_width_is_refused_by_apply_file(tiny_model):
    from tsuika.trainers.formats.embedding import Embedding
    from tsuika.trainers.methods.textual_inversion import apply_file

    bundle = load_model(tiny_model["single_file"])
    with pytest.raises(MethodError, match="768 wide; text encoder 0 is 32 wide"):
        apply_file(bundle, Embedding({"clip_l": torch.zeros(1, 768)}, token="tsktok"))
    with pytest.raises(MethodError, match="give the word"):
        apply_file(bundle, Embedding({"emb_params": torch.zeros(1, 32)}))
