"""Aspect-ratio buckets, fitting images to them, and the bucket-pure batch sampler."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tsuika.trainers.data.buckets import CropInfo, assign_bucket, make_buckets, resize_and_crop
from tsuika.trainers.data.sampler import BucketBatchSampler


@pytest.mark.parametrize("resolution,step", [(32, 32), (64, 32), (64, 8), (512, 64),
                                             (768, 64), (1024, 64), (1000, 64)])
def test_buckets_are_step_multiples_within_area_and_limits(resolution, step):
    buckets = make_buckets(resolution, step=step)
    square = resolution // step * step
    assert (square, square) in buckets
    assert len(buckets) == len(set(buckets))
    low, high = max(step, math.ceil(resolution / 2 / step) * step), 2 * resolution
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert low <= min(w, h) and max(w, h) <= high
        assert (h, w) in buckets  # landscape and portrait alike
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_bucket_limits_and_bad_arguments():
    buckets = make_buckets(512, min_size=384, max_size=768)
    assert min(min(b) for b in buckets) >= 384 and max(max(b) for b in buckets) <= 768
    assert len(make_buckets(1024)) > len(make_buckets(1024, min_size=768))
    with pytest.raises(ValueError, match="step"):
        make_buckets(512, step=0)
    with pytest.raises(ValueError, match="resolution = 32"):
        make_buckets(32, step=64)
    with pytest.raises(ValueError, match="min_size"):
        make_buckets(512, min_size=640)
    with pytest.raises(ValueError, match="max_size"):
        make_buckets(512, max_size=256)


@pytest.mark.parametrize("resolution,step", [(64, 32), (512, 64), (1024, 64)])
def test_assign_bucket_picks_the_nearest_aspect(resolution, step):
    buckets = make_buckets(resolution, step=step)
    wide = assign_bucket(2000, 1000, buckets)
    assert wide[0] > wide[1]
    best = min(abs(math.log(w / h) - math.log(2)) for w, h in buckets)
    assert abs(math.log(wide[0] / wide[1]) - math.log(2)) == pytest.approx(best)
    tall = assign_bucket(1000, 2000, buckets)
    assert tall == (wide[1], wide[0])
    square = resolution // step * step
    assert assign_bucket(333, 333, buckets) == (square, square)
    with pytest.raises(ValueError):
        assign_bucket(0, 10, buckets)
    with pytest.raises(ValueError):
        assign_bucket(10, 10, [])


@pytest.mark.parametrize("size", [(300, 200), (37, 91), (64, 64), (2000, 500), (20, 20)])
@pytest.mark.parametrize("bucket", [(64, 64), (96, 32), (32, 128)])
def test_resize_and_crop_gives_exact_bucket_size(size, bucket):
    image = Image.new("RGB", size, (5, 6, 7))
    for crop in ("center", "random"):
        out, info = resize_and_crop(image, bucket, crop=crop, rng=random.Random(0))
        assert out.size == bucket and out.mode == "RGB"
        assert info.original_size == size and info.target_size == bucket
        top, left = info.crop_top_left
        assert top >= 0 and left >= 0
        assert top == 0 or left == 0  # the image covers the bucket along one side exactly


def test_center_crop_keeps_aspect_and_the_middle():
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    out, info = resize_and_crop(Image.fromarray(arr), (64, 64), crop="center")
    assert info.crop_top_left == (0, (192 - 64) // 2)  # scaled to 192x64, not squashed
    px = np.asarray(out)
    assert (px[:, 8:56, 1] > 200).all() and (px[:, 8:56, 0] < 50).all()


def test_random_crop_is_seeded_and_flip_mirrors():
    rng_image = np.random.default_rng(3).integers(0, 256, (80, 200, 3), dtype=np.uint8)
    image = Image.fromarray(rng_image)
    a, info_a = resize_and_crop(image, (64, 64), crop="random", rng=random.Random(7))
    b, info_b = resize_and_crop(image, (64, 64), crop="random", rng=random.Random(7))
    assert info_a == info_b and np.array_equal(np.asarray(a), np.asarray(b))
    lefts = {resize_and_crop(image, (64, 64), crop="random", rng=random.Random(s))[1]
             .crop_top_left[1] for s in range(20)}
    assert len(lefts) > 3 and all(0 <= x <= 160 - 64 for x in lefts)

    plain, info_plain = resize_and_crop(image, (64, 64), crop="center")
    flipped, info_flip = resize_and_crop(image, (64, 64), crop="center", flip=True)
    assert info_flip.flipped and not info_plain.flipped
    assert np.array_equal(np.asarray(flipped), np.asarray(plain)[:, ::-1])
    resized_w = 160
    assert info_flip.crop_top_left[1] == resized_w - info_plain.crop_top_left[1] - 64


def test_crop_info_sdxl_order_and_bad_arguments():
    info = CropInfo(original_size=(300, 200), crop_top_left=(4, 8), flipped=False,
                    target_size=(96, 64))
    assert info.sdxl_time_ids() == (200, 300, 4, 8, 64, 96)
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="crop"):
        resize_and_crop(image, (8, 8), crop="top")
    with pytest.raises(ValueError, match="rng"):
        resize_and_crop(image, (8, 8), crop="random")


# -- sampler ------------------------------------------------------------------------------

ITEMS = [(1, (64, 64)), (3, (96, 32)), (1, (64, 64)), (2, (32, 96)), (1, (96, 32)),
         (1, (64, 64)), (4, (64, 64))]


def test_sampler_batches_are_bucket_pure_and_count_repeats():
    sampler = BucketBatchSampler(ITEMS, batch_size=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = Counter(i for batch in batches for i in batch)
    assert seen == Counter({i: r for i, (r, _) in enumerate(ITEMS)})
    for batch in batches:
        assert 1 <= len(batch) <= 2
        assert len({ITEMS[i][1] for i in batch}) == 1
    assert sampler.bucket_counts == {(32, 96): 2, (64, 64): 7, (96, 32): 4}
    assert len(sampler) == 1 + 4 + 2


def test_sampler_is_deterministic_per_seed_and_epoch():
    a = BucketBatchSampler(ITEMS, batch_size=2, seed=5)
    b = BucketBatchSampler(ITEMS, batch_size=2, seed=5)
    assert a.batches(0) == b.batches(0) and a.batches(3) == b.batches(3)
    assert a.batches(0) != a.batches(1) or a.batches(1) != a.batches(2)
    other = BucketBatchSampler(ITEMS, batch_size=2, seed=6)
    assert any(other.batches(e) != a.batches(e) for e in range(3))
    a.set_epoch(2)
    assert list(a) == b.batches(2)


def test_sampler_drop_last_and_validation():
    sampler = BucketBatchSampler(ITEMS, batch_size=3, seed=0, drop_last=True)
    batches = sampler.batches(0)
    assert all(len(batch) == 3 for batch in batches) and len(batches) == len(sampler) == 3
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(ITEMS, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="item 1"):
        BucketBatchSampler([(1, (8, 8)), (0, (8, 8))], batch_size=1, seed=0)
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], batch_size=1, seed=0)
