"""The ``data`` section: the dataset folder, captions, buckets, caching and the class images of
prior preservation."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import ConfigError, _Section, opt


@dataclass
class DataConfig(_Section):
    SECTION = "data"
    dir: str = opt("", "Folder of images with same-name .txt captions; kohya 'N_name' "
                       "sub-folders repeat their images N times.")
    resolution: int = opt(512, "Training resolution: bucket area is at most resolution^2.",
                          min=32, max=4096)
    caption_extension: str = opt(".txt", "Extension of the caption files next to the images.")
    trigger_word: str = opt("", "Word put first in every caption (kept when tags are shuffled).")
    shuffle_tags: bool = opt(False, "Shuffle comma-separated tags every step.")
    keep_tokens: int = opt(0, "With shuffling/dropout, keep the first N tags in place.", min=0)
    tag_dropout: float = opt(0.0, "Probability of dropping each (non-kept) tag per step.",
                             min=0.0, max=1.0)
    caption_dropout: float = opt(0.0, "Probability of training a step on an empty caption.",
                                 min=0.0, max=1.0)
    buckets: bool = opt(True, "Aspect-ratio buckets (no forced square crop).")
    bucket_step: int = opt(64, "Bucket sides are multiples of this many pixels.", min=8, max=256)
    crop: str = opt("center", "How an image is cropped to its bucket.",
                    choices=("center", "random"))
    flip: bool = opt(False, "Random horizontal flip (both variants are cached).")
    cache_latents: bool = opt(True, "Encode each image with the VAE once, keyed by content.")
    cache_dir: str = opt("", "Where caches live; empty means <output.dir>/.cache.")
    class_dir: str = opt("", "Prior preservation: folder of class images (e.g. other dogs) "
                         "trained beside the dataset so the class is not forgotten; empty = "
                         "off.")
    class_prompt: str = opt("", "Caption of every class image, e.g. 'a photo of a dog'; empty = "
                            "each class image's own caption file.")
    class_images: int = opt(0, "Have at least this many class images: the base model draws "
                            "the missing ones into class_dir before training (needs "
                            "class_prompt); 0 = use the folder as it is.", min=0, max=100_000)
    caption_variants: int = opt(0, "With shuffle_tags or tag_dropout: draw this many versions "
                                "of each caption before training and let each step pick one "
                                "(caption_dropout still empties a step's caption), so every "
                                "caption is encoded once and the text encoders can leave the "
                                "GPU. Each kept caption costs memory (SDXL: ~0.3 MB in bf16). "
                                "0 = a new draw every step, encoded every step.",
                                min=0, max=1024)

    def validate(self) -> None:
        if self.class_images and not (self.class_dir and self.class_prompt):
            raise ConfigError(f"data.class_images = {self.class_images} needs data.class_dir "
                              "(where to write them) and data.class_prompt (what to draw), "
                              "e.g. 'a photo of a dog'.")
        if self.crop == "random" and self.cache_latents:
            raise ConfigError("data.crop = 'random' cannot be combined with data.cache_latents "
                              "= true (a cached latent has one fixed crop); set data.crop = "
                              "'center' or data.cache_latents = false.")
        if self.bucket_step % 8:
            raise ConfigError(f"data.bucket_step = {self.bucket_step} must be a multiple of 8 "
                              "(the VAE downsamples by 8); use 64.")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ConfigError(f"data.caption_extension = {self.caption_extension!r} must start "
                              "with a dot, e.g. '.txt'.")
        if self.buckets and self.resolution < self.bucket_step:
            raise ConfigError(f"data.resolution = {self.resolution} is below data.bucket_step = "
                              f"{self.bucket_step} (no bucket fits); raise data.resolution to at "
                              f"least {self.bucket_step} or lower data.bucket_step.")
