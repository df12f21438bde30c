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
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .caption_files import _find_caption_file, _read_caption, normalize_caption
from .images import IMAGE_EXTENSIONS, ImageLoadError, load_image_rgb
from .layout import _check_root, _folders, _visible_entries, _visible_files
from .scan_result import DatasetError, DatasetScan, ImageItem, SkippedFile

# The dataset's public names stay importable from here, where callers have always found them.
__all__ = ["DatasetError", "DatasetScan", "ImageItem", "SkippedFile", "captions_without_image",
           "file_sha256", "normalize_caption", "quick_fingerprint", "quick_problem",
           "scan_folder"]

log = logging.getLogger(__name__)

# Image formats people export that this backend does not read: worth telling the user about.
_UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl",
                                           ".psd", ".jfif", ".jp2", ".ico", ".tga", ".dds"})
_HASH_CHUNK = 1 << 20


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
