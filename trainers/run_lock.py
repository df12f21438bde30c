"""One writer per output folder: a lock file naming the process that holds it.

Two runs writing into one ``output.dir`` interleave their files and states. The lock file
``.tsuika.lock`` (created exclusively) records the holder's pid and host; a second run is
refused with a message naming them. A lock whose process is gone (same host, pid not alive),
or an empty lock older than a minute (killed while writing it), is stale and taken over, so
a crash never blocks a folder for good.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".tsuika.lock"
_EMPTY_LOCK_GRACE_S = 60.0


class OutputError(OSError):
    """The output folder cannot be used (a file, not writable, locked, disk full...)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return self.message


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _stale(path: Path, holder: dict | None) -> str | None:
    """Why the lock at ``path`` is stale, or None when it may be held."""
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it vanished"
        return f"it is unreadable and {age:.0f} s old" if age > _EMPTY_LOCK_GRACE_S else None
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) \
            and not _pid_alive(pid):
        return f"process {pid} no longer runs"
    return None


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder``'s lock for the duration of the ``with`` block.

    Args:
        folder: an existing output folder.

    Raises:
        OutputError: another live run holds the lock (named in the message).
    """
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            why = _stale(path, holder)
            if why is None:
                who = (f"process {holder.get('pid')} on {holder.get('host')!r}" if holder
                       else "a run that is just starting")
                raise OutputError(
                    f"output.dir {str(folder)!r} is in use by another training ({who}); wait "
                    f"for it to finish or choose another output.dir. If no training is "
                    f"running there, delete {str(path)!r}.") from None
            log.warning("taking over the stale lock %s (%s)", path, why)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        break
    else:
        raise OutputError(f"could not take the lock {str(path)!r} of output.dir; another run "
                          "keeps replacing it. Choose another output.dir.")
    try:
        yield path
    finally:
        holder = _read(path)
        if holder is not None and holder.get("pid") == me["pid"] and \
                holder.get("since") == me["since"]:
            path.unlink(missing_ok=True)
