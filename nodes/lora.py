"""Apply a LORA_MODEL to MODEL + CLIP, and save it into models/loras."""

from __future__ import annotations

import json

from comfy_api.latest import io

from . import _host


class TsuikaApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaApplyLoRA", display_name="Apply LoRA (Tsuika)",
            category="Tsuika/lora",
            description="Patch a LORA_MODEL (e.g. just trained) into a MODEL and its CLIP.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned)."),
                io.Clip.Input("clip", tooltip="The CLIP to patch (it is cloned)."),
                io.LoraModel.Input("lora", tooltip="A LORA_MODEL, e.g. from Train LoRA."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA changes the UNet."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA changes the text encoder."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip")],
        )

    @classmethod
    def execute(cls, model, clip, lora, strength_model, strength_clip) -> io.NodeOutput:
        model_out, clip_out = _host.apply_lora(model, clip, lora, strength_model, strength_clip)
        return io.NodeOutput(model_out, clip_out)


class TsuikaSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaSaveLoRA", display_name="Save LoRA (Tsuika)",
            category="Tsuika/lora",
            description="Save a LORA_MODEL into models/loras (kohya names and training "
                        "metadata, plus this workflow), so Load LoRA lists it at once.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA to save."),
                io.String.Input("filename", default="tsuika_lora",
                                tooltip="File name without extension; unsafe characters are "
                                        "replaced and folders are not allowed."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of the same name."),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename, overwrite):
        if filename is None:
            return True
        if not _host.safe_name(filename):
            return f"filename {filename!r} is empty after removing unsafe characters"
        if not overwrite:
            try:
                target = _host.loras_dir() / f"{_host.safe_name(filename)}.safetensors"
            except Exception:  # folder_paths unavailable: checked again when it runs
                return True
            if target.exists():
                return (f"filename: {target.name} already exists in {target.parent}; choose "
                        "another filename or turn on overwrite")
        return True

    @classmethod
    def execute(cls, lora, filename, overwrite) -> io.NodeOutput:
        from ..trainers.formats.safetensors_io import save_safetensors

        folder = _host.loras_dir()
        target = folder / f"{_host.safe_name(filename)}.safetensors"
        if target.resolve().parent != folder.resolve():
            raise ValueError(f"filename {filename!r} would write outside {folder}.")
        metadata = dict(getattr(lora, "metadata", {}) or {})
        workflow = (cls.hidden.extra_pnginfo or {}).get("workflow")
        if workflow is not None:
            metadata["tsuika.workflow"] = json.dumps(workflow)
        try:
            save_safetensors(target, {k: v.detach().clone() for k, v in lora.items()},
                             metadata, overwrite=overwrite)
        except FileExistsError as e:
            raise ValueError(f"filename: {target.name} already exists in {folder}; choose "
                             "another filename or turn on overwrite.") from e
        report = f"saved {target.name}\nin {folder}"
        return io.NodeOutput(str(target), ui={"tsuika_report": [report]})
