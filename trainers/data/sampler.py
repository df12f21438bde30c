"""Batches whose images share one bucket, in a seeded order that is the same on every run.

Each epoch: every item is listed ``repeats`` times, grouped by bucket, each group shuffled
and cut into batches, and the batches of all buckets shuffled together. The random source
is ``random.Random(f"{seed}:order:{epoch}")``, so an epoch's order depends only on
(seed, epoch, items, batch size): a resumed run sees the batches an uninterrupted run
would have seen. Usable as a torch ``DataLoader(batch_sampler=...)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

Bucket = tuple[int, int]


class BucketBatchSampler:
    """Seeded, bucket-pure batches of item indices.

    Args:
        items: one ``(repeats, (width, height))`` per dataset item, in dataset order; the
            yielded numbers are indices into this list.
        batch_size: items per batch; a bucket's last batch may be smaller.
        seed: the run's seed.
        drop_last: drop each bucket's incomplete last batch; a bucket with fewer samples
            than ``batch_size`` then contributes nothing (``len`` counts what is yielded).

    Raises:
        ValueError: empty ``items``, ``batch_size`` < 1, or a repeat count < 1.
    """

    def __init__(self, items: Sequence[tuple[int, Bucket]], batch_size: int, seed: int,
                 drop_last: bool = False):
        if not items:
            raise ValueError("BucketBatchSampler: items is empty; scan a dataset first.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"BucketBatchSampler: batch_size = {batch_size!r} must be an "
                             f"integer >= 1.")
        self._by_bucket: dict[Bucket, list[int]] = {}
        for index, (repeats, bucket) in enumerate(items):
            if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
                raise ValueError(f"BucketBatchSampler: item {index} has repeats = {repeats!r}; "
                                 f"it must be an integer >= 1.")
            self._by_bucket.setdefault(tuple(bucket), []).extend([index] * repeats)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that ``iter()`` yields (like torch's DistributedSampler).

        Args:
            epoch: 0-based epoch number.
        """
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` in order.

        Args:
            epoch: 0-based epoch number.
        """
        rng = random.Random(f"{self.seed}:order:{epoch}")
        out: list[list[int]] = []
        for bucket in sorted(self._by_bucket):
            members = list(self._by_bucket[bucket])
            rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    out.append(batch)
        rng.shuffle(out)
        return out

    @property
    def bucket_counts(self) -> dict[Bucket, int]:
        """Samples per epoch in each bucket (repeats included)."""
        return {bucket: len(members) for bucket, members in sorted(self._by_bucket.items())}

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        per_bucket = (len(members) // self.batch_size if self.drop_last
                      else -(-len(members) // self.batch_size)
                      for members in self._by_bucket.values())
        return sum(per_bucket)
