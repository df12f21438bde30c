"""The image-text-to-text captioner on tiny random vision-language models built here.

LLaVA (a chat template: the prompt is asked as a chat message, the caption is what the
decoder adds after it) and Florence-2 (no chat template: a task prompt such as
"<DETAILED_CAPTION>", an encoder-decoder whose output holds the caption only). Each is
written with save_pretrained (model, processor, a word-level tokenizer) and loaded by the
real ``load_captioner`` through ``AutoModelForImageTextToText``.
"""

from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import make_images
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from tsuika.trainers.captioning.captioners import CaptionerError, caption_folder, load_captioner
from tsuika.trainers.data.folder import scan_folder

WORDS = ["<s>", "<pad>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "Describe", "this",
         "image", "in", "one", "sentence.", "detail", "what", "is", "shown", "the", "image.",
         "a", "photo", "of", "sks"] + [f"w{i}" for i in range(40)]
MIN_NEW = 3  # generation_config.min_new_tokens: a random model never answers with nothing
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                     bos_token="<s>", eos_token="</s>",
                                     extra_special_tokens={"image_token": "<image>"})


def _save(model, processor, folder: Path) -> Path:
    model.generation_config.min_new_tokens = MIN_NEW
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _llava(folder: Path) -> Path:
    vision = T.CLIPVisionConfig(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=37, projection_dim=32)
    text = dict(model_type="llama", vocab_size=len(WORDS), hidden_size=32, intermediate_size=37,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=128, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = T.LlavaForConditionalGeneration(T.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=WORDS.index("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1))
    processor = T.LlavaProcessor(
        image_processor=T.CLIPImageProcessor(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32}),
        tokenizer=_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT)  # CLIP's class token
    return _save(model, processor, folder)


def _florence(folder: Path) -> Path:
    vision = T.Florence2VisionConfig(
        depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
        patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2], num_groups=[2, 2],
        window_size=2, projection_dim=32, max_position_embeddings=16, max_temporal_embeddings=4)
    text = dict(model_type="bart", vocab_size=len(WORDS), d_model=32, encoder_layers=1,
                decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=128,
                bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                forced_eos_token_id=2)
    model = T.Florence2ForConditionalGeneration(T.Florence2Config(
        vision_config=vision, text_config=text, image_token_id=WORDS.index("<image>")))
    images = T.CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    images.image_seq_length = 4 * 4 + 1  # 32 px / stride 4 / stride 2, and the pooled token
    return _save(model, T.Florence2Processor(image_processor=images, tokenizer=_tokenizer()),
                 folder)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("vlm")
    return {"llava": _llava(base / "llava"), "florence": _florence(base / "florence")}


def _recording(cap):
    """The token ids every ``generate`` call was given, decoded (the prompt the model saw)."""
    seen, generate = [], cap.model.generate

    def record(**kwargs):
        seen.append(cap.processor.tokenizer.decode(kwargs["input_ids"][0]))
        return generate(**kwargs)

    cap.model.generate = record
    return seen


IMAGES = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (30, 60), (0, 0, 255))]


def test_chat_vlm_asks_the_prompt_and_returns_only_the_answer(models_dir):
    cap = load_captioner(models_dir["llava"], max_new_tokens=6)
    assert cap.kind == "vlm" and type(cap.model).__name__ == "LlavaForConditionalGeneration"
    assert cap.prompt == "Describe this image in one sentence."  # the default question
    seen = _recording(cap)
    texts = cap.caption(IMAGES)
    assert len(texts) == 2 and len(seen) == 2
    assert seen[0].startswith("USER: <image>") and seen[0].endswith(
        "Describe this image in one sentence. ASSISTANT:")  # the chat template, applied
    for t in texts:
        words = t.split()
        assert MIN_NEW <= len(words) <= 6, t  # the answer only: the prompt is not repeated
        assert set(words) <= set(WORDS) and "ASSISTANT:" not in words and "<image>" not in t
    assert cap.caption(IMAGES) == texts  # greedy: the same captions again
    asked = load_captioner(models_dir["llava"], prompt="a photo of sks", max_new_tokens=4)
    seen = _recording(asked)
    asked.caption(IMAGES[:1])
    assert seen[0].endswith("a photo of sks ASSISTANT:")


def test_task_prompt_vlm_without_a_chat_template(models_dir):
    cap = load_captioner(models_dir["florence"], max_new_tokens=5)
    assert cap.kind == "vlm" and cap.model.config.is_encoder_decoder
    assert cap.prompt == "<DETAILED_CAPTION>"  # Florence-2's task, as it takes no chat
    seen = _recording(cap)
    texts = cap.caption(IMAGES)
    # the processor turned the task token into its question; the model saw that
    assert "Describe in detail what is shown in the image." in seen[0]
    for t in texts:
        # an encoder-decoder's output is the caption alone: nothing cut off its start
        assert MIN_NEW <= len(t.split()) <= 5 and set(t.split()) <= set(WORDS), t


def test_folder_captions_with_a_vlm(models_dir, tmp_path):
    make_images(tmp_path, n=3)
    (tmp_path / "img_01.txt").unlink()
    cap = load_captioner(models_dir["llava"], max_new_tokens=4)
    res = caption_folder(scan_folder(tmp_path), cap, prefix="sks")
    assert res.written == [tmp_path / "img_01.txt"] and len(res.kept) == 2
    text = (tmp_path / "img_01.txt").read_text()
    assert text.startswith("sks, ") and len(text.split()) >= 1 + MIN_NEW


def test_a_folder_that_is_not_a_vision_language_model(models_dir, tmp_path):
    # a text-only model with every file a captioner folder has: named, with its model type
    folder = tmp_path / "text_only"
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(WORDS), hidden_size=32,
                                     intermediate_size=37, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)
                       ).save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((models_dir["llava"] / name).read_bytes())
    with pytest.raises(CaptionerError) as e:
        load_captioner(folder)
    msg = str(e.value)
    assert str(folder) in msg and "model_type 'llama'" in msg
    assert "cannot be loaded as a captioner" in msg and "image-text-to-text" in msg
    # the processor files missing: named, not a transformers traceback
    (folder / "processor_config.json").unlink()
    with pytest.raises(CaptionerError, match="preprocessor_config.json"):
        load_captioner(folder)
