"""Where a node input may point on the server: the one rule every node that takes a path uses.

A ComfyUI server may be reachable by other people, and ``/prompt`` accepts any text. So a
folder typed into a node is only read when it lies inside an allowed folder:

- ComfyUI's input folder (where users already put their files);
- the pack's own ``examples/`` folder (shipped sample data, nothing private);
- the folders the server's owner lists in the ``TSUIKA_ALLOWED_DIRS`` environment variable
  (separated by ``os.pathsep``: ``:`` on Linux/macOS, ``;`` on Windows).

Paths are resolved first (``..``, symlinks), so no spelling escapes. A path outside gets the
same answer whether it exists or not, and the answer names no server path. The variable is
the only allow-list: a file under ComfyUI's user folder was not used because web users can
write there through ComfyUI's ``/userdata`` API.

Pure functions take the allowed roots as an argument, so they are tested without ComfyUI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
ALLOWED_DIRS_ENV = "TSUIKA_ALLOWED_DIRS"


class PathRefused(ValueError):
    """A node input names a path the server does not let it read."""


def allowed_roots() -> list[Path]:
    """ComfyUI's input folder, the pack's examples, then the owner's ``TSUIKA_ALLOWED_DIRS``."""
    import folder_paths

    roots = [Path(folder_paths.get_input_directory()), PACK_ROOT / "examples"]
    roots += [Path(p).expanduser() for p in os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep)
              if p.strip()]
    return roots


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # symlink loops, over-long names: treated as outside
        return None


def inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` (resolved) is one of ``roots`` (resolved) or below one of them."""
    real = _resolved(path)
    if real is None:
        return False
    for root in roots:
        base = _resolved(root)
        if base is not None and (real == base or base in real.parents):
            return True
    return False


def refusal(input_name: str, text: str) -> str:
    """The one message for every path outside the allowed folders (existing or not)."""
    return (f"{input_name} {text!r} is not inside an allowed folder: put the folder inside "
            "ComfyUI's input folder and give its name there (e.g. 'my_dataset'), or ask the "
            f"server's owner to add its parent folder to {ALLOWED_DIRS_ENV}.")


def resolve_input_folder(input_name: str, text: str, roots: Sequence[Path],
                         relative_to: Sequence[Path]) -> Path:
    """The folder a node input names, confined to ``roots``.

    Args:
        input_name: the node input (named in messages).
        text: what the user typed: a path relative to one of ``relative_to`` (tried in
            order), or an absolute path.
        roots: the allowed folders.
        relative_to: where relative paths are looked up (ComfyUI's input folder first).

    Raises:
        PathRefused: empty text, a path outside ``roots`` (one message, existing or not), or
            an allowed path that is not an existing folder.
    """
    text = (text or "").strip()
    if not text:
        raise PathRefused(f"{input_name} is empty: give the name of a folder inside ComfyUI's "
                          "input folder.")
    if any(ord(c) < 32 for c in text):
        raise PathRefused(refusal(input_name, text))
    given = Path(text).expanduser()
    candidates = [given] if given.is_absolute() else [base / given for base in relative_to]
    allowed = [c for c in candidates if inside(c, roots)]
    if not allowed:
        raise PathRefused(refusal(input_name, text))
    for candidate in allowed:
        if candidate.is_dir():
            return candidate.resolve()
    raise PathRefused(f"{input_name} {text!r} does not exist (or is not a folder) inside the "
                      "allowed folders; check the spelling, or pick a sub-folder of ComfyUI's "
                      "input folder in the list.")


def files_outside(paths: Sequence[Path], roots: Sequence[Path]) -> list[Path]:
    """The files among ``paths`` that resolve outside ``roots`` (links pointing out)."""
    return [p for p in paths if not inside(p, roots)]


def model_files(folder: str) -> list[str]:
    """The ``.safetensors`` files ComfyUI lists in one of its model folders (``"loras"``): the
    choices of a node's combo (never unpickled, so other kinds are not offered)."""
    try:
        import folder_paths
    except ImportError:  # no ComfyUI (the pure helpers' tests): nothing to list
        return []
    return [n for n in folder_paths.get_filename_list(folder) if n.endswith(".safetensors")]


def model_file(input_name: str, folder: str, name: str) -> Path:
    """The full path of ``name`` picked from :func:`model_files`; anything else is refused
    without looking at the disk (a combo value is a name from the list, never a path).

    Raises:
        PathRefused: ``name`` is not one of the folder's listed files.
    """
    if name not in model_files(folder):
        raise PathRefused(f"{input_name} {name!r} is not a file in ComfyUI's models/{folder} "
                          "folder; pick one from the list (refresh the page after adding "
                          "files).")
    import folder_paths

    return Path(folder_paths.get_full_path_or_raise(folder, name))


def dataset_folder(input_name: str, text: str) -> Path:
    """A dataset folder typed into a node, confined to the allowed folders of this server."""
    import folder_paths

    return resolve_input_folder(input_name, text, allowed_roots(),
                                [Path(folder_paths.get_input_directory()), PACK_ROOT])
