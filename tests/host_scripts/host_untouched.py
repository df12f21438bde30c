"""ComfyUI's own model gives the same output after a Tsuika training as before it.

Run with ComfyUI's python (tests/test_real_host_sdxl.py does), ``tsuika`` importable:

    PYTHONPATH=<parent of tsuika> <comfy-venv>/bin/python tests/host_scripts/host_untouched.py \
        --comfy <ComfyUI dir> --checkpoint model.safetensors --data <images> --report out.json

The checkpoint is loaded as Load Checkpoint loads it, under ``torch.inference_mode`` as
ComfyUI runs its nodes (its weights are then inference tensors). Before and after each
training (each method in ``--methods``, LoRA with text-encoder adapters too, through the
host bridge the train nodes use, ``nodes/_host.bundle_from_comfy`` with
``written_components``, and the backend loop), ComfyUI computes: its CLIP's conditioning
of a prompt, its model's denoised estimate (``apply_model``) and its VAE's decode. The
report says, per method, the MiB of the bundle's modules that lay in ComfyUI's storage, the
largest difference of each output (0.0: bit for bit the same) and the run's losses. Prints
one JSON line ``RESULT {...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--comfy", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a captioned image folder")
    p.add_argument("--methods", default="lora,dreambooth,textual_inversion,hypernetwork")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--report", help="also write the JSON here")
    args = p.parse_args()
    sys.path.insert(0, args.comfy)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # what main.py --cpu sets, before model_management picks a device
    import torch

    import comfy.sd

    from tsuika.nodes import _host
    from tsuika.trainers.config import load_config
    from tsuika.trainers.loop import train

    with torch.inference_mode():  # as the Load Checkpoint node runs
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint)[:4]

    def outputs() -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize("a red heart"),
                                                   return_pooled=True)
            adm = model.model.encode_adm(pooled_output=pooled, width=64, height=64)
            x = torch.randn(1, 4, 8, 8, generator=gen)
            sigma = model.model.model_sampling.sigmas[500].reshape(1).float()
            denoised = model.model.apply_model(x, sigma, c_crossattn=cond,
                                               **({} if adm is None else {"y": adm}))
            image = vae.decode(torch.randn(1, 4, 8, 8, generator=gen))
        return {"conditioning": cond.clone(), "denoised": denoised.clone(),
                "decoded": image.clone()}

    before = outputs()
    report: dict = {"comfy_model": type(model.model.model_config).__name__, "methods": {}}
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as out:
            sets = {"data.dir": args.data, "output.dir": out, "train.steps": args.steps,
                    "data.resolution": 64, "network.method": method, "network.rank": 4,
                    "train.learning_rate": 1e-4, "train.mixed_precision": "no",
                    "train.device": "cpu", "sample.every": 0}
            if method == "lora":  # its adapters on the text encoder too: grads through it
                sets["network.train_text_encoder"] = "true"
            config = load_config(None, [f"{k}={v}" for k, v in sets.items()])
            written = _host.written_components(config)
            with torch.inference_mode(False), torch.enable_grad():  # as the train node runs
                bundle = _host.bundle_from_comfy(model, clip, vae, written)
                shared = {k: round(v / 2**20, 1)
                          for k, v in bundle.extra["host_shared_bytes"].items()}
                result = train(config, bundle=bundle)
            del bundle
        after = outputs()
        report["methods"][method] = {
            "written": sorted(written), "shared_mib": shared, "losses": result.losses,
            "max_abs_diff": {k: float((after[k].float() - v.float()).abs().max())
                             for k, v in before.items()}}
    line = json.dumps(report)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(line)
    print("RESULT " + line, flush=True)


if __name__ == "__main__":
    main()
