"""File-system helpers every writer shares: the permissions a new file should get.

``tempfile.mkstemp`` / ``mkdtemp`` create owner-only (0600 / 0700) entries, which is right
while a file is half-written but wrong once it is renamed into place: a LoRA must be
readable the way any other file the user creates is (by a web server, a second account),
that is with the mode the user's umask gives.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way to read it is to set it; a lock keeps our own threads from
    # seeing the temporary value.
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def give_default_permissions(path: str | Path) -> None:
    """Set ``path`` (a file or a folder) to the mode a plain ``open()`` / ``mkdir()`` would
    have given it under the current umask.

    Args:
        path: an existing file or folder that we created (e.g. with mkstemp).
    """
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())
