"""What ``folder.scan_folder`` returns: the usable images, the files left out and why, and the
reports and fingerprint made from them; and ``DatasetError`` for a folder that cannot be used."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """The dataset folder cannot be used at all (missing, not a folder, no usable image)."""


@dataclass(frozen=True)
class ImageItem:
    """One usable image of the dataset.

    Attributes:
        path: the image file.
        caption: its caption after normalisation ("" when there is none).
        repeats: how many times it is seen per epoch (from an ``N_name`` folder, else 1).
        subset: the sub-folder's name without the ``N_`` prefix ("" for the root).
        width, height: size after EXIF orientation, as ``load_image_rgb`` returns it.
        sha256: hex digest of the file's bytes.
        caption_file: the caption file read, or None when there was none.
    """

    path: Path
    caption: str
    repeats: int
    subset: str
    width: int
    height: int
    sha256: str
    caption_file: Path | None = None


@dataclass(frozen=True)
class SkippedFile:
    """A file that looked like an image but cannot be used, and why."""

    path: Path
    reason: str


@dataclass
class DatasetScan:
    """The result of ``scan_folder``: what will be trained on, and what was left out."""

    root: Path
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_repeats(self) -> int:
        """Images seen per epoch (each image counted ``repeats`` times)."""
        return sum(item.repeats for item in self.items)

    @property
    def captions_missing(self) -> int:
        """Images trained with an empty caption (no file, empty file or undecodable file)."""
        return sum(1 for item in self.items if not item.caption)

    @property
    def captions_without_file(self) -> int:
        """Images that have no caption file at all."""
        return sum(1 for item in self.items if item.caption_file is None)

    @property
    def subsets(self) -> dict[str, int]:
        """``{subset: number of images}``, sorted ("" is the dataset root)."""
        out: dict[str, int] = {}
        for item in self.items:
            out[item.subset] = out.get(item.subset, 0) + 1
        return dict(sorted(out.items()))

    def fingerprint(self) -> str:
        """Hex digest over (relative path, sha256, caption, repeats) of every item.

        Any changed, added, removed or renamed image, changed caption or repeat count gives
        a different fingerprint.
        """
        rows = [[self._relative(item.path), item.sha256, item.caption, item.repeats]
                for item in self.items]
        blob = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
        # File names that are not UTF-8 arrive as lone surrogates (PEP 383): keep their bytes.
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()

    def summary(self) -> str:
        """A short multi-line report for logs and UIs."""
        n = len(self.items)
        lines = [f"{n} image{'s' if n != 1 else ''} used from {self.root} "
                 f"({self.total_repeats} per epoch with repeats)"]
        groups: dict[tuple[str, int], int] = {}
        for item in self.items:
            groups[(item.subset, item.repeats)] = groups.get((item.subset, item.repeats), 0) + 1
        for (subset, repeats), count in sorted(groups.items()):
            lines.append(f"  {subset or '(root)'}: {count} image{'s' if count != 1 else ''} "
                         f"x {repeats} repeat{'s' if repeats != 1 else ''}")
        no_file = self.captions_without_file
        empty = self.captions_missing - no_file
        lines.append(f"captions: {n - self.captions_missing} present, {no_file} missing"
                     + (f", {empty} empty or unreadable" if empty else ""))
        sizes: dict[tuple[int, int], int] = {}
        for item in self.items:
            sizes[(item.width, item.height)] = sizes.get((item.width, item.height), 0) + 1
        common = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
        if common:
            shown = ", ".join(f"{w}x{h}: {c}" for (w, h), c in common[:4])
            more = len(common) - 4
            lines.append(f"image sizes: {shown}" + (f", {more} more" if more > 0 else ""))
        if self.skipped:
            lines.append(f"{len(self.skipped)} skipped:")
            lines += [f"  {self._relative(s.path)}: {s.reason}" for s in self.skipped]
        if self.warnings:
            lines.append(f"{len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}:")
            lines += [f"  {w}" for w in self.warnings]
        return "\n".join(lines)

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()
