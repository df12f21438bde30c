"""Which folders of a dataset are read, with which repeats and subset names, and which entries
in them are visible (the layout rules are in ``folder``'s module docstring)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .scan_result import DatasetError, DatasetScan

log = logging.getLogger(__name__)

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
_IGNORED_DIRS = frozenset({"__MACOSX"})


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
