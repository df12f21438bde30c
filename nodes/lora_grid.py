"""Checkpoint x strength grid node: the steps a run saved (and/or LoRA files) against a list
of strengths, one labelled IMAGE for one prompt and seed, sampled with ComfyUI's own sampler.
Row discovery, the change measure and the grid drawing are host-free
(``trainers/tools/lora_grid.py``); this module only samples the cells.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from .reports import ui_report
from .validation import check_number, check_plain_name, plain_name_problem, refuse


def _runs_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "tsuika"


def _rows(lora, run_name: str, lora_names: list[str]):
    """The grid's rows: the run the ``lora`` input came from (or ``run_name``'s newest run),
    then the LoRA files picked from models/loras."""
    import folder_paths

    from ..trainers.tools.lora_grid import GridRow, find_run, run_rows

    rows = []
    meta = dict(getattr(lora, "metadata", None) or {}) if lora is not None else {}
    name = run_name or meta.get("ss_output_name", "")
    if name and plain_name_problem(name) is None:
        run = find_run(_runs_root(), name, meta.get("ss_training_started_at") if lora is not
                       None and not run_name else None)
        if run is not None:
            rows += run_rows(run, name)
        elif run_name:
            refuse(f"run_name: no saved run named {run_name!r} under ComfyUI's output/tsuika; "
                   "give the 'name' a train node trained with, or leave run_name empty.")
    if lora is not None and not rows:  # a LoRA with no run folder (e.g. from Extract LoRA)
        rows.append(GridRow("lora input", Path(), None))
    for n in lora_names:
        rows.append(GridRow(Path(n).stem, Path(folder_paths.get_full_path_or_raise("loras", n))))
    if not rows:
        refuse("lora / run_name / lora_names: nothing to grid; connect a train node's 'lora', "
               "name a run in run_name, or list LoRA files in lora_names.")
    return rows


def _sample(model, clip, vae, prompt, negative, seed, steps, cfg, sampler, scheduler, width,
            height):
    """One image (H, W, 3) through ComfyUI's own encode, KSampler and decode."""
    import torch

    import nodes as comfy_nodes

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    latent = {"samples": torch.zeros([1, 4, height // 8, width // 8])}
    out = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler,
                                      encode(prompt), encode(negative), latent)[0]
    images = vae.decode(out["samples"])
    return images.reshape(-1, *images.shape[-3:])[0].float().cpu()


class TsuikaLoRAGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="TsuikaLoRAGrid", display_name="Checkpoint x Strength Grid (Tsuika)",
            category="Tsuika/lora",
            description="One labelled image grid: rows are the steps a training run saved "
                        "(and/or LoRA files), columns are strengths, every cell the same "
                        "prompt and seed. Cells where the image stops changing with more "
                        "steps (s) or strength (w) are framed and listed.",
            inputs=[
                io.Model.Input("model", tooltip="The base model, without the LoRA applied."),
                io.Clip.Input("clip", tooltip="The base model's CLIP."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the cells."),
                io.String.Input("strengths", default="0.5, 1.0",
                                tooltip="The columns (drawn lowest first): LoRA strengths "
                                        "of model and CLIP, separated by commas."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The prompt of every cell (put the trigger word in)."),
                io.String.Input("negative", default="", tooltip="The negative prompt."),
                io.Int.Input("sample_seed", default=0, min=0, max=2**32 - 1,
                             tooltip="The noise seed of every cell (one seed: the cells "
                                     "differ only by step and strength)."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               default="euler", tooltip="ComfyUI's sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               default="normal", tooltip="ComfyUI's scheduler."),
                io.Int.Input("width", default=512, min=64, max=2048, step=8,
                             tooltip="Cell width in pixels."),
                io.Int.Input("height", default=512, min=64, max=2048, step=8,
                             tooltip="Cell height in pixels."),
                io.Float.Input("change_threshold", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="Flag a cell whose mean absolute pixel change (0..1) "
                                       "to the previous saved step (s) or the next lower "
                                       "strength (w) is below this; 0 = never flag."),
                io.String.Input("run_name", default="",
                                tooltip="A training run's name (the train node's 'name'): "
                                        "its newest run's saved steps become rows. Empty: "
                                        "the run the 'lora' input came from."),
                io.String.Input("lora_names", default="", multiline=True,
                                tooltip="More rows: LoRA files in models/loras, one per line."),
                io.LoraModel.Input("lora", optional=True,
                                   tooltip="A train node's 'lora': every step its run saved "
                                           "(output.save_every) and the final file become "
                                           "rows."),
            ],
            outputs=[io.Image.Output(display_name="grid"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, strengths=None, run_name=None, lora_names=None,
                        change_threshold=None, **_):
        import folder_paths

        from ..trainers.tools.lora_grid import GridError, parse_names, parse_strengths

        try:
            if strengths is not None:
                parse_strengths(strengths)
        except GridError as e:
            refuse(str(e))
        if run_name:
            check_plain_name("run_name", run_name)
        if lora_names is not None:
            known = set(folder_paths.get_filename_list("loras"))
            for n in parse_names(lora_names):
                if n not in known:
                    refuse(f"lora_names: {n!r} is not a file in models/loras; give names as "
                           "Load LoRA lists them, one per line.")
        check_number("change_threshold", change_threshold, 0.0, 1.0)
        return True

    @classmethod
    def execute(cls, model, clip, vae, strengths, prompt, negative, sample_seed, steps, cfg,
                sampler_name, scheduler, width, height, change_threshold, run_name,
                lora_names, lora=None) -> io.NodeOutput:
        import comfy.utils

        from ..trainers.tools import lora_grid as grid
        from . import _host

        values = grid.parse_strengths(strengths)
        names = grid.parse_names(lora_names)
        rows = _rows(lora, run_name.strip(), names)
        if len(rows) > grid.MAX_ROWS:
            refuse(f"{len(rows)} rows; at most {grid.MAX_ROWS}: list fewer lora_names or save "
                   "less often (output.save_every).")
        bar = comfy.utils.ProgressBar(len(rows) * len(values))
        cells = []
        for row in rows:
            tensors = dict(lora) if not row.path.name else \
                comfy.utils.load_torch_file(str(row.path), safe_load=True)
            line = []
            for s in values:
                m, c = _host.apply_lora(model, clip, tensors, s, s) if s else (model, clip)
                line.append(_sample(m, c, vae, prompt, negative, sample_seed, steps, cfg,
                                    sampler_name, scheduler, width, height))
                bar.update(1)
            cells.append(line)
            del tensors
        ch = grid.changes(cells, rows, change_threshold)
        flags = ch.flags(values)
        image = grid.assemble(cells, [r.label for r in rows], [f"{s:g}" for s in values],
                              flags, title=f"seed {sample_seed}: {prompt[:60]}")
        text = grid.report(rows, values, ch)
        return io.NodeOutput(image, text, ui=ui_report(text))
