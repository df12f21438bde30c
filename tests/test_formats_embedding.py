"""Textual-inversion embedding files: write -> read, the layouts other tools write, SDXL."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsuika.trainers.formats.embedding import (
    META_TOKEN,
    EmbeddingFormatError,
    detect,
    embedding_tensors,
    read_embedding,
    write_embedding,
)


def test_one_encoder_writes_emb_params_and_reads_back(tmp_path):
    v = torch.randn(3, 768)
    path = write_embedding(tmp_path / "mychar.safetensors", [v], {META_TOKEN: "mychar"})
    raw = load_file(str(path))
    # The one key ComfyUI (only tensor), A1111 (single-tensor file) and diffusers (one-key
    # file) all take.
    assert list(raw) == ["emb_params"] and torch.equal(raw["emb_params"], v)
    emb = read_embedding(path)
    assert emb.layout == "emb_params" and emb.token == "mychar" and emb.num_vectors == 3
    assert list(emb.vectors) == ["clip_l"] and torch.equal(emb.vectors["clip_l"], v)
    assert emb.metadata[META_TOKEN] == "mychar"


def test_sdxl_writes_one_file_with_clip_l_and_clip_g(tmp_path):
    clip_l, g = torch.randn(2, 768), torch.randn(2, 1280)
    path = write_embedding(tmp_path / "x.safetensors", [clip_l, g], dtype=torch.float16)
    raw = load_file(str(path))
    assert set(raw) == {"clip_l", "clip_g"} and raw["clip_g"].dtype == torch.float16
    emb = read_embedding(path)
    assert emb.layout == "per_encoder" and emb.num_vectors == 2
    assert torch.equal(emb.vectors["clip_g"], g.half()) and emb.vectors["clip_l"].shape == (2, 768)


def test_an_existing_file_is_not_overwritten(tmp_path):
    path = write_embedding(tmp_path / "a.safetensors", [torch.ones(1, 768)])
    with pytest.raises(FileExistsError):
        write_embedding(path, [torch.zeros(1, 768)])
    assert torch.equal(read_embedding(path).vectors["clip_l"], torch.ones(1, 768))


def test_a1111_safetensors_layout_is_read(tmp_path):
    v = torch.randn(4, 768)
    save_file({"string_to_param.*": v}, str(tmp_path / "a.safetensors"))
    emb = read_embedding(tmp_path / "a.safetensors")
    assert emb.layout == "a1111" and torch.equal(emb.vectors["clip_l"], v)


def test_diffusers_script_layout_is_read_with_its_token(tmp_path):
    # diffusers' textual_inversion.py saves {placeholder_token: (vectors, width)}; a single
    # vector is sometimes saved flat.
    v = torch.randn(768)
    save_file({"<cat-toy>": v}, str(tmp_path / "learned_embeds.safetensors"))
    emb = read_embedding(tmp_path / "learned_embeds.safetensors")
    assert emb.layout == "diffusers" and emb.token == "<cat-toy>"
    assert torch.equal(emb.vectors["clip_l"], v.unsqueeze(0))


def test_sd2_width_is_named_clip_h(tmp_path):
    save_file({"emb_params": torch.randn(1, 1024)}, str(tmp_path / "h.safetensors"))
    assert list(read_embedding(tmp_path / "h.safetensors").vectors) == ["clip_h"]


def test_a_lora_is_not_an_embedding(tmp_path):
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_a.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "l.safetensors"))
    assert detect(load_file(str(tmp_path / "l.safetensors"))) is None
    with pytest.raises(EmbeddingFormatError, match="lora_unet_a.lora_down.weight"):
        read_embedding(tmp_path / "l.safetensors")


def test_malformed_embeddings_are_refused(tmp_path):
    save_file({"emb_params": torch.zeros(2, 3, 768)}, str(tmp_path / "3d.safetensors"))
    with pytest.raises(EmbeddingFormatError, match=r"\(2, 3, 768\)"):
        read_embedding(tmp_path / "3d.safetensors")
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)},
              str(tmp_path / "counts.safetensors"))
    with pytest.raises(EmbeddingFormatError, match="vector counts differ"):
        read_embedding(tmp_path / "counts.safetensors")


def test_writer_refuses_what_no_reader_could_tell_apart():
    with pytest.raises(EmbeddingFormatError, match="same number of vectors"):
        embedding_tensors([torch.zeros(1, 768), torch.zeros(2, 1280)])
    with pytest.raises(EmbeddingFormatError, match="share the key"):
        embedding_tensors([torch.zeros(1, 768), torch.zeros(1, 768)])
    with pytest.raises(EmbeddingFormatError, match="512 wide"):
        embedding_tensors([torch.zeros(1, 768), torch.zeros(1, 512)])
