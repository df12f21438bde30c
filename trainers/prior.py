"""Prior preservation: class images trained beside the instance images.

Fine-tuning on a few pictures of one dog teaches the model that every dog is that dog.
DreamBooth's remedy (kohya calls them regularisation images) is to keep training on images
of the class as the base model drew it, with the class prompt, so the class stays as it was
while the instance prompt takes on the new subject. It works the same for every method.

``data.class_dir`` holds the class images; ``data.class_prompt`` captions them all (else
each one's own caption file). ``data.class_images = N`` asks for at least N: the missing ones
are drawn by the base model before training and written into the folder as new files (never
over an existing one), with a caption file each, so the next run finds them and draws none.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .callbacks import Callbacks
from .config import ConfigError, TsuikaConfig
from .data.folder import DatasetError, scan_folder
from .device import Precision
from .families.base import ModelBundle
from .prepare import TrainingData
from .report import save_png

log = logging.getLogger(__name__)

GENERATED_PREFIX = "class_"


def check_class_dir(config: TsuikaConfig) -> Path | None:
    """The class folder, checked before any work; None when prior preservation is off."""
    d = config.data
    if not d.class_dir:
        return None
    folder = Path(d.class_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"data.class_dir = {d.class_dir!r} is a file; give a folder of "
                          "class images.")
    if not folder.exists() and d.class_images == 0:
        raise ConfigError(f"data.class_dir = {d.class_dir!r} does not exist; create it with "
                          "class images, or set data.class_images = N (and data.class_prompt) "
                          "to have the base model draw them.")
    return folder


def _count_images(folder: Path, caption_extension: str) -> int:
    if not folder.is_dir():
        return 0
    try:
        return len(scan_folder(folder, caption_extension=caption_extension).items)
    except DatasetError:
        return 0  # an empty folder


def _free_name(folder: Path, index: int, caption_extension: str) -> tuple[Path, int]:
    while True:
        image = folder / f"{GENERATED_PREFIX}{index:05d}.png"
        caption = image.with_suffix(caption_extension or ".txt")
        if not image.exists() and not caption.exists():
            return image, index
        index += 1


def generate_missing(config: TsuikaConfig, family, bundle: ModelBundle, precision: Precision,
                     cb: Callbacks) -> int:
    """Draw the class images ``data.class_dir`` lacks with the (untrained) model; returns how
    many were written. The model's modules must already be on the run's device."""
    d = config.data
    folder = check_class_dir(config)
    if folder is None or d.class_images == 0:
        return 0
    have = _count_images(folder, d.caption_extension)
    missing = d.class_images - have
    if missing <= 0:
        return 0
    from .sampling import sample_images

    folder.mkdir(parents=True, exist_ok=True)
    cb.on_message(f"prior preservation: drawing {missing} class images of {d.class_prompt!r} "
                  f"into {folder} ({have} there already)")
    index = 0
    for i in range(missing):
        # One image per call: a cancelled or failed run keeps every image already written.
        image, = sample_images(family, bundle, [d.class_prompt], precision,
                               size=d.resolution, steps=config.sample.steps,
                               guidance_scale=config.sample.guidance_scale,
                               seed=config.train.seed * 100_003 + have + i)
        path, index = _free_name(folder, index, d.caption_extension)
        save_png(image, path)
        caption = path.with_suffix(d.caption_extension or ".txt")
        tmp = caption.with_name(caption.name + ".tmp")
        tmp.write_text(d.class_prompt, encoding="utf-8")
        tmp.replace(caption)
        index += 1
        if cb.should_stop():
            cb.on_message(f"stopped while drawing class images; {i + 1} written to {folder}")
            break
    return i + 1


def class_data(config: TsuikaConfig, bundle: ModelBundle, precision: Precision,
               cache_root: Path) -> TrainingData | None:
    """The class images as the loop consumes them (own buckets, cache and order), or None."""
    d = config.data
    folder = check_class_dir(config)
    if folder is None:
        return None
    try:
        scan = scan_folder(folder, caption_extension=d.caption_extension)
    except DatasetError as e:
        raise ConfigError(f"data.class_dir = {d.class_dir!r} has no usable class image ({e}); "
                          "add some, or set data.class_images = N with data.class_prompt.") \
            from e
    # Class captions are plain: no trigger word, no shuffling or dropout of the class prompt.
    plain = dataclasses.replace(d, dir=str(folder), trigger_word="", shuffle_tags=False,
                                tag_dropout=0.0, caption_dropout=0.0, flip=d.flip)
    data = TrainingData(dataclasses.replace(config, data=plain), bundle, precision, cache_root,
                        scan=scan)
    if d.class_prompt:
        for ex in data.examples:
            ex.caption = d.class_prompt
    missing = [ex.path.name for ex in data.examples if not ex.caption]
    if missing:
        raise ConfigError(f"data.class_dir: {len(missing)} class images have no caption (e.g. "
                          f"{missing[0]}); set data.class_prompt, e.g. 'a photo of a dog'.")
    log.info("prior preservation: %d class images from %s", len(data.examples), folder)
    return data
