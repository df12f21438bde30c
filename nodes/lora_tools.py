"""Model and LoRA tools in the graph: extract a LoRA from two models, resize a LoRA, bake a
LoRA into a checkpoint file. Thin callers of ``trainers/tools``; the math is in
``trainers/ops``."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainers.ops.extract import RANK_MODES
from . import _host
from .reports import ui_report
from .validation import check_choice, check_number, check_plain_name, refuse

LAYERS_SHOWN = 8


def _rule_inputs(default_rank: int) -> list:
    return [
        io.Int.Input("rank", default=default_rank, min=1, max=1024,
                     tooltip="The rank of every layer with rank_mode 'fixed'; the largest rank "
                             "of the dynamic modes."),
        io.Combo.Input("rank_mode", options=list(RANK_MODES), default="fixed",
                       tooltip="fixed: 'rank' singular values per layer. energy: the fewest "
                               "keeping rank_value of their sum. frobenius: the fewest keeping "
                               "rank_value of the Frobenius norm. sv_ratio: every value at "
                               "least s_max / rank_value."),
        io.Float.Input("rank_value", default=0.9, min=0.0, max=1000.0, step=0.01,
                       tooltip="The dynamic mode's target: a fraction in (0, 1] for energy / "
                               "frobenius (e.g. 0.9), a ratio >= 1 for sv_ratio (e.g. 10). "
                               "Unused by 'fixed'."),
        io.Float.Input("clamp_quantile", default=1.0, min=0.5, max=1.0, step=0.001,
                       tooltip="Clamp the factors to this quantile of their absolute values "
                               "(kohya uses 0.99); 1 = off, the exact truncated SVD."),
    ]


def _check_rule(rank_mode, rank_value) -> None:
    check_choice("rank_mode", rank_mode, RANK_MODES)
    if rank_mode in ("energy", "frobenius") and rank_value is not None \
            and not 0.0 < rank_value <= 1.0:
        refuse(f"rank_value = {rank_value}: rank_mode {rank_mode!r} keeps a fraction; set "
               "rank_value in (0, 1], e.g. 0.9.")
    if rank_mode == "sv_ratio" and rank_value is not None and rank_value < 1.0:
        refuse(f"rank_value = {rank_value}: rank_mode 'sv_ratio' keeps values down to s_max / "
               "rank_value; set rank_value >= 1, e.g. 10.")


def _rule(rank, rank_mode, rank_value):
    from ..trainers.ops.extract import RankRule

    return RankRule(rank_mode, int(rank), float(rank_value) if rank_mode != "fixed" else 0.0)


def _report(headline: str, reports) -> dict:
    from ..trainers.tools.lora_files import report_lines

    lines = report_lines(reports, LAYERS_SHOWN)
    more = len(reports) - len(lines)
    tail = [f"... and {more} more layers"] if more > 0 else []
    return ui_report("\n".join([headline, "largest errors:", *lines, *tail]))


def _tensors_and_metadata(lora) -> tuple[dict, dict]:
    """A LORA_MODEL's tensors and metadata (ComfyUI's own LORA_MODEL has none)."""
    return dict(lora), dict(getattr(lora, "metadata", None) or {})


def _file_input(name: str, kind: str, tooltip: str):
    """A combo of the files ComfyUI lists in its ``kind`` models folders."""
    import folder_paths

    return io.Combo.Input(name, options=folder_paths.get_filename_list(kind), tooltip=tooltip)


def _full_path(kind: str, name: str) -> str:
    """The file ``name`` of ComfyUI's ``kind`` folders (ComfyUI refuses other names)."""
    import folder_paths

    return folder_paths.get_full_path_or_raise(kind, name)


def _checkpoint_file_inputs(default: str, what: str) -> list:
    """The inputs of a node that writes a checkpoint into models/checkpoints."""
    return [
        io.String.Input("filename", default=default,
                        tooltip="A plain file name without extension for models/checkpoints."),
        io.Combo.Input("save_dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                       tooltip=f"Precision of {what}."),
        io.Boolean.Input("overwrite", default=False,
                         tooltip="Replace an existing file of the same name."),
    ]


def _checkpoint_target(filename: str):
    """models/checkpoints/<filename>.safetensors, after refusing a name that is not plain."""
    check_plain_name("filename", filename)
    return _host.checkpoints_dir() / f"{filename}.safetensors"


class _RankedNode(io.ComfyNode):
    """A node with the rank-rule inputs (``_rule_inputs``): validates them."""

    @classmethod
    def validate_inputs(cls, rank_mode=None, rank_value=None, clamp_quantile=None, **_):
        _check_rule(rank_mode, rank_value)
        check_number("clamp_quantile", clamp_quantile, 0.5, 1.0)
        return True


class TsuikaExtractLoRA(_RankedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaExtractLoRA", display_name="Extract LoRA (Tsuika)",
            category="Tsuika/lora",
            description="A LoRA that turns the base model into the tuned one: the SVD of each "
                        "layer's difference, cut to a fixed or per-layer rank. Reports each "
                        "layer's rank and relative error.",
            inputs=[
                io.Model.Input("model", tooltip="The tuned (fine-tuned) model."),
                io.Clip.Input("clip", tooltip="The tuned model's CLIP."),
                io.Model.Input("model_base", tooltip="The original model it was tuned from."),
                io.Clip.Input("clip_base", tooltip="The original model's CLIP."),
                io.Vae.Input("vae", tooltip="Either model's VAE (needed to read the models; "
                                            "it is not part of the LoRA)."),
                *_rule_inputs(32),
                io.Int.Input("conv_rank", default=0, min=0, max=1024,
                             tooltip="Also extract the UNet's 3x3 convolutions (LoCon) at this "
                                     "rank (the largest rank of a dynamic mode); 0 = leave "
                                     "them out."),
                io.Boolean.Input("text_encoder", default=True,
                                 tooltip="Extract the text encoder's change too."),
            ],
            outputs=[io.LoraModel.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, model, clip, model_base, clip_base, vae, rank, rank_mode, rank_value,
                clamp_quantile, conv_rank, text_encoder) -> io.NodeOutput:
        from ..trainers.tools.lora_files import extracted_lora

        if _host.comfy_family(model) != _host.comfy_family(model_base):
            refuse("model / model_base: the two models are of different families; extract "
                   "from a model and the base it was tuned from.")
        rule = _rule(rank, rank_mode, rank_value)
        conv = _rule(conv_rank, rank_mode, rank_value) if conv_rank > 0 else None
        base = _host.bundle_from_comfy(model_base, clip_base, vae)
        tuned = _host.bundle_from_comfy(model, clip, vae)
        tensors, meta, reports, headline = extracted_lora(
            base, tuned, rule, conv, text_encoder=text_encoder, clamp_quantile=clamp_quantile,
            sources={"base": "model_base", "tuned": "model"})
        del base, tuned
        return io.NodeOutput(_host.LoraDict(tensors, meta), ui=_report(headline, reports))


class TsuikaResizeLoRA(_RankedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaResizeLoRA", display_name="Resize LoRA (Tsuika)",
            category="Tsuika/lora",
            description="Lower a LoRA's rank (fixed or per layer) by SVD of each layer's "
                        "delta, reporting the error it introduced.",
            inputs=[io.LoraModel.Input("lora", tooltip="A LORA_MODEL with kohya names (Train "
                                                       "LoRA, Extract LoRA)."),
                    *_rule_inputs(8)],
            outputs=[io.LoraModel.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, lora, rank, rank_mode, rank_value, clamp_quantile) -> io.NodeOutput:
        from ..trainers.tools.lora_files import resize_tensors

        tensors, meta, reports, headline = resize_tensors(
            *_tensors_and_metadata(lora), _rule(rank, rank_mode, rank_value),
            clamp_quantile=clamp_quantile, source="lora")
        return io.NodeOutput(_host.LoraDict(tensors, meta), ui=_report(headline, reports))


class TsuikaBakeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaBakeLoRA", display_name="Bake LoRA into Checkpoint (Tsuika)",
            category="Tsuika/merge",
            description="Write a checkpoint with a LoRA folded into its weights, into "
                        "models/checkpoints (Load Checkpoint lists it at once).",
            inputs=[
                _file_input("ckpt_name", "checkpoints", "The base checkpoint."),
                _file_input("lora_name", "loras", "The LoRA (kohya, LyCORIS LoCon, "
                                                  "diffusers/peft or ComfyUI layout)."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="The LoRA's strength on the UNet."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="The LoRA's strength on the text encoder(s)."),
                *_checkpoint_file_inputs("tsuika_baked", "the checkpoint's weights"),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None, overwrite=None, **_):
        if filename is None:
            return True
        check_plain_name("filename", filename)
        if not overwrite and (_host.checkpoints_dir() / f"{filename}.safetensors").exists():
            refuse(f"filename: {filename}.safetensors already exists in models/checkpoints; "
                   "choose another filename or turn on overwrite.")
        return True

    @classmethod
    def execute(cls, ckpt_name, lora_name, strength_model, strength_clip, filename, save_dtype,
                overwrite) -> io.NodeOutput:
        from ..trainers.tools.bake import bake_file

        target = _checkpoint_target(filename)
        result = bake_file(_full_path("checkpoints", ckpt_name), _full_path("loras", lora_name),
                           target,
                           strength_unet=strength_model, strength_text=strength_clip,
                           save_dtype=save_dtype, overwrite=overwrite)
        text = f"{result.headline}\nsaved {target.name} in models/checkpoints"
        return io.NodeOutput(target.name, ui=ui_report(text))


NO_C = "(none)"


class TsuikaMergeCheckpoints(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        from ..trainers.ops.checkpoint_merge import MODES

        names = folder_paths.get_filename_list("checkpoints")
        return io.Schema(
            node_id="TsuikaMergeCheckpoints", display_name="Merge Checkpoints (Tsuika)",
            category="Tsuika/merge",
            description="Merge two checkpoints (weighted sum, add difference with a third, "
                        "SLERP) with per-block ratios, streamed tensor by tensor into a "
                        "checkpoint in models/checkpoints; outputs its MODEL, CLIP and VAE.",
            inputs=[
                io.Combo.Input("ckpt_a", options=names, tooltip="Checkpoint A (ratio 0)."),
                io.Combo.Input("ckpt_b", options=names, tooltip="Checkpoint B (ratio 1)."),
                io.Combo.Input("mode", options=list(MODES), default="weighted_sum",
                               tooltip="weighted_sum: (1 - r) A + r B. add_difference: A + "
                                       "r (B - C). slerp: spherical from A to B."),
                io.String.Input("ratios", default="0.5",
                                tooltip="A number, or per-block 'name=value' entries: default, "
                                        "unet, te, vae, in, mid, out, inN, outN, inN-M; e.g. "
                                        "'0.5 te=0 in0-5=0.2 out=0.8'. The VAE stays A's "
                                        "unless vae= is given."),
                io.Combo.Input("ckpt_c", options=[NO_C, *names], default=NO_C,
                               tooltip="Checkpoint C of add_difference (the model B was tuned "
                                       "from)."),
                *_checkpoint_file_inputs("tsuika_merged", "the merged weights"),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.Vae.Output(display_name="vae")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, ratios=None, mode=None, ckpt_c=None, filename=None,
                        overwrite=None, **_):
        from ..trainers.ops.checkpoint_merge import BlockRatios, CheckpointMergeError, check_mode

        try:
            if ratios is not None:
                BlockRatios.parse(ratios)
            if mode is not None and ckpt_c is not None:
                check_mode(mode, ckpt_c != NO_C)
        except CheckpointMergeError as e:
            refuse(str(e).replace("checkpoint C", "ckpt_c"))
        return TsuikaBakeLoRA.validate_inputs(filename=filename, overwrite=overwrite)

    @classmethod
    def execute(cls, ckpt_a, ckpt_b, mode, ratios, ckpt_c, filename, save_dtype,
                overwrite) -> io.NodeOutput:
        from ..trainers.tools.checkpoint_merge import merge_checkpoints

        target = _checkpoint_target(filename)
        full = lambda name: _full_path("checkpoints", name)  # noqa: E731
        result = merge_checkpoints(full(ckpt_a), full(ckpt_b), target, mode=mode,
                                   ratios=ratios, path_c=None if ckpt_c == NO_C else full(ckpt_c),
                                   save_dtype=save_dtype, overwrite=overwrite)
        model, clip, vae = _host.load_checkpoint(result.path, with_vae=True)
        text = f"{result.headline}\nsaved {target.name} in models/checkpoints"
        return io.NodeOutput(model, clip, vae, ui=ui_report(text))


class TsuikaMergeLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..trainers.ops.lora_merge import METHODS

        return io.Schema(
            node_id="TsuikaMergeLoRAs", display_name="Merge LoRAs (Tsuika)",
            category="Tsuika/lora",
            description="One LoRA from two: concatenated ranks (exact), their sum cut to a "
                        "rank by SVD, or peft's TIES / DARE merges.",
            inputs=[
                io.LoraModel.Input("lora_a", tooltip="A LORA_MODEL with kohya names."),
                io.LoraModel.Input("lora_b", tooltip="Another LORA_MODEL of the same model."),
                io.Float.Input("weight_a", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of lora_a."),
                io.Float.Input("weight_b", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of lora_b."),
                io.Combo.Input("method", options=list(METHODS), default="concat",
                               tooltip="concat: exact, rank = the sum of ranks. svd: the sum "
                                       "cut to 'rank'. ties / dare_linear / dare_ties: peft's "
                                       "task merges with 'density', then cut to 'rank'."),
                io.Int.Input("rank", default=16, min=1, max=1024,
                             tooltip="The merged rank (every method but concat)."),
                io.Float.Input("density", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="The fraction of each delta's values TIES / DARE keep."),
                io.Int.Input("merge_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="DARE's random drops (repeatable by this seed)."),
            ],
            outputs=[io.LoraModel.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, lora_a, lora_b, weight_a, weight_b, method, rank, density,
                merge_seed) -> io.NodeOutput:
        from ..trainers.ops.extract import RankRule
        from ..trainers.tools.lora_merge import merge_lora_tensors

        tensors, meta, reports, headline = merge_lora_tensors(
            [_tensors_and_metadata(lora_a), _tensors_and_metadata(lora_b)], [weight_a, weight_b],
            method,
            RankRule("fixed", int(rank)), density=density, seed=merge_seed,
            names=["lora_a", "lora_b"])
        return io.NodeOutput(_host.LoraDict(tensors, meta), ui=_report(headline, reports))


class TsuikaInspectLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TsuikaInspectLoRA", display_name="Inspect LoRA (Tsuika)",
            category="Tsuika/lora",
            description="What a LoRA file in models/loras holds: layout, algorithm, ranks and "
                        "alphas per block, delta norms, base-model family, metadata.",
            inputs=[_file_input("lora_name", "loras", "A file in models/loras.")],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        from ..trainers.tools.inspect import inspect_file, report_lines

        lines = report_lines(inspect_file(_full_path("loras", lora_name)))
        text = "\n".join(lines)
        return io.NodeOutput(text, ui=ui_report(text, "warning" if any(
            line.startswith("warning:") for line in lines) else "info"))
