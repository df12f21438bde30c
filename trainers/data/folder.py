"""Scan a dataset folder into images, captions and repeats, and say what was left out.

Layout (kohya-compatible, one level deep):

- images directly in the root: repeats 1, subset "";
- a sub-folder named ``N_name`` (N a positive integer, e.g. ``3_mychar``): each image in it
  is repeated N times per epoch, subset "name";
- a sub-folder named ``0_name``: its images are listed in ``skipped`` (0 repeats asked);
- any other sub-folder: repeats 1, subset = the folder's name (kohya ignores such folders;
  we use them, because users who sort images into plain folders expect them trained);
- folders deeper than one level are not read; each one is named in ``warnings``.

Captions: the file with the image's stem and ``caption_extension`` next to it (``a.png`` ->
``a.txt``; if only the extension's case differs, e.g. ``a.TXT``, that file is used). It is
read as UTF-8 with or without BOM (UTF-16 with BOM also works, as Windows Notepad writes it),
line endings normalised, and its non-empty lines are stripped of surrounding whitespace and
commas and joined with ", " (one caption per image). A caption that cannot be decoded gives
an empty caption and a line in ``warnings``; a missing one gives an empty caption.

Hidden files and folders (names starting with ".") and ``__MACOSX`` are ignored. Files with
other extensions are ignored silently, except well-known image formats we cannot read
(TIFF, AVIF, HEIC, ...), which are listed in ``skipped`` so the user knows to convert them.
Every image is fully decoded during the scan, so a broken file is reported here, with its
reason, instead of failing hours into training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMAGE_EXTENSIONS, ImageLoadError, load_image_rgb

log = logging.getLogger(__name__)

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
_IGNORED_DIRS = frozenset({"__MACOSX"})
# Image formats people export that this backend does not read: worth telling the user about.
_UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl",
                                           ".psd", ".jfif", ".jp2", ".ico", ".tga", ".dds"})
_HASH_CHUNK = 1 << 20


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


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scan_folder(root: str | Path, caption_extension: str = ".txt",
                workers: int | None = None) -> DatasetScan:
    """Find, validate and caption every image of a dataset folder (see the module docstring).

    Args:
        root: the dataset folder.
        caption_extension: extension of caption files, with its dot; "" reads no captions.
        workers: threads decoding images in parallel (Pillow releases the GIL while
            decoding); None picks up to 8. The result does not depend on it.

    Returns:
        A ``DatasetScan`` with items and skipped files sorted by relative POSIX path
        (code-point order, the same on every OS).

    Raises:
        DatasetError: ``root`` is missing or not a folder, or it holds no usable image.
    """
    root = Path(root).expanduser()
    _check_root(root)
    if caption_extension and not caption_extension.startswith("."):
        raise DatasetError(f"caption_extension = {caption_extension!r} must start with a dot, "
                           f"e.g. '.txt'.")
    scan = DatasetScan(root=root)
    candidates: list[tuple[Path, int, str]] = []
    # lower-cased name -> file, per folder, for captions whose extension differs in case
    by_name: dict[Path, dict[str, Path]] = {}
    for folder, repeats, subset in _folders(root, scan):
        files = _visible_files(folder)
        by_name[folder] = {path.name.lower(): path for path in files}
        for path in files:
            suffix = path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                if repeats == 0:
                    scan.skipped.append(SkippedFile(path, f"folder '{folder.name}' asks for 0 "
                                                          f"repeats; rename it to 1_{subset}"))
                else:
                    candidates.append((path, repeats, subset))
            elif suffix in _UNSUPPORTED_IMAGE_EXTENSIONS:
                supported = ", ".join(sorted(IMAGE_EXTENSIONS))
                scan.skipped.append(SkippedFile(path, f"unsupported format {suffix}; convert "
                                                      f"it to one of {supported}"))
    candidates.sort(key=lambda c: scan._relative(c[0]))
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(_probe, [path for path, _, _ in candidates]))
    for (path, repeats, subset), result in zip(candidates, results):
        if isinstance(result, SkippedFile):
            scan.skipped.append(result)
            continue
        width, height, sha = result
        caption_file = _find_caption_file(path, caption_extension, by_name[path.parent])
        caption = _read_caption(path, caption_file, scan.warnings)
        scan.items.append(ImageItem(path=path, caption=caption, repeats=repeats, subset=subset,
                                    width=width, height=height, sha256=sha,
                                    caption_file=caption_file))
    scan.skipped.sort(key=lambda s: scan._relative(s.path))
    if not scan.items:
        raise DatasetError(_no_images_message(scan))
    if scan.skipped or scan.warnings:
        log.warning("dataset %s: %d file(s) skipped, %d warning(s); see DatasetScan.summary()",
                    root, len(scan.skipped), len(scan.warnings))
    return scan


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist; set data.dir to an "
                           f"existing folder of images (check the spelling and that the path "
                           f"is absolute or relative to the working directory {os.getcwd()!r}).")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} is a file, not a folder; set data.dir "
                           f"to the folder that contains the images ({str(root.parent)!r}?).")


def _folders(root: Path, scan: DatasetScan) -> list[tuple[Path, int, str]]:
    """(folder, repeats, subset) for the root and each visible first-level sub-folder.

    A sub-folder that is a link to a folder already read (the root itself, or another
    sub-folder) is not read again; it is named in ``warnings``.
    """
    folders = [(root, 1, "")]
    seen = {_real(root)}
    for sub in _visible_dirs(root):
        real = _real(sub)
        if real in seen:
            scan.warnings.append(f"folder {sub.name!r} leads to a folder that is already read "
                                 f"(a link); its images were not read twice.")
            continue
        seen.add(real)
        match = _REPEATS_FOLDER.match(sub.name)
        if match:
            folders.append((sub, int(match.group(1)), match.group(2)))
        else:
            folders.append((sub, 1, sub.name))
        for nested in _visible_dirs(sub):
            scan.warnings.append(f"folder {nested.relative_to(root).as_posix()!r} is nested two "
                                 f"levels deep and was not read; move its images up into "
                                 f"{sub.name!r} or the dataset root.")
    return folders


def _real(folder: Path) -> str:
    try:
        return os.path.realpath(folder, strict=True)
    except OSError:  # a link loop or a vanished folder: it is its own identity
        return str(folder)


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it
                       if not e.name.startswith(".") and e.name not in _IGNORED_DIRS]
    except OSError as exc:  # unreadable, a link loop, or removed while we look
        log.warning("cannot list %s (%s)", folder, exc.strerror or exc)
        return []
    return sorted(entries, key=lambda e: e.name)


def _entry_is(entry: os.DirEntry, kind: str) -> bool:
    # A dangling link or a link loop is neither a file nor a folder; never an error.
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError:
        return False


def _visible_dirs(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _visible_entries(folder) if _entry_is(e, "dir")]


def _visible_files(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _visible_entries(folder) if _entry_is(e, "file")]


def _probe(path: Path) -> tuple[int, int, str] | SkippedFile:
    """(width, height, sha256) of a decodable image, or why it cannot be used."""
    try:
        image = load_image_rgb(path)
        sha = file_sha256(path)
    except ImageLoadError as exc:
        return SkippedFile(path, exc.reason)
    except OSError as exc:  # e.g. the file vanished or became unreadable between the two reads
        return SkippedFile(path, f"cannot read file ({exc.strerror or exc})")
    width, height = image.size
    image.close()
    return width, height, sha


def _find_caption_file(image: Path, extension: str,
                       folder_files: dict[str, Path]) -> Path | None:
    if not extension:
        return None
    name = image.stem + extension
    exact = image.with_name(name)
    if exact.is_file():
        return exact
    return folder_files.get(name.lower())


def _read_caption(image: Path, caption_path: Path | None, warnings: list[str]) -> str:
    """The normalised caption in ``caption_path`` ("" with a warning when unreadable)."""
    if caption_path is None:
        return ""
    try:
        raw = caption_path.read_bytes()
    except OSError as exc:
        warnings.append(f"caption {caption_path.name!r} of {image.name!r} cannot be read "
                        f"({exc.strerror or exc}); the image is trained with an empty caption.")
        return ""
    try:
        text = _decode_caption(raw)
    except UnicodeDecodeError as exc:
        warnings.append(f"caption {caption_path.name!r} of {image.name!r} is not UTF-8 (byte "
                        f"{exc.start}); the image is trained with an empty caption. Re-save "
                        f"the file as UTF-8.")
        return ""
    return normalize_caption(text)


def _decode_caption(raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def normalize_caption(text: str) -> str:
    """One-line caption: lines stripped of whitespace and edge commas, joined with ", ".

    Args:
        text: the caption file's decoded text.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    parts = [line.strip().strip(",").strip() for line in lines]
    return ", ".join(part for part in parts if part)


def _no_images_message(scan: DatasetScan) -> str:
    supported = ", ".join(sorted(IMAGE_EXTENSIONS))
    message = (f"no usable images in dataset folder {str(scan.root)!r}: put {supported} files "
               f"directly in it or in 'N_name' sub-folders (e.g. '10_mychar').")
    if scan.skipped:
        first = "; ".join(f"{scan._relative(s.path)}: {s.reason}" for s in scan.skipped[:3])
        more = f" (and {len(scan.skipped) - 3} more)" if len(scan.skipped) > 3 else ""
        message += f" {len(scan.skipped)} file(s) were skipped: {first}{more}."
    return message


def quick_problem(root: str | Path) -> str | None:
    """Why ``root`` cannot be a dataset, found from file names alone (no image is decoded):
    a missing folder, or no image file where ``scan_folder`` looks. ``None`` means it may be
    one (``scan_folder`` still checks every image). Hosts call it when a job is queued.

    Args:
        root: the dataset folder.
    """
    root = Path(root).expanduser()
    try:
        _check_root(root)
    except DatasetError as e:
        return str(e)
    scan = DatasetScan(root=root)
    for folder, repeats, _ in _folders(root, scan):
        if repeats and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in _visible_files(folder)):
            return None
    return _no_images_message(scan)


def quick_fingerprint(root: str | Path) -> str:
    """A cheap fingerprint of what ``scan_folder`` reads: it changes whenever a file is added,
    removed, renamed or rewritten (relative names, sizes and modification times), without
    reading the images. Hosts use it to decide whether a dataset must be scanned again.

    Never raises on odd entries: dangling links and link loops count by their own name, file
    names that are not UTF-8 by their bytes.

    Args:
        root: the dataset folder.
    """
    root = Path(root).expanduser()
    h = hashlib.sha256()
    if not root.is_dir():
        return h.hexdigest()
    for folder, _, _ in _folders(root, DatasetScan(root=root)):
        for entry in _visible_entries(folder):
            try:
                st = entry.stat()
            except OSError:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
            rel = os.path.relpath(entry.path, root)
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def captions_without_image(root: str | Path, caption_extension: str = ".txt") -> list[Path]:
    """Caption files in the folders ``scan_folder`` reads that no image file goes with
    (matched by stem, case-insensitively; an image in a format we cannot read still counts
    as its image, it is reported as skipped instead). Sorted by path.

    Args:
        root: the dataset folder.
        caption_extension: extension of caption files, with its dot; "" finds none.
    """
    root = Path(root).expanduser()
    if not caption_extension or not root.is_dir():
        return []
    ext = caption_extension.lower()
    orphans = []
    for folder, _, _ in _folders(root, DatasetScan(root=root)):
        files = _visible_files(folder)
        stems = {p.stem.lower() for p in files
                 if p.suffix.lower() in IMAGE_EXTENSIONS | _UNSUPPORTED_IMAGE_EXTENSIONS}
        orphans += [p for p in files if p.suffix.lower() == ext and p.stem.lower() not in stems]
    return sorted(orphans)
