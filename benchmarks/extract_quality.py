"""LoRA extraction quality: Tsuika's extractor beside ComfyUI's own, on the same differences at
the same file size.

The pair: the ``sd15-hostable`` fixture (real SD1.5 layer shapes for CLIP-L, a shrunken UNet)
and a "tuned" copy whose every layer a LoRA / LoCon adapts differs by a full-rank change with
a decaying spectrum (``s_i = exp(-i / 6)``, scaled to 1% of the weight's norm), the shape of
a fine-tune's difference. Each layer's difference is extracted at rank ``--rank`` by

* ComfyUI: ``comfy_extras/nodes_lora_extract.py:extract_lora`` (run from ComfyUI's venv in a
  subprocess, as its node calls it; it clamps to the 0.99 quantile), factors stored fp16;
* Tsuika: ``trainers/ops/extract.py:low_rank`` (fixed rank, no clamping; the default), and
  with ``clamp_quantile=0.99`` as ComfyUI does, factors stored fp16.

Both files hold the same tensors of the same shapes (Tsuika adds one fp32 alpha per layer), so
the comparison is at equal size. Reported: the relative error ``||D - up @ down||_F / ||D||_F``
over all layers together, its per-layer mean and worst, and how many layers each wins.

    python benchmarks/extract_quality.py --comfy /work/comfy --python /work/comfy-venv/bin/python
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT.parent))

from _bench_common import replace_docs_section  # noqa: E402

DOCS = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- extract-quality:begin -->", "<!-- extract-quality:end -->"

COMFY_CODE = r"""
import sys
sys.path.insert(0, sys.argv[1])
args = sys.argv[1:]
sys.argv = ["main.py", "--cpu"]  # ComfyUI reads its device from its own command line
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import load_file, save_file
from comfy_extras.nodes_lora_extract import extract_lora
diffs, rank = load_file(args[1]), int(args[3])
out = {}
for key, diff in diffs.items():
    up, down = extract_lora(diff, rank)
    out[key + ".lora_up.weight"] = up.contiguous().half()
    out[key + ".lora_down.weight"] = down.contiguous().half()
save_file(out, args[2])
"""


def _differences(seed: int = 0):
    import torch

    from tsuika.trainers.fixtures import build_modules
    from tsuika.trainers.ops.extract import RankRule
    from tsuika.trainers.tools.lora_files import layer_rules

    unet, _, te, _ = build_modules("sd15_hostable", seed=seed)
    rule_for = layer_rules(RankRule("fixed", 1), RankRule("fixed", 1), text_encoder=True)
    g = torch.Generator().manual_seed(seed + 1)
    diffs = {}
    for comp, model in (("unet", unet), ("text_encoder", te)):
        for path, module in model.named_modules():
            if rule_for(comp, path, module) is None:
                continue
            w = module.weight.detach().float()
            flat = w.flatten(1)
            n = min(flat.shape)
            u, _ = torch.linalg.qr(torch.randn(flat.shape[0], n, generator=g))
            v, _ = torch.linalg.qr(torch.randn(flat.shape[1], n, generator=g))
            s = torch.exp(-torch.arange(n, dtype=torch.float32) / 6.0)
            d = (u * s) @ v.T
            d = d * (0.01 * float(flat.norm()) / float(d.norm()))
            diffs[f"{comp}.{path}"] = d.reshape(w.shape).contiguous()
    return diffs


def _errors(diffs, factors) -> dict[str, float]:
    out = {}
    for key, d in diffs.items():
        up = factors[key + ".lora_up.weight"].float().flatten(1)
        down = factors[key + ".lora_down.weight"].float().flatten(1)
        out[key] = float((d.flatten(1) - up @ down).norm() / d.norm())
    return out


def _total(diffs, errors) -> float:
    lost = sum((errors[k] * float(d.norm())) ** 2 for k, d in diffs.items())
    return math.sqrt(lost / sum(float(d.norm()) ** 2 for d in diffs.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfy", required=True, help="a ComfyUI checkout")
    p.add_argument("--python", required=True, help="ComfyUI's venv python")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file, save_file

    from tsuika.trainers.ops.extract import RankRule, low_rank

    diffs = _differences()
    with tempfile.TemporaryDirectory(prefix="tsuika-extract-") as tmp:
        src, theirs_path = Path(tmp) / "diffs.safetensors", Path(tmp) / "comfy.safetensors"
        save_file(diffs, str(src))
        t0 = time.perf_counter()
        r = subprocess.run([args.python, "-c", COMFY_CODE, args.comfy, str(src),
                            str(theirs_path), str(args.rank)], capture_output=True, text=True,
                           cwd=args.comfy, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           check=False)
        comfy_s = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"ComfyUI's extractor failed:\n{r.stderr[-3000:]}")
        theirs = load_file(str(theirs_path))
    results = {"ComfyUI extract_lora (clamp 0.99)": (_errors(diffs, theirs), comfy_s)}
    for label, clamp in (("Tsuika low_rank (default, no clamp)", 1.0),
                         ("Tsuika low_rank (clamp 0.99)", 0.99)):
        t0 = time.perf_counter()
        ours = {}
        for key, d in diffs.items():
            w, _ = low_rank(d, RankRule("fixed", args.rank), clamp)
            ours[key + ".lora_up.weight"] = (w.up * w.scale).half()  # alpha folded: scale 1
            ours[key + ".lora_down.weight"] = w.down.half()
        results[label] = (_errors(diffs, ours), time.perf_counter() - t0)
    base = results["ComfyUI extract_lora (clamp 0.99)"][0]
    rows = []
    for label, (errs, seconds) in results.items():
        wins = sum(errs[k] <= base[k] + 1e-7 for k in errs)
        rows.append(f"| {label} | {_total(diffs, errs):.4f} | "
                    f"{sum(errs.values()) / len(errs):.4f} | {max(errs.values()):.4f} | "
                    f"{wins} / {len(errs)} | {seconds:.1f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} on this {os.cpu_count()}-core CPU "
        f"({platform.machine()}), torch {torch.__version__}; {len(diffs)} layers of the "
        f"sd15-hostable fixture (every layer LoRA / LoCon adapts, UNet and CLIP-L), rank "
        f"{args.rank}, fp16 factors (equal file size); `python benchmarks/extract_quality.py "
        "--comfy COMFY --python COMFY_VENV/bin/python`. Error = ||D - up @ down||_F / ||D||_F; "
        "'layers <= ComfyUI' counts the layers where the row's error is at most ComfyUI's.",
        "",
        "| extractor | error, all layers | mean per layer | worst layer | layers <= ComfyUI | "
        "seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |", *rows])
    print(text)
    if args.write_docs:
        replace_docs_section(DOCS, BEGIN, END, text)


if __name__ == "__main__":
    main()
