"""Turn a dataset folder into what the loop consumes: bucketed, cached latents and captions.

Latents are cached on disk keyed by (image content hash, VAE weights hash, bucket, crop,
flip), so a changed image or model never reuses a stale entry and an unchanged dataset is
encoded once across runs. With flip on, both variants are cached and each step picks one.
Text embeddings are cached in memory per caption when captions never change between steps
(no shuffle or dropout) and the text encoder is frozen; otherwise they are encoded per step.
Each latent travels with its ``CropInfo`` time ids (original size, crop offset, bucket), the
size conditioning SDXL wants; a cache entry stores them beside the latent.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import TsuikaConfig
from .data.buckets import assign_bucket, make_buckets, resize_and_crop
from .data.cache import ContentCache
from .data.captions import CaptionAugment
from .data.folder import DatasetScan, scan_folder
from .data.images import load_image_rgb
from .data.sampler import BucketBatchSampler
from .device import Precision
from .families.base import ModelBundle, module_hash

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One image of the dataset as the loop sees it."""

    path: Path
    sha256: str
    caption: str
    repeats: int
    bucket: tuple[int, int]


@dataclass
class MicroBatch:
    latents: torch.Tensor  # (B, C, h, w), already multiplied by the VAE scaling factor
    captions: list[str]
    # (B, 6) float: CropInfo.sdxl_time_ids of each sample (families that do not use them
    # ignore them).
    time_ids: torch.Tensor | None = None


def image_to_tensor(image) -> torch.Tensor:
    """A PIL RGB image as a (3, H, W) float tensor in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


class TrainingData:
    """The dataset, its buckets and caches, and a deterministic order of micro-batches."""

    def __init__(self, config: TsuikaConfig, bundle: ModelBundle, precision: Precision,
                 cache_root: Path, scan: DatasetScan | None = None, caption_hook=None):
        self.config = config
        # A method's last word on each step's caption (textual inversion: templates for
        # uncaptioned images, its token in the others): (original, augmented, rng) -> caption.
        self.caption_hook = caption_hook
        d = config.data
        self.scan = scan if scan is not None else scan_folder(
            Path(d.dir).expanduser(), caption_extension=d.caption_extension)
        buckets = (make_buckets(d.resolution, step=d.bucket_step) if d.buckets
                   else [(d.resolution, d.resolution)])
        self.examples = [
            Example(path=Path(it.path), sha256=it.sha256, caption=it.caption,
                    repeats=it.repeats,
                    bucket=assign_bucket(it.width, it.height, buckets) if d.buckets
                    else (d.resolution, d.resolution))
            for it in self.scan.items]
        self.augment = CaptionAugment(
            trigger_word=d.trigger_word, shuffle_tags=d.shuffle_tags,
            keep_tokens=d.keep_tokens, tag_dropout=d.tag_dropout,
            caption_dropout=d.caption_dropout)
        self.variants = self._draw_caption_variants(d.caption_variants, config.train.seed)
        self.bundle = bundle
        self.precision = precision
        self.scale = float(bundle.vae.config.scaling_factor)
        self.cache = ContentCache(cache_root / "latents") if d.cache_latents else None
        self._latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self.sampler = BucketBatchSampler([(ex.repeats, ex.bucket) for ex in self.examples],
                                          batch_size=config.train.batch_size,
                                          seed=config.train.seed)
        self._order_epoch: int | None = None
        self._order: list[list[int]] = []

    # -- what the run uses ----------------------------------------------------------------
    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        return self.sampler.bucket_counts

    @property
    def captions_static(self) -> bool:
        """Every caption a step can draw is known before training (no per-step augmentation,
        or ``data.caption_variants`` drew them up front)."""
        return self.augment.is_static or self.variants is not None

    def fixed_captions(self) -> list[str] | None:
        """Every caption the run will use, when that set is known before training (see
        :attr:`captions_static`; a method's per-step captions make it unknown); else None."""
        if not self.captions_static or self.caption_hook is not None:
            return None
        if self.variants is not None:
            empty = [""] if self.augment.caption_dropout else []
            return list(dict.fromkeys([c for vs in self.variants for c in vs] + empty))
        rng = random.Random(0)  # a static augmentation draws nothing from it
        return list(dict.fromkeys(self.augment.apply(ex.caption, rng) for ex in self.examples))

    def _draw_caption_variants(self, count: int, seed: int) -> list[list[str]] | None:
        """``count`` arrangements of each image's caption (shuffled, tags dropped), drawn once
        from the seed; None when off or when the augmentation has nothing to vary."""
        if not count or self.augment.is_static:
            return None
        return [[self.augment.arrange(ex.caption, random.Random(f"{seed}:caption:{i}:{j}"))
                 for j in range(count)] for i, ex in enumerate(self.examples)]

    def _step_caption(self, i: int, rng: random.Random) -> str:
        """Image ``i``'s caption for a step: a fresh augmentation, or one of its variants."""
        if self.variants is None:
            return self.augment.apply(self.examples[i].caption, rng)
        if self.augment.drops(rng):
            return ""
        variants = self.variants[i]
        return variants[rng.randrange(len(variants))]

    @functools.cached_property
    def vae_hash(self) -> str:
        """The VAE's weights' hash, part of every latent's cache key: once per run (it reads
        every VAE weight, whatever the number of images)."""
        return module_hash(self.bundle.vae)

    def fill_latent_cache(self) -> tuple[int, int]:
        """Encode every (image, flip variant) once; returns (cache hits, newly encoded)."""
        if self.cache is None:
            return 0, 0
        vae_hash = self.vae_hash
        hits = encoded = 0
        flips = (False, True) if self.config.data.flip else (False,)
        for i, ex in enumerate(self.examples):
            for flip in flips:
                key = self.cache.key(image=ex.sha256, vae=vae_hash, bucket=ex.bucket,
                                     crop="center", flip=flip)
                got = self.cache.get(key)
                if got is None or "time_ids" not in got:  # entries from before time ids
                    latent, ids = self._encode(ex, flip, random.Random(0), sample=False)
                    self.cache.put(key, {"latent": latent, "time_ids": ids})
                    encoded += 1
                else:
                    latent, ids = got["latent"], got["time_ids"]
                    hits += 1
                self._latents[(i, flip)] = (latent, ids)
        return hits, encoded

    @torch.no_grad()
    def _encode(self, ex: Example, flip: bool, rng: random.Random, sample: bool,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's latent and its (6,) time ids (what the crop did to it)."""
        image = load_image_rgb(ex.path)
        crop = "center" if self.cache is not None else self.config.data.crop
        image, info = resize_and_crop(image, ex.bucket, crop=crop, rng=rng, flip=flip)
        ids = torch.tensor(info.sdxl_time_ids(), dtype=torch.float32)
        x = image_to_tensor(image).unsqueeze(0)
        vae = self.bundle.vae
        x = x.to(self.precision.device, vae.dtype)
        dist = vae.encode(x).latent_dist
        # The cache stores the distribution's mean (deterministic, so it is content-keyed);
        # uncached runs draw a fresh sample each step like the reference scripts.
        z = dist.sample(generator) if sample else dist.mean
        return z[0].float().cpu(), ids

    # -- deterministic order ----------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[list[int]]:
        """Micro-batches of one epoch: repeats expanded, one bucket per batch, seeded shuffle."""
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, self.sampler.batches(epoch)
        return self._order

    def micro_batch(self, index: int) -> tuple[MicroBatch, int]:
        """The ``index``-th micro-batch of the whole run and its epoch (same on resume)."""
        per_epoch = len(self.epoch_order(0))
        epoch, pos = divmod(index, per_epoch)
        members = self.epoch_order(epoch)[pos]
        rng = random.Random(f"{self.config.train.seed}:batch:{index}")
        latents, captions, time_ids = [], [], []
        for i in members:
            ex = self.examples[i]
            flip = self.config.data.flip and rng.random() < 0.5
            if self.cache is not None:
                z, ids = self._latents[(i, flip)]
            else:
                g = torch.Generator("cpu").manual_seed(rng.randrange(2**63))
                z, ids = self._encode(ex, flip, rng, sample=True, generator=g)
            latents.append(z)
            time_ids.append(ids)
            caption = self._step_caption(i, rng)
            if self.caption_hook is not None:
                caption = self.caption_hook(ex.caption, caption, rng)
            captions.append(caption)
        return MicroBatch(torch.stack(latents) * self.scale, captions,
                          torch.stack(time_ids)), epoch
