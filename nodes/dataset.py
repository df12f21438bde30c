"""Dataset nodes: a folder of images with captions, or an IMAGE batch with typed captions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from comfy_api.latest import io

from ..trainers.config import ConfigError, DataConfig, option_help
from ..trainers.data.folder import (
    DatasetError,
    quick_fingerprint,
    quick_problem,
    scan_folder,
)
from . import paths
from .paths import PathRefused
from .reports import dataset_report, ui_report
from .types import Dataset
from .validation import InputRefused, refuse

NO_SUBFOLDER = "(none: use the folder path)"
HOW_FOLDER = ("The name of a folder inside ComfyUI's input folder (e.g. 'my_dataset' or "
              "'people/alice'), or an absolute path inside a folder the server's owner allows "
              "(TSUIKA_ALLOWED_DIRS). When set, it is used instead of input_folder.")


def input_subfolders() -> list[str]:
    """The choices of the dataset node's list: "none", then every folder inside ComfyUI's
    input folder (two levels, so ``people/alice`` is listed too; hidden folders skipped).
    Computed each time ComfyUI asks for the node's inputs, so new folders appear on refresh."""
    import folder_paths

    root = Path(folder_paths.get_input_directory())
    found = []
    if root.is_dir():
        for first in sorted(root.iterdir()):
            if first.is_dir() and not first.name.startswith("."):
                found.append(first.name)
                found += [f"{first.name}/{d.name}" for d in sorted(first.iterdir())
                          if d.is_dir() and not d.name.startswith(".")]
    return [NO_SUBFOLDER, *found]


def chosen_folder(folder: str | None, input_folder: str | None) -> tuple[str, str]:
    """(input name, text) the node works on: the typed path wins; else the picked sub-folder.

    Raises:
        PathRefused: neither is given, or ``input_folder`` is not one of its own choices
            (ComfyUI does not check a list a node validates itself).
    """
    if folder and folder.strip():
        return "folder", folder
    if input_folder and input_folder != NO_SUBFOLDER:
        if input_folder not in input_subfolders():
            raise PathRefused(f"input_folder {input_folder!r} is not one of the sub-folders "
                              "of ComfyUI's input folder; refresh the page and pick one from "
                              "the list.")
        return "input_folder", input_folder
    raise PathRefused("no folder given: type a folder name in 'folder', or pick a sub-folder "
                      "of ComfyUI's input folder in 'input_folder'")


def dataset_root(folder: str | None, input_folder: str | None) -> tuple[Path, str]:
    """(resolved folder, the text the user gave), confined to this server's allowed folders."""
    name, text = chosen_folder(folder, input_folder)
    return paths.dataset_folder(name, text), text.strip()


def check_caption_extension(caption_extension: str) -> None:
    try:
        DataConfig(caption_extension=caption_extension)
    except ConfigError as e:
        raise InputRefused(str(e).replace("data.caption_extension", "caption_extension")) from e


def unreadable_dataset(root: Path) -> str | None:
    """Why no image of ``root`` can be used, found by decoding images only until the first
    good one (cheap enough for ``/prompt``); None when one is readable or none is there."""
    from ..trainers.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image_rgb

    folders = [root] + sorted(d for d in root.iterdir() if d.is_dir()
                              and not d.name.startswith("."))
    reasons = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                load_image_rgb(path).close()
                return None
            except ImageLoadError as e:
                reasons.append(f"{path.relative_to(root).as_posix()}: {e.reason}")
            except OSError as e:
                reasons.append(f"{path.relative_to(root).as_posix()}: cannot read file "
                               f"({e.strerror or e})")
    if not reasons:
        return None
    more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
    return (f"no image in the dataset folder can be read: {'; '.join(reasons[:3])}{more}. "
            "Replace or re-export these files.")


class TsuikaLoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaLoadDataset", display_name="Load Training Dataset (Tsuika)",
            category="Tsuika/dataset",
            description="A folder of images with same-name .txt captions; kohya 'N_name' "
                        "sub-folders repeat their images N times. Reports what was used and "
                        "what was skipped and why.",
            inputs=[
                io.String.Input("folder", default="", tooltip=HOW_FOLDER),
                io.Combo.Input("input_folder", options=input_subfolders(), default=NO_SUBFOLDER,
                               optional=True, tooltip="A sub-folder of ComfyUI's input folder, "
                               "used when 'folder' is empty (refresh the page to list new "
                               "folders)."),
                io.String.Input("caption_extension", default=".txt",
                                tooltip=option_help("data.caption_extension")),
            ],
            outputs=[Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, folder, caption_extension, input_folder=None):
        if folder is None:  # linked from another node: checked when it runs
            return True
        if caption_extension is not None:
            check_caption_extension(caption_extension)
        try:
            root, _ = dataset_root(folder, input_folder)
        except PathRefused as e:
            refuse(str(e))
        problem = quick_problem(root) or unreadable_dataset(root)
        if problem:
            refuse(problem.replace(str(root), (folder or input_folder or "").strip()))
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, caption_extension, input_folder=None):
        try:
            root, _ = dataset_root(folder, input_folder)
        except PathRefused:
            return float("nan")
        return quick_fingerprint(root) + str(caption_extension)

    @classmethod
    def execute(cls, folder, caption_extension, input_folder=None) -> io.NodeOutput:
        check_caption_extension(caption_extension)
        root, shown = dataset_root(folder, input_folder)
        try:
            scan = scan_folder(root, caption_extension=caption_extension)
        except DatasetError as e:
            raise ValueError(f"folder: {str(e).replace(str(root), shown)}") from e
        outside = paths.files_outside([i.path for i in scan.items], paths.allowed_roots())
        if outside:  # a link inside the folder pointing elsewhere on the server
            raise ValueError(f"folder {shown!r}: {len(outside)} file(s) link outside the "
                             f"allowed folders (e.g. {outside[0].name!r}); copy the images in "
                             "instead of linking them.")
        text, level = dataset_report(scan, shown)
        return io.NodeOutput(scan, text, ui=ui_report(text, level))


class TsuikaDatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaDatasetFromImages", display_name="Dataset From Images (Tsuika)",
            category="Tsuika/dataset",
            description="Build a training dataset from an IMAGE batch (e.g. generated images) "
                        "and captions typed here.",
            inputs=[
                io.Image.Input("images", tooltip="The images to train on."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption per line, in image order; a single line "
                                        "is used for every image."),
            ],
            outputs=[Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, images, captions) -> io.NodeOutput:
        import numpy as np
        from PIL import Image

        import folder_paths

        lines = [c.strip() for c in captions.splitlines() if c.strip()]
        n = images.shape[0]
        if len(lines) not in (0, 1, n):
            raise ValueError(f"captions: {len(lines)} lines for {n} images; give one line per "
                             "image, or a single line for all of them.")
        arrays = [(images[i].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
                  for i in range(n)]
        h = hashlib.sha256()
        for a in arrays:
            h.update(a.tobytes())
        h.update("\n".join(lines).encode())
        # Content-addressed, so the same images and captions reuse the same folder and cache.
        root = Path(folder_paths.get_temp_directory()) / "tsuika_datasets" / h.hexdigest()[:16]
        if not root.is_dir():
            tmp = root.with_name(root.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            for i, a in enumerate(arrays):
                Image.fromarray(a).save(tmp / f"{i:05d}.png")
                text = lines[i] if len(lines) == n else (lines[0] if lines else "")
                (tmp / f"{i:05d}.txt").write_text(text, encoding="utf-8")
            os.replace(tmp, root)
        scan = scan_folder(root)
        text, level = dataset_report(scan, f"{n} generated image{'s' if n != 1 else ''}")
        return io.NodeOutput(scan, text, ui=ui_report(text, level))


__all__ = ["TsuikaLoadDataset", "TsuikaDatasetFromImages"]
