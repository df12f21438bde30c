"""What Train Checkpoint's MODEL / CLIP outputs cost in a ComfyUI process, three ways.

The node fine-tunes a whole model and must return it to the graph as ComfyUI model objects,
while the user's own MODEL / CLIP / VAE stay valid for the rest of the graph. Measured here, in
ComfyUI's python (no server), on a single-file checkpoint standing in for the trained one:

- ``node``: what ``nodes/train_checkpoint.py`` does: Load Checkpoint's loader on the saved
  file without the VAE (never trained), and without the CLIP when the text encoder was not
  trained (the input CLIP is returned);
- ``full``: the same loader with CLIP and VAE (what Load Checkpoint does);
- ``set-patches``: a clone of the user's MODEL with every UNet weight replaced by a ComfyUI
  "set" patch holding the trained tensor (no loader; the patcher keeps the tensors).

For each: the process's resident memory added (``/proc/self/status`` VmRSS, after a garbage
collection) and the tensor bytes the new objects hold. Run:

    PYTHONPATH=/work/comfy:<parent of the pack> /work/comfy-venv/bin/python \
        benchmarks/checkpoint_outputs.py --work /tmp/ckpt_outputs
"""

from __future__ import annotations

import argparse
import gc
import re
from pathlib import Path


def rss_mib() -> float:
    gc.collect()
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the fixture checkpoint")
    ap.add_argument("--fixture", default="sd15-hostable")
    args = ap.parse_args()

    import torch

    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # as `main.py --cpu`; set before model_management is imported
    import comfy.sd
    import comfy.utils

    from tsuika.trainers.fixtures import write_fixture

    torch.set_num_threads(1)
    work = Path(args.work)
    ckpt = work / f"{args.fixture}.safetensors"
    if not ckpt.is_file():
        write_fixture(args.fixture, work, dtype="fp16", single_file_only=True)
    print(f"checkpoint: {ckpt.name}, {ckpt.stat().st_size / 2**20:.0f} MiB on disk; "
          f"torch {torch.__version__}")
    base = rss_mib()
    user = comfy.sd.load_checkpoint_guess_config(str(ckpt))  # the user's MODEL, CLIP, VAE
    user_mib = rss_mib() - base
    print(f"user's MODEL+CLIP+VAE loaded: +{user_mib:.0f} MiB RSS")

    def held(model=None, clip=None, patched=None) -> float:
        """MiB of tensors the new objects hold (their weights, or their patches)."""
        tensors = []
        if model is not None:
            tensors += list(model.model.state_dict().values())
        if clip is not None:
            tensors += list(clip.cond_stage_model.state_dict().values())
        if patched is not None:
            tensors += [p[1][1][0] for ps in patched.patches.values() for p in ps]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    rows = []
    for way in ("node", "full", "set-patches"):
        before = rss_mib()
        if way == "node":
            model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False,
                                                          output_clip=False)[0]
            rows.append((way, rss_mib() - before, held(model=model)))
        elif way == "full":
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt))
            rows.append((way, rss_mib() - before, held(model=model, clip=clip)))
            del clip, vae
        else:
            sd = comfy.utils.load_torch_file(str(ckpt))
            model = user[0].clone()
            keys = model.model_state_dict()
            patches = {k[len("model."):]: ("set", (v,)) for k, v in sd.items()
                       if k.startswith("model.") and k[len("model."):] in keys}
            del sd
            model.add_patches(patches, 1.0)
            rows.append((way, rss_mib() - before, held(patched=model)))
        del model
        gc.collect()
    print("| way | RSS added MiB | tensors held MiB |\n| --- | ---: | ---: |")
    for way, added, tensors in rows:
        print(f"| {way} | {added:.0f} | {tensors:.0f} |")


if __name__ == "__main__":
    main()
