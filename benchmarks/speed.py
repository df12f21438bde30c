"""Speed and memory of one training step (LoRA or DreamBooth): Tsuika against the reference.

Same work on both sides: an SD1.5-architecture model with random weights (speed does not
depend on weight values), LoRA rank 16 on to_q/to_k/to_v/to_out.0, AdamW, batch 1, one
caption per image. The reference is the training step of diffusers' LoRA example script
(VAE encode and text encode every step, fp32); Tsuika runs its default path (cached
latents and text embeddings, bf16 autocast where the device is faster in bf16).

Each measurement is a fresh process (so peak memory is that side's alone); the sides run
interleaved A B A B and the script prints the median s/step, the ratios, FLOPs per step
and the fraction of the device's measured matmul rate.

    python benchmarks/speed.py --resolution 256 --steps 8 --pairs 2
    python benchmarks/speed.py --device cuda --resolution 512 --steps 30 --pairs 2
    python benchmarks/speed.py --method dreambooth --resolution 256 --steps 4 --pairs 2
    python benchmarks/speed.py --family sdxl --config full --resolution 256 --steps 4 --pairs 2

With ``--family sdxl`` the reference is the step of diffusers'
``train_text_to_image_lora_sdxl.py`` (both text encoders and the VAE every step, time ids
and pooled embedding as added conditioning); ``--config tiny`` runs the same on the
test-sized architecture (to check the script: the full SDXL needs ~20 GiB of memory).

With ``--method dreambooth`` both sides train every UNet weight (AdamW, lr 5e-6); the
reference is the step of diffusers' ``train_dreambooth.py`` (no class images on either side).

With ``--method textual_inversion`` both sides learn one new token initialised from "dog"
(AdamW, lr 1e-4). The reference is the step of diffusers' ``textual_inversion.py``, written
here from its facts: the token added to the tokenizer and the embedding matrix resized, the
whole matrix handed to AdamW (the encoder layers, final norm and position embeddings frozen),
VAE encode and text encode every step in fp32, no gradient clipping, and after each step
every row but the new one written back from a copy of the original matrix.

    python benchmarks/speed.py --method textual_inversion --resolution 256 --steps 4 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench_common import make_images, matmul_rate, model_folder, peak_rss_gib, unet_step_flops  # noqa: E402

# --family / --config -> the shipped architecture (trainers/families/configs/<name>).
CONFIGS = {"sd15": {"full": "sd15", "tiny": "sd15_tiny"},
           "sdxl": {"full": "sdxl", "tiny": "sdxl_tiny"}}
# The reference scripts' usual rates; the same on both sides.
LEARNING_RATE = {"lora": 1e-4, "dreambooth": 5e-6, "textual_inversion": 1e-4}


def run_reference(args) -> dict:
    """The reference training step: encode image and caption each step, fp32, AdamW."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(args.device)
    folder = model_folder(args.model)  # loaded as diffusers' script loads it
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    for m in (unet, vae, te):
        m.requires_grad_(False).to(device)
    caption = "a photo of a sks dog"
    restore = None
    if args.method == "dreambooth":  # train_dreambooth.py: the whole UNet, AdamW
        unet.requires_grad_(True)
        unet.train()
    elif args.method == "textual_inversion":  # textual_inversion.py: the embedding matrix
        tok.add_tokens(["<tsk>"])
        new_id = tok.convert_tokens_to_ids("<tsk>")
        te.resize_token_embeddings(len(tok))
        emb = te.get_input_embeddings()
        with torch.no_grad():
            emb.weight[new_id] = emb.weight[tok("dog", add_special_tokens=False).input_ids[0]]
        emb.weight.requires_grad_(True)
        te.train()
        keep = torch.ones(len(tok), dtype=torch.bool)
        keep[new_id] = False
        restore = (emb.weight, emb.weight.detach().clone(), keep)
        caption = "a photo of a <tsk>"
    else:
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad] if restore is None else [
        restore[0]]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE[args.method], weight_decay=1e-2)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    images = make_images(args.resolution, 4, device)
    ids = tok([caption], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids.to(device)
    times = []
    for step in range(args.steps + args.warmup):
        t0 = time.perf_counter()
        pixels = images[step % len(images)]
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        hidden = te(ids, return_dict=False)[0]
        pred = unet(noisy, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        if restore is None:  # the textual-inversion script clips nothing
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if restore is not None:  # every row but the new token's back to the original
            with torch.no_grad():
                restore[0][restore[2]] = restore[1][restore[2]]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"s_per_step": statistics.median(times), "images_per_s": 1 / statistics.median(times),
            "dtype": "fp32"}


def run_reference_sdxl(args) -> dict:
    """The step of diffusers' ``train_text_to_image_lora_sdxl.py`` (UNet LoRA, fp32): the
    image goes through the VAE and the caption through both text encoders every step (the
    penultimate hidden states of each, concatenated; the pooled projection of the second),
    the time ids are the image's original size, crop corner and target size, and the UNet
    gets them with the pooled embedding as ``added_cond_kwargs``."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = torch.device(args.device)
    folder = model_folder(args.model)
    toks = [CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer",
                                                                         "tokenizer_2")]
    tes = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
           CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")]
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    for m in (unet, vae, *tes):
        m.requires_grad_(False).to(device)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE[args.method], weight_decay=1e-2)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    images = make_images(args.resolution, 4, device)
    ids = [tok(["a photo of a sks dog"], padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="pt").input_ids.to(device) for tok in toks]
    side = args.resolution  # original size = target size, no crop (the images are square)
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32, device=device)
    times = []
    for step in range(args.steps + args.warmup):
        t0 = time.perf_counter()
        pixels = images[step % len(images)]
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        hidden = []
        for te, i in zip(tes, ids):
            out = te(i, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        pred = unet(noisy, t, torch.cat(hidden, dim=-1), return_dict=False,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"s_per_step": statistics.median(times), "images_per_s": 1 / statistics.median(times),
            "dtype": "fp32"}


def run_tsuika(args) -> dict:
    """Tsuika's default path through its real loop (trainers.loop.train)."""
    import tempfile

    import torch

    from tsuika.trainers.callbacks import Callbacks
    from tsuika.trainers.config import build_config
    from tsuika.trainers.loop import train

    times: list[float] = []

    started: dict = {}

    class Timer(Callbacks):
        def on_start(self, info):
            started.update(info)
            if torch.cuda.is_available():  # loading and caching apart from the steps
                started["setup_peak"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        def on_step(self, info):
            times.append(info.seconds_per_step)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_images(args.resolution, 16, None, folder=data)
        config = build_config(overrides=[
            f"model.path={model_folder(args.model)}", f"data.dir={data}",
            f"output.dir={tmp}/out", f"data.resolution={args.resolution}",
            f"train.steps={args.steps + args.warmup}", "network.rank=16", "network.alpha=16",
            "network.target=attention", f"train.device={args.device}",
            f"train.mixed_precision={args.precision}", "output.save_dtype=fp16",
            f"network.method={args.method}", "network.token=tsktok", "network.init_word=dog",
            f"train.learning_rate={LEARNING_RATE[args.method]}",
            *args.tsuika_set])
        t0 = time.perf_counter()
        train(config, Timer())
        total = time.perf_counter() - t0
    result = {"s_per_step": statistics.median(times[args.warmup:]),
              "images_per_s": config.train.batch_size / statistics.median(times[args.warmup:]),
              "dtype": started["dtype"].replace("torch.", ""), "run_s": total,
              "cuda": torch.cuda.is_available()}
    if "setup_peak" in started:  # the run's peak is the larger of the two
        result["setup_peak_vram_gib"] = started["setup_peak"] / 2**30
        result["steps_peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def worker(args) -> None:
    if args.impl == "tsuika":
        fn = run_tsuika
    elif (model_folder(args.model) / "text_encoder_2").is_dir():
        if args.method != "lora":
            sys.exit("the SDXL reference is the LoRA step only (--method lora)")
        fn = run_reference_sdxl
    else:
        fn = run_reference
    result = fn(args)
    result["peak_rss_gib"] = peak_rss_gib()
    if args.device.startswith("cuda"):
        import torch

        result["peak_vram_gib"] = max(torch.cuda.max_memory_allocated() / 2**30,
                                      result.get("setup_peak_vram_gib", 0.0))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=sorted(CONFIGS), default="sd15",
                   help="model family: sd15, or sdxl (reference: diffusers' "
                        "train_text_to_image_lora_sdxl.py step)")
    p.add_argument("--config", choices=("full", "tiny"), default="full",
                   help="full: the real architecture (SDXL full needs ~20 GiB); tiny: the "
                        "test-sized one, to check the script")
    p.add_argument("--model", help="a shipped config name instead (sd15_hostable, ...)")
    p.add_argument("--method", choices=("lora", "dreambooth", "textual_inversion"),
                   default="lora",
                   help="lora: the LoRA step; dreambooth: full fine-tuning of the UNet "
                        "(reference: diffusers' train_dreambooth.py step, no class images); "
                        "textual_inversion: one new token (reference: diffusers' "
                        "textual_inversion.py step)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=2, help="A B rounds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="Tsuika's train.mixed_precision")
    p.add_argument("--tsuika-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra Tsuika options, e.g. train.compile=true")
    p.add_argument("--no-rates", action="store_true",
                   help="skip the FLOP count and the matmul-rate measurement (slow in bf16 "
                        "on CPUs without native bf16)")
    p.add_argument("--impl", choices=("tsuika", "reference"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model or CONFIGS[args.family][args.config]
    if args.impl:
        worker(args)
        return
    print("model on disk:", model_folder(args.model), flush=True)  # written once, reused
    runs: dict[str, list[dict]] = {"tsuika": [], "reference": []}
    for _ in range(args.pairs):
        for impl in ("tsuika", "reference"):
            cmd = [sys.executable, __file__, "--impl", impl] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("impl", "tsuika_set", "no_rates") and v is not None]
            cmd += [f"--tsuika-set={s}" for s in args.tsuika_set]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{impl} run failed:\n{out.stderr[-3000:]}")
            runs[impl].append(json.loads(line[-1][7:]))
            print(impl, runs[impl][-1], flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0] if isinstance(v[0][m], float)}
           for k, v in runs.items()}
    t, r = med["tsuika"], med["reference"]
    print(f"\nmodel {args.model}, {args.resolution}x{args.resolution}, batch 1, "
          f"device {args.device}")
    print(f"images/s    tsuika {t['images_per_s']:.2f}  reference {r['images_per_s']:.2f}  "
          f"ratio {t['images_per_s'] / r['images_per_s']:.2f}")
    print(f"s/step      tsuika {t['s_per_step']:.3f}  reference {r['s_per_step']:.3f}  "
          f"ratio {t['s_per_step'] / r['s_per_step']:.2f}")
    mem = "peak_vram_gib" if "peak_vram_gib" in t else "peak_rss_gib"
    print(f"{mem:12s}tsuika {t[mem]:.2f}  reference {r[mem]:.2f}  ratio {t[mem] / r[mem]:.2f}",
          flush=True)
    if args.no_rates:
        return
    flops = unet_step_flops(args.model, args.resolution, args.device, args.method)
    rate32, rate16 = matmul_rate(args.device)
    print(f"UNet {args.method}-step FLOPs {flops / 1e9:.1f} G; matmul rate fp32 {rate32 / 1e9:.0f} "
          f"GFLOP/s, bf16 {rate16 / 1e9:.0f} GFLOP/s")
    tflops = flops * t["images_per_s"]
    print(f"bf16 floor {flops / rate16:.3f} s/image; tsuika at {tflops / rate16:.0%}"
          f" of the bf16 matmul rate (reference at {flops / rate32 / r['s_per_step']:.0%} of fp32)")


if __name__ == "__main__":
    main()
