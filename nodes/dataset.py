"""Dataset nodes: a folder of images with captions, or an IMAGE batch with typed captions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from comfy_api.latest import io

from ..trainers.data.folder import DatasetError, quick_fingerprint, quick_problem, scan_folder
from .types import Dataset


PACK_ROOT = Path(__file__).resolve().parents[1]


NO_SUBFOLDER = "(none: use the folder path)"


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


def chosen_folder(folder: str | None, input_folder: str | None) -> str:
    """The folder text the node works on: the typed path wins; else the picked sub-folder."""
    if folder and folder.strip():
        return folder
    if input_folder and input_folder != NO_SUBFOLDER:
        return input_folder
    return ""


def resolve_folder(folder: str) -> Path:
    """An absolute path as given; else a sub-folder of ComfyUI's input directory; else a
    folder inside the pack (so the shipped ``examples/sample_data/heart`` works as is)."""
    import folder_paths

    p = Path(folder.strip()).expanduser()
    if p.is_absolute():
        return p
    in_input = Path(folder_paths.get_input_directory()) / p
    return in_input if in_input.is_dir() or not (PACK_ROOT / p).is_dir() else PACK_ROOT / p


def folder_problem(folder: str) -> str | None:
    if not folder or not folder.strip():
        return ("no folder given: type a path in 'folder', or pick a sub-folder of ComfyUI's "
                "input folder in 'input_folder'")
    p = resolve_folder(folder)
    if not p.is_dir():
        return (f"folder {folder!r} does not exist (looked at {p}); give an existing folder "
                "of images, or a sub-folder name of ComfyUI's input folder")
    return None


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
                io.String.Input("folder", default="", tooltip="Absolute path, or the name of "
                                "a sub-folder of ComfyUI's input folder. When set, it is used "
                                "instead of input_folder."),
                io.Combo.Input("input_folder", options=input_subfolders(), default=NO_SUBFOLDER,
                               optional=True, tooltip="A sub-folder of ComfyUI's input folder, "
                               "used when 'folder' is empty (refresh the page to list new "
                               "folders)."),
                io.String.Input("caption_extension", default=".txt",
                                tooltip="Extension of the caption files next to the images."),
            ],
            outputs=[Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, folder, caption_extension, input_folder=None):
        if folder is None:  # linked from another node: checked when it runs
            return True
        folder = chosen_folder(folder, input_folder)
        problem = folder_problem(folder) or quick_problem(resolve_folder(folder))
        if problem:
            return problem
        if caption_extension and not caption_extension.startswith("."):
            return f"caption_extension {caption_extension!r} must start with a dot, e.g. '.txt'"
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, caption_extension, input_folder=None):
        folder = chosen_folder(folder, input_folder)
        if folder_problem(folder):
            return float("nan")
        return quick_fingerprint(resolve_folder(folder)) + caption_extension

    @classmethod
    def execute(cls, folder, caption_extension, input_folder=None) -> io.NodeOutput:
        folder = chosen_folder(folder, input_folder)
        problem = folder_problem(folder)
        if problem:
            raise ValueError(problem)
        try:
            scan = scan_folder(resolve_folder(folder), caption_extension=caption_extension)
        except DatasetError as e:
            raise ValueError(f"folder: {e}") from e
        report = scan.summary()
        return io.NodeOutput(scan, report, ui={"tsuika_report": [report]})


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
        import folder_paths
        import numpy as np
        from PIL import Image

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
        report = scan.summary()
        return io.NodeOutput(scan, report, ui={"tsuika_report": [report]})


__all__ = ["TsuikaLoadDataset", "TsuikaDatasetFromImages"]
