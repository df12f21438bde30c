"""Captioners on tiny random BLIP and GIT models built here (real loading and generation)."""

from pathlib import Path

import pytest
import transformers as T
from conftest import make_images
from PIL import Image

from tsuika.trainers.captioning.captioners import (
    CaptionerError,
    caption_folder,
    load_captioner,
)
from tsuika.trainers.data.folder import scan_folder

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red",
         "circle", "the", "dog", "on", "blue"] + [f"w{i}" for i in range(48)]


def _tokenizer(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return T.BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")


def _blip(folder: Path) -> Path:
    text = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=37, max_position_embeddings=64,
                bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3)
    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=37)
    T.BlipForConditionalGeneration(T.BlipConfig(text_config=text, vision_config=vision,
                                                projection_dim=32)).save_pretrained(folder)
    T.BlipProcessor(T.BlipImageProcessor(size={"height": 32, "width": 32}),
                    _tokenizer(folder)).save_pretrained(folder)
    return folder


def _git(folder: Path) -> Path:
    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=37)
    T.GitForCausalLM(T.GitConfig(vision_config=vision, vocab_size=len(VOCAB), hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=37, max_position_embeddings=64,
                                 bos_token_id=2, eos_token_id=3,
                                 pad_token_id=0)).save_pretrained(folder)
    T.GitProcessor(T.CLIPImageProcessor(size={"shortest_edge": 32},
                                        crop_size={"height": 32, "width": 32}),
                   _tokenizer(folder)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["blip", "git"])
def captioner_dir(request, tmp_path_factory):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    build = {"blip": _blip, "git": _git}[request.param]
    return build(tmp_path_factory.mktemp(request.param))


def test_prompted_captions_start_with_the_prompt(captioner_dir):
    cap = load_captioner(captioner_dir, prompt="a photo of", max_new_tokens=6)
    assert cap.kind in ("blip", "git")
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (30, 60), (0, 0, 255))]
    texts = cap.caption(images)
    assert len(texts) == 2
    assert all(t.startswith("a photo of") and len(t.split()) > 3 for t in texts), texts
    assert "[" not in " ".join(texts)  # special tokens stripped


def test_folder_captions_only_where_missing_and_a_stop_keeps_them(captioner_dir, tmp_path):
    make_images(tmp_path, n=5)
    for i in (1, 2, 3, 4):
        (tmp_path / f"img_{i:02d}.txt").unlink()
    kept = (tmp_path / "img_00.txt").read_text()
    cap = load_captioner(captioner_dir, prompt="a photo of", max_new_tokens=4)
    calls = []
    res = caption_folder(scan_folder(tmp_path), cap, batch_size=2, prefix="sks",
                         on_progress=lambda done, total: calls.append((done, total)),
                         should_stop=lambda: len(calls) >= 1)  # stop after the first batch
    assert res.stopped and calls == [(2, 4)]
    assert res.written == [tmp_path / "img_01.txt", tmp_path / "img_02.txt"]
    assert (tmp_path / "img_00.txt").read_text() == kept  # never overwritten
    assert (tmp_path / "img_01.txt").read_text().startswith("sks, a photo of")
    assert not (tmp_path / "img_03.txt").exists()
    again = caption_folder(scan_folder(tmp_path), cap, batch_size=2)  # the rest
    assert again.written == [tmp_path / "img_03.txt", tmp_path / "img_04.txt"]
    assert len(again.kept) == 3


def test_missing_or_incomplete_folder_names_the_files(captioner_dir, tmp_path):
    with pytest.raises(CaptionerError, match="does not exist"):
        load_captioner(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((captioner_dir / "config.json").read_text())
    with pytest.raises(CaptionerError) as e:
        load_captioner(broken)
    msg = str(e.value)
    assert str(broken) in msg and "model.safetensors" in msg
    assert "preprocessor_config.json" in msg and "tokenizer.json or vocab.txt" in msg
    assert "the model's configuration" not in msg  # config.json is there: not asked for


def test_cli_caption(captioner_dir, tmp_path):
    import subprocess
    import sys

    make_images(tmp_path, n=2)
    (tmp_path / "img_01.txt").unlink()
    r = subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "caption", str(tmp_path),
                        "--model", str(captioner_dir), "--prompt", "a photo of",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 1 caption files; 1 kept" in r.stdout
    assert (tmp_path / "img_01.txt").read_text().startswith("a photo of")
    r = subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "caption", str(tmp_path),
                        "--model", str(tmp_path / "none")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr
