"""Pieces the benchmark scripts share: random-weight models, inputs, FLOPs, matmul rate."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path


def build_bundle(config_name: str):
    """A ModelBundle with random weights of a shipped architecture (sd15, sd15_tiny, ...)."""
    from tsuika.trainers.families.base import ModelBundle
    from tsuika.trainers.families.sd15 import load_tokenizer
    from tsuika.trainers.fixtures import build_modules

    unet, vae, te, cfg = build_modules(config_name, seed=0)
    for m in (unet, vae, te):
        m.requires_grad_(False)
    return ModelBundle(family="sd15", unet=unet, vae=vae, text_encoders=[te],
                       tokenizers=[load_tokenizer()], scheduler_config=cfg["scheduler"],
                       prediction_type="epsilon", source_name=f"random-{config_name}")


def model_folder(config_name: str, cache_dir: str | Path | None = None) -> Path:
    """A diffusers folder (fp32, like the canonical SD1.5 repository) of a shipped
    architecture with seeded random weights, written once under ``cache_dir`` (default
    ``~/.cache/tsuika-bench``) and reused: benchmarks load the model from disk the way a
    training run does, so the load's memory counts."""
    import os
    import shutil

    from tsuika.trainers.fixtures import build_modules, write_diffusers_folder

    root = Path(cache_dir or os.environ.get("TSUIKA_BENCH_CACHE",
                                            Path.home() / ".cache" / "tsuika-bench"))
    folder = root / f"{config_name}-seed0"
    if (folder / "model_index.json").is_file():
        return folder
    partial = root / f"{config_name}-seed0.partial"
    shutil.rmtree(partial, ignore_errors=True)
    unet, vae, te, cfg = build_modules(config_name, seed=0)
    write_diffusers_folder(partial, unet, vae, te, cfg)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # complete or absent: a killed write is redone next time
    return folder


def make_images(resolution: int, n: int, device, folder: Path | None = None):
    """``n`` random images: tensors in [-1, 1] on ``device``, or PNG+caption files in ``folder``."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(n)]
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text("a photo of a sks dog")
        return None
    return [torch.from_numpy(a).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
            for a in arrays]


def peak_rss_gib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2**20 if sys.platform != "darwin" else 2**30)


def unet_step_flops(config_name: str, resolution: int, device: str,
                    method: str = "lora") -> float:
    """FLOPs of one training step of the UNet, batch 1, counted by torch's FlopCounterMode:
    LoRA (forward, backward to the adapters only: frozen weights need no weight gradients)
    or DreamBooth (forward, backward with every weight's gradient) or textual inversion
    (forward, backward to the text conditioning only: no weight gradients at all)."""
    import torch
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from tsuika.trainers.fixtures import build_modules

    unet = build_modules(config_name, seed=0)[0].requires_grad_(False).to(device)
    if method == "dreambooth":
        unet.requires_grad_(True)
    elif method == "textual_inversion":
        unet.requires_grad_(False)
    else:
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lat = resolution // 8
    x = torch.randn(1, 4, lat, lat, device=device)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, device=device,
                      requires_grad=method == "textual_inversion")
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + 6 time ids
        cfg = unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, device=device),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution,
                                            resolution]], dtype=torch.float32, device=device)}
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500], device=device), ctx,
             added_cond_kwargs=added).sample.float().pow(2).mean().backward()
    return float(fc.get_total_flops())


def matmul_rate(device: str, n: int = 2048, repeat: int = 10) -> tuple[float, float]:
    """Measured (fp32, bf16) FLOP/s of a large square matmul on ``device``."""
    import torch

    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(2 * n**3 * repeat / (time.perf_counter() - t0))
    return rates[0], rates[1]


def replace_docs_section(docs: Path, begin: str, end: str, text: str) -> None:
    """Put ``text`` between the ``begin`` and ``end`` markers of ``docs`` (atomically)."""
    doc = docs.read_text(encoding="utf-8")
    if begin not in doc or end not in doc:
        raise SystemExit(f"{docs} has no {begin} ... {end} section to replace.")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = docs.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{begin}\n{text}\n{end}{tail}", encoding="utf-8")
    tmp.replace(docs)
