"""Does bf16 autocast make a LoRA step faster than fp32 on this device? (train.mixed_precision)

Two copies of the SD1.5-architecture UNet (random weights), one fp32 and one with bf16 frozen
weights under bf16 autocast, each with rank-16 LoRA on the attention projections; the script
alternates one step of each (A B A B, so machine noise hits both alike) and prints the
medians and the ratio.

    python benchmarks/cpu_precision.py --resolution 256 --pairs 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import build_bundle  # noqa: E402


def make_step(dtype, device, resolution):
    import torch
    from peft import LoraConfig

    unet = build_bundle("sd15").unet
    torch.nn.Module.to(unet, device=device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    lat = resolution // 8
    x = torch.randn(1, 4, lat, lat, device=device)
    ctx = torch.randn(1, 77, 768, device=device)
    t = torch.tensor([500], device=device)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(x, t, ctx).sample
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    return step


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    steps = {"fp32": make_step(torch.float32, device, args.resolution),
             "bf16": make_step(torch.bfloat16, device, args.resolution)}
    for s in steps.values():
        s()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in steps}
    ratios = []
    for _ in range(args.pairs):
        pair = {k: s() for k, s in steps.items()}
        for k, v in pair.items():
            times[k].append(v)
        ratios.append(pair["bf16"] / pair["fp32"])
    print(f"{args.resolution}x{args.resolution}, device {device}, {args.pairs} pairs")
    for k, v in times.items():
        print(f"{k}: median {statistics.median(v):.2f} s/step (min {min(v):.2f}, max {max(v):.2f})")
    print(f"bf16/fp32 time ratio: median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
