"""Pre-flight check of a dataset: what will go wrong before hours are spent training.

``check_dataset`` looks at a scanned dataset (``data.folder.scan_folder``) with the run's
data options and the model's tokenizers, and lists each problem as a :class:`Finding`:

- ``missing_caption``: an image without a caption file (it trains on an empty caption);
- ``orphan_caption``: a caption file without an image;
- ``empty_caption``: a caption file that is empty (or unreadable);
- ``trigger_missing``: a caption without the trigger word (when the training does not add
  it itself, i.e. the trigger was given to the check but ``data.trigger_word`` is empty);
- ``caption_too_long``: a caption, as training sees it (trigger first), longer than a
  tokenizer reads, with the token count, the limit and the first words that are dropped;
- ``near_duplicate``: images whose perceptual hashes are within a few bits
  (``data.phash``); exact copies are a case of it;
- ``too_small``: an image smaller than its bucket, so training upscales it (blurry);
- ``lone_bucket``: the only image of its aspect ratio (it trains in batches of its own);
- ``skipped`` / ``dataset_warning``: what the scan itself left out or warned about.

The report also gives the bucket histogram, the token limits, the trigger-word coverage,
and (filled by ``trainers.estimate``) the time and memory estimate. ``to_text`` is what a
node shows (headline first, problem lines start with ``warning:``); ``to_dict`` is the CLI's
JSON.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig
from .data.buckets import assign_bucket, make_buckets
from .data.captions import CaptionAugment, split_tags
from .data.folder import DatasetScan, captions_without_image
from .data.images import ImageLoadError, load_image_rgb
from .data.phash import (
    DEFAULT_MAX_DISTANCE,
    colour_signature,
    near_duplicate_groups,
    perceptual_hash,
)

log = logging.getLogger(__name__)

CHECKS = ("missing_caption", "orphan_caption", "empty_caption", "trigger_missing",
          "caption_too_long", "near_duplicate", "too_small", "lone_bucket", "skipped",
          "dataset_warning")
# Files named per finding line on a node; the JSON always lists every file.
SHOWN_FILES = 5


@dataclass
class Finding:
    """One problem of the dataset.

    Attributes:
        check: which check found it (one of ``CHECKS``).
        message: one line for people, naming the file(s) and the fix.
        files: the files concerned, relative to the dataset folder (POSIX separators).
        detail: numbers behind the message (token counts, sizes, distances).
    """

    check: str
    message: str
    files: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreflightReport:
    """The result of :func:`check_dataset`."""

    root: str
    images: int
    per_epoch: int
    findings: list[Finding] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    token_limits: dict[str, int] = field(default_factory=dict)
    trigger: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None

    def by_check(self, check: str) -> list[Finding]:
        """The findings of one check."""
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the CLI's ``--json``)."""
        out = asdict(self)
        out["problems"] = len(self.findings)
        out["counts"] = {c: len(self.by_check(c)) for c in CHECKS if self.by_check(c)}
        return out

    def to_text(self, shown_as: str | None = None) -> str:
        """The report as a node shows it: a headline, then one ``warning:`` line per problem,
        the bucket histogram, token limits, trigger coverage and the estimate.

        Args:
            shown_as: how to name the folder (what the user typed, not a server path).
        """
        n = len(self.findings)
        where = shown_as or self.root
        lines = [f"pre-flight: {n} problem{'s' if n != 1 else ''} in {self.images} image"
                 f"{'s' if self.images != 1 else ''} of {where}"]
        for f in self.findings:
            lines.append(f"warning: {f.message}")
        lines.append("buckets (size: images): "
                     + ", ".join(f"{b}: {c}" for b, c in self.buckets.items()))
        if self.token_limits:
            lines.append("captions read up to: " + ", ".join(
                f"{name} {limit} tokens" for name, limit in self.token_limits.items()))
        if self.trigger:
            t = self.trigger
            lines.append(f"trigger word {t['word']!r}: in {t['in_captions']} of {t['of']} "
                         "captions" + (" (training puts it first in every caption)"
                                       if t["added_by_training"] else ""))
        if self.estimate:
            lines.append(self.estimate.get("text", ""))
        return "\n".join(line for line in lines if line)


def named_tokenizers(bundle) -> list[tuple[str, Any]]:
    """``[(component name, tokenizer)]`` of a loaded model, one per text encoder
    (``text_encoder`` for SD1.x; ``text_encoder_1``/``text_encoder_2`` for SDXL).

    Args:
        bundle: a ``families.ModelBundle``.
    """
    names = [name for name in bundle.components if name != "unet"]
    return list(zip(names, bundle.tokenizers))


def default_tokenizers() -> list[tuple[str, Any]]:
    """The shipped CLIP tokenizer, for checks run without a model: SD1.x and SDXL text
    encoders all read CLIP's BPE tokens, 77 per caption including start and end."""
    from .families.sd15 import load_tokenizer

    return [("clip", load_tokenizer())]


def check_dataset(scan: DatasetScan, data: DataConfig,
                  tokenizers: list[tuple[str, Any]] | None = None,
                  trigger_word: str | None = None, batch_size: int = 1,
                  max_distance: int = DEFAULT_MAX_DISTANCE,
                  workers: int | None = None) -> PreflightReport:
    """Every check of the module docstring on ``scan`` for a run with ``data`` options.

    Args:
        scan: the scanned dataset folder.
        data: the run's data options (resolution, buckets, trigger word, caption extension).
        tokenizers: ``[(name, tokenizer)]`` to measure captions with (see
            ``named_tokenizers``); None skips the length check.
        trigger_word: the word every caption should hold; None uses ``data.trigger_word``.
        batch_size: the run's batch size (named in the lone-bucket message).
        max_distance: perceptual-hash bits two images may differ in and count as duplicates;
            a negative value skips the duplicate check.
        workers: threads decoding images for the hashes; None picks up to 8.
    """
    root = scan.root
    report = PreflightReport(root=str(root), images=len(scan.items), per_epoch=scan.total_repeats)
    rel = scan._relative
    add = report.findings.append
    for s in scan.skipped:
        add(Finding("skipped", f"{rel(s.path)} is not used: {s.reason}", [rel(s.path)]))
    for w in scan.warnings:
        add(Finding("dataset_warning", w))
    _caption_files(scan, data, add)
    _trigger(scan, data, trigger_word, report)
    if tokenizers:
        _lengths(scan, data, tokenizers, report)
    _sizes_and_buckets(scan, data, batch_size, report)
    if max_distance >= 0:
        _duplicates(scan, max_distance, workers, add)
    return report


def _caption_files(scan: DatasetScan, data: DataConfig, add) -> None:
    rel = scan._relative
    ext = data.caption_extension
    for item in scan.items:
        if item.caption_file is None and ext:
            add(Finding("missing_caption", f"{rel(item.path)} has no caption file; write "
                        f"{item.path.stem}{ext} next to it (it trains on an empty caption)",
                        [rel(item.path)]))
        elif not item.caption and item.caption_file is not None:
            add(Finding("empty_caption", f"{rel(item.caption_file)} is empty; describe "
                        f"{item.path.name} in it or delete it", [rel(item.caption_file)]))
    for orphan in captions_without_image(scan.root, ext):
        add(Finding("orphan_caption", f"{rel(orphan)} has no image next to it (renamed or "
                    "deleted image?); rename it to its image's name or delete it",
                    [rel(orphan)]))


def _has_trigger(caption: str, trigger: str) -> bool:
    wanted = [t.casefold() for t in split_tags(trigger)]
    text = caption.casefold()
    tags = {t.casefold() for t in split_tags(caption)}
    # A tag equal to it, or the word inside free text ("a photo of sks dog").
    return all(w in tags or f" {w} " in f" {text} " for w in wanted)


def _trigger(scan: DatasetScan, data: DataConfig, trigger_word: str | None,
             report: PreflightReport) -> None:
    word = (trigger_word if trigger_word is not None else data.trigger_word).strip()
    if not word:
        return
    added = bool(data.trigger_word.strip()) and split_tags(data.trigger_word) == split_tags(word)
    without = [it for it in scan.items if not _has_trigger(it.caption, word)]
    report.trigger = {"word": word, "in_captions": len(scan.items) - len(without),
                      "of": len(scan.items), "added_by_training": added}
    if added or not without:
        return
    files = [scan._relative(it.path) for it in without]
    shown = ", ".join(files[:SHOWN_FILES]) + (f" and {len(files) - SHOWN_FILES} more"
                                              if len(files) > SHOWN_FILES else "")
    report.findings.append(Finding(
        "trigger_missing", f"trigger word {word!r} is missing from {len(files)} of "
        f"{len(scan.items)} captions ({shown}); add it to them, or set data.trigger_word to "
        "have training put it first", files, {"missing": len(files), "of": len(scan.items)}))


def _lengths(scan: DatasetScan, data: DataConfig, tokenizers, report: PreflightReport) -> None:
    augment = CaptionAugment(trigger_word=data.trigger_word)
    for name, tok in tokenizers:
        limit = int(tok.model_max_length)
        report.token_limits[name] = limit
        for item in scan.items:
            text = augment.apply(item.caption, random.Random(0))  # as training sees it
            if not text:
                continue
            ids = tok(text, truncation=False, verbose=False).input_ids
            if len(ids) <= limit:
                continue
            dropped = tok.decode(ids[limit - 1:-1][:6], skip_special_tokens=True).strip()
            path = scan._relative(item.caption_file or item.path)
            report.findings.append(Finding(
                "caption_too_long", f"{path}: {len(ids)} tokens, but {name} reads {limit} "
                f"(start and end included); the words from {dropped!r} on are ignored: "
                "shorten it or put what matters first", [path],
                {"tokens": len(ids), "limit": limit, "tokenizer": name, "dropped_from": dropped}))


def bucket_list(data: DataConfig) -> list[tuple[int, int]]:
    """The buckets a run with ``data`` options trains in (as ``prepare.TrainingData``)."""
    if not data.buckets:
        return [(data.resolution, data.resolution)]
    return make_buckets(data.resolution, step=data.bucket_step)


def _sizes_and_buckets(scan: DatasetScan, data: DataConfig, batch_size: int,
                       report: PreflightReport) -> None:
    buckets = bucket_list(data)
    members: dict[tuple[int, int], list] = {}
    for item in scan.items:
        bucket = assign_bucket(item.width, item.height, buckets)
        members.setdefault(bucket, []).append(item)
        scale = max(bucket[0] / item.width, bucket[1] / item.height)
        if scale > 1.0:
            path = scan._relative(item.path)
            report.findings.append(Finding(
                "too_small", f"{path} is {item.width}x{item.height}, smaller than its "
                f"{bucket[0]}x{bucket[1]} bucket at resolution {data.resolution}: it is "
                f"upscaled {scale:.2f}x (blurry); use a larger image or a lower resolution",
                [path], {"size": [item.width, item.height], "bucket": list(bucket),
                         "upscale": round(scale, 3)}))
    ordered = sorted(members.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0][0]))
    report.buckets = {f"{w}x{h}": len(items) for (w, h), items in ordered}
    if len(scan.items) < 2 or len(members) < 2:
        return
    for (w, h), items in ordered:
        if len(items) == 1:
            path = scan._relative(items[0].path)
            alone = (f"trains in batches of its own (batch size {batch_size})"
                     if batch_size > 1 else "it is the only image of its shape")
            report.findings.append(Finding(
                "lone_bucket", f"{path} ({items[0].width}x{items[0].height}) is alone in "
                f"bucket {w}x{h}: {alone}; crop it to the shape of the others or add images "
                "of its shape", [path], {"bucket": [w, h]}))


def _hash(path: Path) -> tuple[int, tuple[int, ...]] | None:
    try:
        with load_image_rgb(path) as image:
            return perceptual_hash(image), colour_signature(image)
    except (ImageLoadError, OSError) as exc:  # changed since the scan: the scan reported it
        log.warning("cannot hash %s: %s", path, exc)
        return None


def _duplicates(scan: DatasetScan, max_distance: int, workers: int | None, add) -> None:
    paths = [item.path for item in scan.items]
    with ThreadPoolExecutor(max_workers=max(1, workers or 8)) as pool:
        hashes = list(pool.map(_hash, paths))
    kept = [(p, h) for p, h in zip(paths, hashes) if h is not None]
    for group in near_duplicate_groups([h for _, (h, _) in kept], max_distance,
                                       [c for _, (_, c) in kept]):
        files = [scan._relative(kept[i][0]) for i in group]
        add(Finding("near_duplicate", f"near-duplicate images: {', '.join(files)}; keep one "
                    "(duplicates train that picture more often than the others)", files,
                    {"hashes": [f"{kept[i][1][0]:016x}" for i in group]}))


def dataset_report(config, bundle, scan, cb) -> str:
    """The run's pre-flight check: its problems as warnings (what the scan said is told below) and
    its report text for the start report."""
    report = check_dataset(scan, config.data, named_tokenizers(bundle),
                           batch_size=config.train.batch_size)
    for finding in report.findings:
        if finding.check not in ("skipped", "dataset_warning"):
            cb.on_message(f"warning: {finding.message}")
    return report.to_text()
