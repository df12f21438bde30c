"""Caption text and caption files: edit tags, count them, write sidecar files safely.

A caption is comma-separated tags (``data.captions.split_tags``); free-text captions are one
"tag" each and pass through unchanged unless an edit names them. Edits run in one fixed
order, so a result never depends on how options were listed:

    replace -> remove -> dedupe -> sort -> prefix / suffix

Prefix and suffix (a trigger word) are added last, so sorting never moves them; a prefix
tag that is already in the caption is moved to the front, not repeated.

Files: :func:`write_caption_files` writes ``<image stem><ext>`` next to each image, never
over an existing file unless ``overwrite`` is given, each one atomically (a temporary file
renamed into place), so a cancelled run leaves whole files only.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..data.captions import split_tags
from ..files import give_default_permissions

log = logging.getLogger(__name__)


@dataclass
class TagEdit:
    """What to change in every caption (each field empty = no change).

    Attributes:
        prefix: tag(s) put first ("sks" or "sks, 1girl"); moved there if already present.
        suffix: tag(s) put last.
        remove: tags removed (compared case-insensitively).
        replace: ``{old tag: new tag}`` (old compared case-insensitively; an empty new tag
            removes it).
        dedupe: drop repeated tags (case-insensitively; the first spelling stays).
        sort: sort the tags alphabetically (case-insensitively).
    """

    prefix: str = ""
    suffix: str = ""
    remove: list[str] = field(default_factory=list)
    replace: dict[str, str] = field(default_factory=dict)
    dedupe: bool = False
    sort: bool = False

    def __post_init__(self):
        for old in self.replace:
            if not old.strip():
                raise ValueError(f"replace: an empty tag cannot be replaced (got {old!r} -> "
                                 f"{self.replace[old]!r}); write it as old=new with a tag "
                                 "on the left.")

    @property
    def is_noop(self) -> bool:
        return not (self.prefix.strip() or self.suffix.strip() or self.remove or self.replace
                    or self.dedupe or self.sort)

    def apply(self, caption: str) -> str:
        """``caption`` with every edit applied, tags joined with ", ".

        Args:
            caption: a caption (comma-separated tags or free text).
        """
        if self.is_noop:
            return caption
        tags = split_tags(caption)
        if self.replace:
            table = {k.strip().casefold(): v.strip() for k, v in self.replace.items()}
            tags = [table.get(t.casefold(), t) for t in tags]
            tags = [t for t in tags if t]
        if self.remove:
            gone = {t.strip().casefold() for t in self.remove}
            tags = [t for t in tags if t.casefold() not in gone]
        if self.dedupe:
            tags = _unique(tags)
        if self.sort:
            tags = sorted(tags, key=str.casefold)
        front, back = split_tags(self.prefix), split_tags(self.suffix)
        placed = {t.casefold() for t in front + back}
        middle = [t for t in tags if t.casefold() not in placed]
        return ", ".join(front + middle + back)


MERGES = ("replace", "prefix", "append")


def merge_caption(old: str, new: str, merge: str) -> str:
    """``new`` combined with an existing caption ``old``.

    Args:
        old: the caption file's text.
        new: the caption just made.
        merge: "replace" (new only), "prefix" (new tags first, then the old ones) or
            "append" (old, then the new tags); a tag in both is written once, where the
            old caption had it ("prefix": where the new one has it).
    """
    if merge == "replace" or not old.strip():
        return new
    if merge == "prefix":
        return TagEdit(prefix=new).apply(old)
    if merge == "append":
        old_tags = {t.casefold() for t in split_tags(old)}
        extra = ", ".join(t for t in split_tags(new) if t.casefold() not in old_tags)
        return TagEdit(suffix=extra).apply(old)
    raise ValueError(f"merge {merge!r} is not one of {', '.join(MERGES)}.")


def parse_tag_list(text: str) -> list[str]:
    """Tags from text: comma- or line-separated (what a node's text box or a CLI gives)."""
    return [t for line in text.splitlines() for t in split_tags(line)]


def parse_replacements(text: str) -> dict[str, str]:
    """``{old: new}`` from lines or comma-separated items of the form ``old=new``.

    Raises:
        ValueError: an item without ``=`` (named, with the expected form).
    """
    out: dict[str, str] = {}
    for item in parse_tag_list(text):
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise ValueError(f"replace: {item!r} is not of the form old=new (e.g. "
                             "'1girl=woman'; 'old=' removes the tag).")
        out[old.strip()] = new.strip()
    return out


def tag_frequency(captions: Iterable[str]) -> list[tuple[str, int]]:
    """``[(tag, number of captions holding it)]``, most frequent first, then by name.

    Tags are counted once per caption and case-insensitively (shown in their first
    spelling).

    Args:
        captions: the captions.
    """
    counts: Counter = Counter()
    spelling: dict[str, str] = {}
    for caption in captions:
        for tag in _unique(split_tags(caption)):
            key = tag.casefold()
            spelling.setdefault(key, tag)
            counts[key] += 1
    return [(spelling[k], n) for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def frequency_table(freq: list[tuple[str, int]], total: int, limit: int = 50) -> str:
    """A plain-text table of :func:`tag_frequency` (``count  share  tag``)."""
    lines = [f"{n:6d}  {100 * n / max(total, 1):5.1f}%  {tag}" for tag, n in freq[:limit]]
    if len(freq) > limit:
        lines.append(f"... and {len(freq) - limit} more tags")
    return "\n".join(lines)


@dataclass
class WriteResult:
    """What :func:`write_caption_files` did, by file."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # existed; not overwritten
    unchanged: list[Path] = field(default_factory=list)  # same text already there


def caption_path(image: Path, extension: str = ".txt") -> Path:
    """The sidecar caption file of ``image``."""
    return image.with_name(image.stem + extension)


def write_caption_file(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        give_default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_caption_files(captions: Mapping[Path, str], extension: str = ".txt",
                        overwrite: bool = False) -> WriteResult:
    """Write each image's caption into its sidecar file.

    Args:
        captions: ``{image path: caption}``.
        extension: caption file extension, with its dot.
        overwrite: replace existing caption files (otherwise they are kept and listed).
    """
    result = WriteResult()
    for image, text in captions.items():
        path = caption_path(Path(image), extension)
        if path.exists():
            if path.read_text(encoding="utf-8", errors="replace").strip() == text.strip():
                result.unchanged.append(path)
                continue
            if not overwrite:
                result.kept.append(path)
                continue
        write_caption_file(path, text)
        result.written.append(path)
    return result


def _unique(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in tags:
        if t.casefold() not in seen:
            seen.add(t.casefold())
            out.append(t)
    return out


@dataclass
class FolderEdit:
    """The result of :func:`edit_caption_folder`: per caption file, the old and new text."""

    changes: dict[Path, tuple[str, str]] = field(default_factory=dict)
    unchanged: int = 0
    without_file: list[Path] = field(default_factory=list)  # images with no caption file
    written: bool = False


def edit_caption_folder(scan, edit: TagEdit, write: bool = False) -> FolderEdit:
    """Apply ``edit`` to the caption file of every image of a scanned dataset.

    Only existing caption files change (an image without one is listed: caption it first).
    With ``write`` False nothing is written (a preview); with True each changed file is
    replaced atomically.

    Args:
        scan: a ``data.folder.DatasetScan``.
        edit: the edits.
        write: write the changed files.
    """
    result = FolderEdit(written=write)
    for item in scan.items:
        if item.caption_file is None:
            result.without_file.append(item.path)
            continue
        new = edit.apply(item.caption)
        if new == item.caption:
            result.unchanged += 1
            continue
        result.changes[item.caption_file] = (item.caption, new)
    if write:
        for path, (_, new) in result.changes.items():
            write_caption_file(path, new)
        log.info("rewrote %d caption files", len(result.changes))
    return result
