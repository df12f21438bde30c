"""The model and LoRA tools on the command line: ``tsuika extract | resize | bake``.

    tsuika extract BASE TUNED OUT.safetensors [--rank 32 | --rank-mode frobenius --value 0.9]
                   [--conv-rank 16] [--no-text-encoder] [--clamp-quantile 0.99]
    tsuika resize LORA OUT.safetensors --rank 8 [--rank-mode sv_ratio --value 10]
    tsuika bake CHECKPOINT LORA OUT.safetensors [--strength 0.8] [--strength-text 1.0]
    tsuika merge A B OUT.safetensors [--mode weighted_sum|add_difference|slerp] [--c C]
                 [--ratios "0.5 te=0 in0-5=0.2 out=0.8"]
    tsuika merge-lora A B [C ...] --out OUT.safetensors [--weights 1,0.5]
                 [--method concat|svd|ties|dare_linear|dare_ties] [--rank 16] [--density 0.5]
    tsuika inspect FILE [--json] [--scrub OUT.safetensors]

Each sub-command sets ``run`` on its parsed arguments: it returns the lines to show, which
``cli.main`` prints (printing stays in the one program module), and ``cli.main`` turns the
errors into one line and an exit code, as for training.
"""

from __future__ import annotations

import argparse

from .ops.checkpoint_merge import MODES
from .ops.extract import RANK_MODES, RankRule
from .ops.lora_merge import METHODS as LORA_METHODS


def _rule_args(p: argparse.ArgumentParser, default_rank: int) -> None:
    p.add_argument("--rank", type=int, default=default_rank,
                   help=f"rank of 'fixed'; the largest rank of the dynamic modes "
                        f"(default {default_rank})")
    p.add_argument("--rank-mode", choices=RANK_MODES, default="fixed",
                   help="fixed: --rank values; energy: keep --value of the sum of singular "
                        "values; frobenius: keep --value of the Frobenius norm; sv_ratio: keep "
                        "values >= s_max / --value")
    p.add_argument("--value", type=float, default=0.0,
                   help="the dynamic mode's target (0.9 for energy / frobenius, 10 for "
                        "sv_ratio)")
    p.add_argument("--clamp-quantile", type=float, default=1.0,
                   help="clamp factors to this quantile of their absolute values (kohya uses "
                        "0.99); 1 = off, the exact truncated SVD")
    p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--layers", type=int, default=5, metavar="N",
                   help="print the N layers with the largest error (0: none, -1: all)")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="the model the LoRA is for (optional): checks every module exists, "
                        "and maps ComfyUI-native UNet names of a UNet other than the released "
                        "SD1.x / SDXL ones")


def add_parsers(sub) -> None:
    """Add the tool sub-commands to ``tsuika``'s sub-parsers."""
    e = sub.add_parser("extract", help="extract a LoRA from the difference of two models (SVD)")
    e.add_argument("base", help="the original model (single file or diffusers folder)")
    e.add_argument("tuned", help="the fine-tuned model of the same family")
    e.add_argument("out", help="the LoRA file to write (.safetensors)")
    _rule_args(e, 32)
    e.add_argument("--conv-rank", type=int, default=0,
                   help="also extract the UNet's 3x3 convolutions (LoCon) at this rank, or the "
                        "largest rank of the dynamic mode (0 = leave them out)")
    e.add_argument("--no-text-encoder", action="store_true", help="extract the UNet only")
    e.add_argument("--min-change", type=float, default=1e-6,
                   help="leave out layers whose change is at most this fraction of the "
                        "weight's norm")
    e.set_defaults(run=_extract)
    r = sub.add_parser("resize", help="change a LoRA's rank (fixed or dynamic), reporting the "
                                      "error")
    r.add_argument("lora", help="a LoRA / LoCon file (kohya, LyCORIS, diffusers/peft or "
                                "ComfyUI layout); written with kohya names")
    r.add_argument("out", help="the LoRA file to write (.safetensors)")
    _rule_args(r, 8)
    _model_arg(r)
    r.set_defaults(run=_resize)
    b = sub.add_parser("bake", help="bake a LoRA into a checkpoint (single file out)")
    b.add_argument("checkpoint", help="the base model (single file or diffusers folder)")
    b.add_argument("lora", help="a LoRA file (kohya, LyCORIS-LoCon, diffusers/peft, ComfyUI)")
    b.add_argument("out", help="the checkpoint to write (.safetensors)")
    b.add_argument("--strength", type=float, default=1.0, help="the LoRA's strength on the UNet")
    b.add_argument("--strength-text", type=float, default=None,
                   help="its strength on the text encoders (default: --strength)")
    b.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    b.set_defaults(run=_bake)
    m = sub.add_parser("merge", help="merge checkpoints (weighted sum, add difference, SLERP, "
                                     "per-block ratios), streamed tensor by tensor")
    m.add_argument("a", help="checkpoint A (.safetensors single file)")
    m.add_argument("b", help="checkpoint B")
    m.add_argument("out", help="the checkpoint to write (.safetensors)")
    m.add_argument("--mode", choices=MODES, default="weighted_sum",
                   help="weighted_sum: (1-r)A + rB; add_difference: A + r(B - C); slerp: "
                        "spherical from A to B")
    m.add_argument("--c", help="checkpoint C of add_difference (the model B was tuned from)")
    m.add_argument("--ratios", default="0.5",
                   help="a number, or per-block 'name=value' entries: default, unet, te, vae, "
                        "in, mid, out, inN, outN, inN-M (e.g. \"0.5 te=0 in0-5=0.2\"); the "
                        "VAE stays A's unless vae= is given")
    m.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="the weights' dtype (default: A's)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.set_defaults(run=_merge)
    ml = sub.add_parser("merge-lora", help="merge LoRAs: concatenated ranks (exact), SVD to a "
                                           "rank, TIES / DARE")
    ml.add_argument("loras", nargs="+", help="two or more LoRA files (kohya, LyCORIS, "
                                             "diffusers/peft or ComfyUI layout, mixed)")
    ml.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    ml.add_argument("--weights", default=None,
                    help="comma-separated multipliers, one per LoRA (default: 1 each)")
    ml.add_argument("--method", choices=LORA_METHODS, default="concat",
                    help="concat: exact, rank = sum of ranks; svd: the sum cut to --rank; "
                         "ties / dare_linear / dare_ties: peft's task merges, then cut")
    ml.add_argument("--density", type=float, default=0.5,
                    help="fraction of each delta's values TIES / DARE keep")
    ml.add_argument("--seed", type=int, default=0, help="DARE's random drops")
    _rule_args(ml, 0)
    _model_arg(ml)
    ml.set_defaults(run=_merge_lora)
    i = sub.add_parser("inspect", help="what a LoRA / checkpoint file holds: layout, algorithm, "
                                       "ranks and alphas per block, norms, family, metadata")
    i.add_argument("file", help="a .safetensors file")
    i.add_argument("--json", action="store_true", help="print the findings as JSON")
    i.add_argument("--scrub", metavar="OUT",
                   help="also write a copy whose metadata has no local paths or dataset tags "
                        "(hyper-parameters kept)")
    i.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    i.set_defaults(run=_inspect)


def _rule(args, rank: int | None = None) -> RankRule:
    return RankRule(args.rank_mode, args.rank if rank is None else rank, args.value)


def _result_lines(result, layers: int) -> list[str]:
    from .tools.lora_files import report_lines

    shown = report_lines(result.reports, None if layers < 0 else layers) if layers else []
    return [result.headline, *(f"  {line}" for line in shown), f"wrote {result.path}"]


def _extract(args) -> list[str]:
    from .tools.lora_files import extract_file

    conv = _rule(args, args.conv_rank) if args.conv_rank > 0 else None
    result = extract_file(args.base, args.tuned, args.out, _rule(args), conv,
                          text_encoder=not args.no_text_encoder,
                          clamp_quantile=args.clamp_quantile,
                          min_relative_change=args.min_change, save_dtype=args.save_dtype,
                          overwrite=args.overwrite)
    return _result_lines(result, args.layers)


def _resize(args) -> list[str]:
    from .tools.lora_files import resize_file

    result = resize_file(args.lora, args.out, _rule(args), clamp_quantile=args.clamp_quantile,
                         save_dtype=args.save_dtype, overwrite=args.overwrite,
                         model_path=args.model)
    return _result_lines(result, args.layers)


def _bake(args) -> list[str]:
    from .tools.bake import bake_file

    text = args.strength if args.strength_text is None else args.strength_text
    result = bake_file(args.checkpoint, args.lora, args.out, strength_unet=args.strength,
                       strength_text=text, save_dtype=args.save_dtype, overwrite=args.overwrite)
    return [result.headline, f"wrote {result.path}"]


def _merge(args) -> list[str]:
    from .tools.checkpoint_merge import merge_checkpoints

    result = merge_checkpoints(args.a, args.b, args.out, mode=args.mode, ratios=args.ratios,
                               path_c=args.c, save_dtype=args.save_dtype,
                               overwrite=args.overwrite)
    return [result.headline, f"wrote {result.path}"]


def _merge_lora(args) -> list[str]:
    from .tools.lora_merge import merge_lora_files

    if args.weights is None:
        weights = [1.0] * len(args.loras)
    else:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"--weights {args.weights!r} must be comma-separated numbers, one "
                             "per LoRA, e.g. 1,0.5.") from None
    if args.rank <= 0 and args.rank_mode == "fixed":
        rule = None  # the largest input rank
    else:
        rule = _rule(args, args.rank if args.rank > 0 else 1024)
    result = merge_lora_files(args.loras, weights, args.out, args.method, rule,
                              density=args.density, seed=args.seed,
                              save_dtype=args.save_dtype, overwrite=args.overwrite,
                              model_path=args.model)
    return _result_lines(result, args.layers)


def _inspect(args) -> list[str]:
    from .tools.inspect import as_json, inspect_file, report_lines, scrub_file

    info = inspect_file(args.file)
    lines = [as_json(info)] if args.json else report_lines(info)
    if args.scrub:
        path, dropped = scrub_file(args.file, args.scrub, overwrite=args.overwrite)
        lines.append(f"wrote {path} without {', '.join(dropped) or 'nothing to drop'} (paths "
                     "reduced to file names)")
    return lines
