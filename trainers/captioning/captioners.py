"""Captioners: transformers image-to-text models loaded from a local folder, never downloaded.

A captioner folder is what ``save_pretrained`` writes for the model and its processor
(``config.json``, the weights, ``preprocessor_config.json`` and the tokenizer files). The
model's ``model_type`` picks the class:

- ``blip``: BLIP (``BlipForConditionalGeneration``); the prompt, if any, starts the caption;
- ``git``: GIT (``GitForCausalLM``); same;
- anything ``AutoModelForImageTextToText`` knows (SmolVLM / Idefics3, LLaVA, Qwen-VL,
  Florence-2, ...): a vision-language model asked ``prompt`` as a chat message ("Describe
  this image in one sentence." by default), or, when its processor has no chat template,
  given ``prompt`` as it is: a task prompt (Florence-2: "<DETAILED_CAPTION>" by default);
- a folder with ``model.onnx`` is a booru tagger (``tagger.py``, onnxruntime).

``caption_images`` captions images in batches; ``caption_folder`` writes sidecar caption
files for a dataset's images that have none, each one as soon as it is made, so a cancel
keeps every caption already written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tools import MERGES, caption_path, merge_caption, write_caption_file

log = logging.getLogger(__name__)

DEFAULT_VLM_PROMPT = "Describe this image in one sentence."
DEFAULT_TASK_PROMPT = "<DETAILED_CAPTION>"  # Florence-2's task token: it takes no chat
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class CaptionerError(ValueError):
    """A captioner folder is missing, incomplete or not a supported model."""


def missing_files(folder: Path) -> list[str]:
    """What a captioner folder lacks, as "name (what for)" strings; [] when complete.

    Args:
        folder: the captioner folder.
    """
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json (the model's configuration)")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append("model.safetensors (the weights; or model.safetensors.index.json with "
                       "its shards)")
    if not any((folder / f).is_file() for f in PROCESSOR_FILES):
        missing.append("preprocessor_config.json (how images are prepared)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer.json or vocab.txt/vocab.json (the tokenizer)")
    return missing


def check_folder(folder: str | Path) -> Path:
    """``folder`` as a Path when it holds a complete captioner, else a CaptionerError that
    names the folder and every file it lacks.

    Args:
        folder: the captioner folder.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CaptionerError(f"captioner folder {str(folder)!r} does not exist; put the "
                             "model there (what save_pretrained writes: config.json, "
                             "model.safetensors, preprocessor_config.json and the tokenizer "
                             "files; a WD14-style tagger: model.onnx and selected_tags.csv) "
                             "or check the path.")
    missing = missing_files(folder)
    if missing:
        also = ("" if (folder / "config.json").is_file() else
                " (or, for a WD14-style tagger: model.onnx and selected_tags.csv)")
        raise CaptionerError(f"captioner folder {str(folder)!r} is incomplete; it needs: "
                             f"{'; '.join(missing)}{also}. Copy the whole model folder "
                             "(nothing is downloaded).")
    return folder


@dataclass
class Captioner:
    """A loaded captioning model and its processor.

    Attributes:
        kind: "blip", "git" or "vlm".
        prompt: text the caption starts with (BLIP, GIT) or the question asked (VLM).
        max_new_tokens: longest caption, in tokens.
    """

    kind: str
    model: torch.nn.Module
    processor: object
    prompt: str = ""
    max_new_tokens: int = 40
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def caption(self, images: list) -> list[str]:
        """One caption per PIL image, stripped of the prompt and special tokens.

        Args:
            images: PIL RGB images.
        """
        if not images:
            return []
        if self.kind == "vlm":
            return [self._ask(image) for image in images]
        kwargs = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        inputs.pop("token_type_ids", None)  # BERT tokenizers add it; the decoders take none
        if self.kind == "git" and "input_ids" not in inputs:
            out = self.model.generate(pixel_values=inputs["pixel_values"],
                                      max_new_tokens=self.max_new_tokens)
        else:
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [_clean(t) for t in texts]

    def _ask(self, image) -> str:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(text=[text], images=[[image]], return_tensors="pt")
        else:  # no chat: a task prompt (Florence-2's "<DETAILED_CAPTION>") goes in as it is
            inputs = self.processor(text=[self.prompt], images=[image], return_tensors="pt")
        inputs = inputs.to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            out = out[:, inputs["input_ids"].shape[1]:]  # a decoder repeats its prompt first
        return _clean(self.processor.batch_decode(out, skip_special_tokens=True)[0])


def _clean(text: str) -> str:
    return " ".join(text.replace("\n", " ").split()).strip(" ,")


def load_captioner(folder: str | Path, prompt: str | None = None, max_new_tokens: int = 40,
                   device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, tagger: dict | None = None):
    """Load the captioner in ``folder`` (local files only).

    Args:
        folder: a folder written by ``save_pretrained`` (model and processor), or a
            WD14-style tagger folder (``model.onnx`` + ``selected_tags.csv``).
        prompt: see :class:`Captioner`; None = "" for BLIP/GIT, ``DEFAULT_TASK_PROMPT`` for
            Florence-2, ``DEFAULT_VLM_PROMPT`` else.
        max_new_tokens: longest caption in tokens.
        device: where the model runs.
        dtype: the model's weights' dtype.
        tagger: keyword options of ``tagger.load_tagger`` (threshold, exclude, ...), used
            when the folder is a tagger; prompt, max_new_tokens and dtype are then unused.

    Returns:
        A :class:`Captioner`, or a ``tagger.Tagger`` (both have ``caption(images)``).

    Raises:
        CaptionerError: missing or incomplete folder, or a model that does not caption.
    """
    import transformers

    from .tagger import is_tagger_folder, load_tagger

    if Path(folder).expanduser().is_dir() and is_tagger_folder(Path(folder).expanduser()):
        return load_tagger(folder, device=str(device), **(tagger or {}))
    folder = check_folder(folder)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    common = {"local_files_only": True}
    if model_type == "blip":
        kind, cls = "blip", transformers.BlipForConditionalGeneration
    elif model_type == "git":
        kind, cls = "git", transformers.GitForCausalLM
    else:
        kind, cls = "vlm", transformers.AutoModelForImageTextToText
    try:
        model = cls.from_pretrained(str(folder), dtype=dtype, **common)
        processor = transformers.AutoProcessor.from_pretrained(str(folder), **common)
    except (OSError, ValueError, KeyError) as e:
        raise CaptionerError(f"captioner folder {str(folder)!r} (model_type "
                             f"{model_type!r}) cannot be loaded as a captioner: {e}. Use a "
                             "BLIP, GIT or image-text-to-text model saved with "
                             "save_pretrained.") from e
    device = torch.device(device)
    model.to(device).eval()
    if prompt is None:
        prompt = "" if kind != "vlm" else (
            DEFAULT_TASK_PROMPT if model_type.startswith("florence") else DEFAULT_VLM_PROMPT)
    return Captioner(kind=kind, model=model, processor=processor, prompt=prompt,
                     max_new_tokens=max_new_tokens, device=device)


@dataclass
class FolderCaptions:
    """What :func:`caption_folder` did."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # had a caption file already
    captions: dict[Path, str] = field(default_factory=dict)  # image -> caption made
    empty: list[Path] = field(default_factory=list)  # the model said nothing: no file written
    stopped: bool = False


def caption_folder(scan, captioner: Captioner, overwrite: bool = False, batch_size: int = 4,
                   extension: str = ".txt", prefix: str = "", merge: str = "replace",
                   on_progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> FolderCaptions:
    """Caption a scanned dataset's images and write their sidecar files.

    Images with a caption file keep it unless ``overwrite``. Each file is written (atomically)
    as soon as its batch is captioned, so a stop keeps every caption made so far.

    Args:
        scan: a ``data.folder.DatasetScan``.
        captioner: from :func:`load_captioner`.
        overwrite: caption (and rewrite) images that have a caption file too.
        batch_size: images per model call.
        extension: caption file extension, with its dot.
        prefix: tag(s) put first in every new caption (a trigger word), e.g. "sks".
        merge: with ``overwrite``, how the new caption and the caption file's text combine
            (see :func:`merge_caption`; "replace" by default).
        on_progress: called with (images done, images to do) after each batch.
        should_stop: polled before each batch; True stops (``stopped`` is then set).
    """
    from ..data.caption_files import _decode_caption, normalize_caption
    from ..data.images import load_image_rgb
    from .tools import TagEdit

    if merge not in MERGES:
        raise ValueError(f"merge {merge!r} is not one of {', '.join(MERGES)}.")
    result = FolderCaptions()
    todo = []
    for item in scan.items:
        if item.caption_file is not None and not overwrite:
            result.kept.append(item.caption_file)
        else:
            todo.append(item.path)
    edit = TagEdit(prefix=prefix)
    for start in range(0, len(todo), max(1, batch_size)):
        if should_stop is not None and should_stop():
            result.stopped = True
            break
        batch = todo[start:start + batch_size]
        texts = captioner.caption([load_image_rgb(p) for p in batch])
        for path, text in zip(batch, texts):
            if not text:  # an empty caption file would hide the missing caption
                result.empty.append(path)
                continue
            target = caption_path(path, extension)
            if target.exists() and not overwrite:  # written since the scan: still theirs
                result.kept.append(target)
                continue
            if target.exists() and merge != "replace":
                try:
                    old = normalize_caption(_decode_caption(target.read_bytes()))
                except UnicodeDecodeError:  # merging would lose its text: leave it alone
                    log.warning("%s is not UTF-8: kept as it is (re-save it as UTF-8 to "
                                "merge new tags into it)", target.name)
                    result.kept.append(target)
                    continue
                text = merge_caption(old, text, merge)
            text = edit.apply(text)
            write_caption_file(target, text)
            result.written.append(caption_path(path, extension))
            result.captions[path] = text
        if on_progress is not None:
            on_progress(start + len(batch), len(todo))
    log.info("captioned %d images (%d kept their captions)%s", len(result.written),
             len(result.kept), "; stopped" if result.stopped else "")
    return result
