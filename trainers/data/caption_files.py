"""Finding and reading an image's caption file (the rules are in ``folder``'s module docstring):
case-insensitive extension match, UTF-8 with or without BOM or UTF-16 with BOM, lines joined
into one caption."""

from __future__ import annotations

from pathlib import Path


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
