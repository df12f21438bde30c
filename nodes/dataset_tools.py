"""Dataset tools: the pre-flight check, and caption edits (in memory, or written to files)."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..trainers.captioning.tools import (
    MERGES,
    TagEdit,
    edit_caption_folder,
    frequency_table,
    parse_replacements,
    parse_tag_list,
    tag_frequency,
)
from ..trainers.config import ConfigError, DataConfig, option_help
from ..trainers.data.folder import scan_folder
from .reports import ui_report
from .types import Dataset
from .validation import InputRefused, refuse

FREQ_SHOWN = 25


def _edit_inputs() -> list:
    return [
        io.String.Input("prefix", default="", tooltip="Tag(s) put first in every caption, e.g. "
                        "your trigger word (moved to the front if a caption has it already)."),
        io.String.Input("suffix", default="", tooltip="Tag(s) put last in every caption."),
        io.String.Input("remove", default="", multiline=True, tooltip="Tags to remove, "
                        "comma- or line-separated (case-insensitive)."),
        io.String.Input("replace", default="", multiline=True, tooltip="old=new pairs, comma- "
                        "or line-separated, e.g. '1girl=woman'; 'old=' removes the tag."),
        io.Boolean.Input("dedupe", default=False, tooltip="Drop repeated tags."),
        io.Boolean.Input("sort", default=False, tooltip="Sort tags alphabetically (prefix and "
                         "suffix stay in place)."),
    ]


def _edit(prefix, suffix, remove, replace, dedupe, sort) -> TagEdit:
    try:
        return TagEdit(prefix=prefix, suffix=suffix, remove=parse_tag_list(remove),
                       replace=parse_replacements(replace), dedupe=dedupe, sort=sort)
    except ValueError as e:
        raise InputRefused(str(e)) from None


def _check_replace(replace) -> None:
    if isinstance(replace, str):
        try:
            parse_replacements(replace)
        except ValueError as e:
            refuse(str(e))


class TsuikaCheckDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaCheckDataset", display_name="Check Dataset (Tsuika)",
            category="Tsuika/dataset", is_output_node=True,
            description="Pre-flight check before training: missing, empty or orphan captions, "
                        "trigger-word coverage, captions longer than the text encoder reads, "
                        "near-duplicate images, images smaller than the resolution, the "
                        "bucket histogram. Passes the dataset through unchanged.",
            inputs=[
                Dataset.Input("dataset", tooltip="From Load Training Dataset or Dataset From "
                              "Images."),
                io.Int.Input("resolution", default=512, min=32, max=4096, step=32,
                             tooltip=option_help("data.resolution")),
                io.String.Input("trigger_word", default="", tooltip="The word every caption "
                                "should hold; leave empty to skip that check (set it on the "
                                "train node to have training put it first instead)."),
                io.Int.Input("batch_size", default=1, min=1, max=1024,
                             tooltip=option_help("train.batch_size")),
            ],
            outputs=[Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, dataset, resolution, trigger_word, batch_size) -> io.NodeOutput:
        from ..trainers.preflight import check_dataset, default_tokenizers

        try:
            data = DataConfig(resolution=resolution)
        except ConfigError as e:
            raise ValueError(str(e).replace("data.resolution", "resolution")) from None
        report = check_dataset(dataset, data, default_tokenizers(),
                               trigger_word=trigger_word or None, batch_size=batch_size)
        text = report.to_text(shown_as=dataset.root.name)
        return io.NodeOutput(dataset, text,
                             ui=ui_report(text, "warning" if report.findings else "info"))


class TsuikaEditCaptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaEditCaptions", display_name="Edit Captions (Tsuika)",
            category="Tsuika/dataset", is_output_node=True,
            description="Edit every caption of a dataset (trigger word, remove/replace tags, "
                        "dedupe, sort) and show the tag-frequency table. The edited captions "
                        "go to the output dataset; the caption files change only with "
                        "'write_files' on.",
            inputs=[Dataset.Input("dataset", tooltip="From Load Training Dataset."),
                    *_edit_inputs(),
                    io.Boolean.Input("write_files", default=False, tooltip="Also rewrite the "
                                     "caption files next to the images (each atomically). Off: "
                                     "the files stay as they are.")],
            outputs=[Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, replace=None, **_):
        _check_replace(replace)
        return True

    @classmethod
    def execute(cls, dataset, prefix, suffix, remove, replace, dedupe, sort,
                write_files) -> io.NodeOutput:
        edit = _edit(prefix, suffix, remove, replace, dedupe, sort)
        result = edit_caption_folder(dataset, edit, write=write_files)
        if write_files:  # read back what is now on disk (and its new fingerprint)
            out = scan_folder(dataset.root, caption_extension=_extension(dataset))
        else:
            out = dataclasses.replace(dataset, items=[
                dataclasses.replace(it, caption=edit.apply(it.caption)) for it in dataset.items])
        n = len(result.changes)
        verb = "rewrote" if write_files else "edited (files unchanged)"
        lines = [f"{verb} {n} caption{'s' if n != 1 else ''}; {result.unchanged} unchanged"]
        if result.without_file:
            lines.append(f"warning: {len(result.without_file)} images have no caption file")
        lines.append("tag frequency (captions holding the tag):")
        lines.append(frequency_table(tag_frequency(it.caption for it in out.items),
                                     len(out.items), FREQ_SHOWN))
        text = "\n".join(lines)
        return io.NodeOutput(out, text, ui=ui_report(text))


def _extension(dataset) -> str:
    files = [it.caption_file for it in dataset.items if it.caption_file is not None]
    return files[0].suffix if files else ".txt"


class TsuikaEditCaptionText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaEditCaptionText", display_name="Edit Caption Text (Tsuika)",
            category="Tsuika/dataset",
            description="The caption edits on text (one caption per line), e.g. between a "
                        "captioner and Dataset From Images: no files involved.",
            inputs=[io.String.Input("captions", multiline=True, default="",
                                    tooltip="One caption per line."),
                    *_edit_inputs()],
            outputs=[io.String.Output(display_name="captions"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, replace=None, **_):
        _check_replace(replace)
        return True

    @classmethod
    def execute(cls, captions, prefix, suffix, remove, replace, dedupe, sort) -> io.NodeOutput:
        edit = _edit(prefix, suffix, remove, replace, dedupe, sort)
        lines = [edit.apply(line) for line in captions.splitlines() if line.strip()]
        out = "\n".join(lines)
        text = (f"{len(lines)} caption{'s' if len(lines) != 1 else ''}\n"
                + frequency_table(tag_frequency(lines), len(lines), FREQ_SHOWN))
        return io.NodeOutput(out, text, ui=ui_report(text))




NO_CAPTIONER = "(none found: put a model folder in models/captioners)"


def captioner_folders() -> dict[str, str]:
    """``{name: folder}`` of the model folders in ComfyUI's ``models/captioners`` (the folder
    is registered with folder_paths here, once, so extra_model_paths.yaml can add more)."""
    import os

    import folder_paths

    default = os.path.join(folder_paths.models_dir, "captioners")
    if ("captioners" not in folder_paths.folder_names_and_paths
            or default not in folder_paths.get_folder_paths("captioners")):
        folder_paths.add_model_folder_path("captioners", default)  # beside extra paths
    found: dict[str, str] = {}
    for base in folder_paths.get_folder_paths("captioners"):
        if os.path.isdir(base):
            for name in sorted(os.listdir(base)):
                if not name.startswith(".") and os.path.isdir(os.path.join(base, name)):
                    found.setdefault(name, os.path.join(base, name))
    return found


def _writable(root) -> bool:
    """Caption files may be written into ComfyUI's input and temp folders only (a dataset
    from the pack's own examples is read-only)."""
    from pathlib import Path

    import folder_paths

    from .paths import inside

    return inside(Path(root), [Path(folder_paths.get_input_directory()),
                               Path(folder_paths.get_temp_directory())])


def _check_tagger(name: str, folder: str) -> None:
    """A tagger folder's missing file or a missing onnxruntime, refused before the queue
    runs (a transformers folder is checked when it loads: its files vary by model)."""
    import importlib.util
    from pathlib import Path

    from ..trainers.captioning.tagger import TAGGER_FILES, is_tagger_folder

    if not is_tagger_folder(folder):
        return
    missing = [f for f in TAGGER_FILES if not (Path(folder) / f).is_file()]
    if missing:
        refuse(f"captioner {name!r} is a tagger folder without {', '.join(missing)}; copy "
               "the tag list that came with its model.onnx into it.")
    if importlib.util.find_spec("onnxruntime") is None:
        refuse(f"captioner {name!r} is a WD14-style tagger, which needs onnxruntime: install "
               "it into ComfyUI's Python (pip install onnxruntime) and restart ComfyUI.")


class TsuikaCaptionDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaCaptionDataset", display_name="Caption Dataset (Tsuika)",
            category="Tsuika/dataset", is_output_node=True,
            description="Write a caption file for every image of the dataset that has none, "
                        "with a captioning model from models/captioners (BLIP, GIT or an "
                        "image-text-to-text model, or a WD14-style tagger: a folder with "
                        "model.onnx and selected_tags.csv, run by onnxruntime). Existing "
                        "captions are kept unless 'overwrite'; a cancel keeps the captions "
                        "written so far.",
            inputs=[
                Dataset.Input("dataset", tooltip="From Load Training Dataset (a folder inside "
                              "ComfyUI's input folder)."),
                io.Combo.Input("captioner", options=list(captioner_folders()) or [NO_CAPTIONER],
                               tooltip="A model folder in models/captioners (what "
                               "save_pretrained writes; nothing is downloaded)."),
                io.String.Input("prompt", default="", tooltip="BLIP/GIT: the words every "
                                "caption starts with (e.g. 'a photo of'); vision-language "
                                "models: the question (empty = 'Describe this image in one "
                                "sentence.')."),
                io.String.Input("prefix", default="", tooltip="Tag(s) put first in every new "
                                "caption, e.g. your trigger word."),
                io.Boolean.Input("overwrite", default=False, tooltip="Also caption images that "
                                 "have a caption file, replacing it."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images per model call."),
                io.Int.Input("max_new_tokens", default=40, min=1, max=512,
                             tooltip="Longest caption, in tokens."),
                # Optional, so graphs saved before these inputs existed still queue.
                io.Combo.Input("merge", options=list(MERGES), default="replace", optional=True,
                               tooltip="With 'overwrite', what happens to a caption file's "
                               "text: replace it, or put the new tags before it (prefix) or "
                               "after it (append), each tag once."),
                io.Float.Input("threshold", default=0.35, min=0.0, max=1.0, step=0.01,
                               optional=True, tooltip="Tagger only: lowest probability of a "
                               "general tag written."),
                io.Float.Input("character_threshold", default=0.85, min=0.0, max=1.0,
                               step=0.01, optional=True, tooltip="Tagger only: lowest "
                               "probability of a character tag written."),
                io.String.Input("exclude", default="", multiline=True, optional=True,
                                tooltip="Tagger only: tags never written, comma- or line-"
                                "separated (either spelling: long_hair or long hair)."),
                io.Int.Input("max_tags", default=0, min=0, max=1000, optional=True,
                             tooltip="Tagger only: most tags per caption, the most "
                             "confident (character tags first); 0 = no limit."),
                io.Boolean.Input("keep_underscores", default=False, optional=True,
                                 tooltip="Tagger only: write tags as the tag list spells "
                                 "them (off: long_hair -> long hair; kaomoji like ^_^ keep "
                                 "theirs)."),
            ],
            outputs=[Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, captioner=None, **_):
        if isinstance(captioner, str) and captioner not in captioner_folders():
            refuse(f"captioner {captioner!r} is not a folder in models/captioners; copy a "
                   "captioning model folder there and refresh the page.")
        if isinstance(captioner, str):
            _check_tagger(captioner, captioner_folders()[captioner])
        return True

    @classmethod
    def execute(cls, dataset, captioner, prompt, prefix, overwrite, batch_size,
                max_new_tokens, merge="replace", threshold=0.35, character_threshold=0.85,
                exclude="", max_tags=0, keep_underscores=False) -> io.NodeOutput:
        from ..trainers.captioning.captioners import caption_folder, load_captioner
        from . import _host

        folders = captioner_folders()
        if captioner not in folders:
            raise ValueError(f"captioner {captioner!r} is not a folder in models/captioners.")
        if not _writable(dataset.root):
            raise ValueError("dataset: captions can be written only into a folder inside "
                             "ComfyUI's input folder; copy the images there.")
        tagger = {"threshold": threshold, "character_threshold": character_threshold,
                  "exclude": parse_tag_list(exclude or ""), "max_tags": max_tags,
                  "keep_underscores": keep_underscores}
        model = load_captioner(folders[captioner], prompt=prompt or None,
                               max_new_tokens=max_new_tokens, tagger=tagger)
        todo = sum(1 for it in dataset.items if overwrite or it.caption_file is None)
        progress = _host.ComfyProgress(cls.hidden.unique_id, max(1, todo))
        result = caption_folder(dataset, model, overwrite=overwrite, batch_size=batch_size,
                                extension=_extension(dataset), prefix=prefix, merge=merge,
                                on_progress=lambda done, _total: progress._update(done),
                                should_stop=progress.should_stop)
        del model
        lines = [f"captioned {len(result.written)} images with {captioner}; "
                 f"{len(result.kept)} kept their caption files"]
        lines += [f"warning: the model gave no caption for {p.name}" for p in result.empty]
        if result.stopped:
            lines.append(f"cancelled: the {len(result.written)} captions written are kept; "
                         "queue again to caption the rest")
            _host.emit("tsuika.stopped", {"node": cls.hidden.unique_id, "text": "\n".join(lines)})
            _host.interrupted()
        out = scan_folder(dataset.root, caption_extension=_extension(dataset))
        text = "\n".join(lines)
        return io.NodeOutput(out, text, ui=ui_report(text, "warning" if result.empty else "info"))


__all__ = ["TsuikaCaptionDataset", "TsuikaCheckDataset", "TsuikaEditCaptions",
           "TsuikaEditCaptionText"]
