"""Run by ComfyUI's own python (tests/test_real_host.py): load LoRA files through ComfyUI's
LoraLoader node onto a checkpoint and report, as JSON, the keys ComfyUI did not load, how
many weights each file patched, the patched weights' changes in fp32 (saved for the test to
compare with Tsuika's merge; ComfyUI then rounds them into the weight's own dtype) and
whether the UNet's output changed once patched.

Usage: python comfy_lora_patch.py COMFY_DIR CHECKPOINT LORAS_DIR OUT_DIR NAME [NAME ...]
"""

import json
import logging
import sys

comfy_dir, checkpoint, loras_dir, out_dir, *names = sys.argv[1:]
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its command line when imported
sys.path.insert(0, comfy_dir)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()  # as ComfyUI's main.py does, so --cpu is read

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

import nodes  # noqa: E402


class Complaints(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        text = record.getMessage()
        if "lora key not loaded" in text or "NOT LOADED" in text or "ERROR" in text:
            self.lines.append(text)


def patched_changes(patcher):
    """``{weight key: patched - original}`` (fp32) of every weight the patcher changes, by
    the function ComfyUI patches with (``comfy.lora.calculate_weight`` on an fp32 copy, as
    ``ModelPatcher.patch_weight_to_device`` does before rounding into the stored dtype)."""
    out = {}
    for key in sorted(patcher.patches):
        weight = comfy.utils.get_attr(patcher.model, key).detach().to(torch.float32, copy=True)
        patched = comfy.lora.calculate_weight(patcher.patches[key], weight.clone(), key)
        out[key] = patched - weight
    return out


def unet_output(patcher):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 768, generator=gen)
    patcher.patch_model()
    try:
        with torch.no_grad():
            dm = patcher.model.diffusion_model
            return dm(x.to(patcher.model_dtype()), timesteps=torch.tensor([500.0]),
                      context=context.to(patcher.model_dtype())).float()
    finally:
        patcher.unpatch_model()


folder_paths.add_model_folder_path("loras", loras_dir, is_default=True)
complaints = Complaints()
logging.getLogger().addHandler(complaints)
model, clip, _vae = comfy.sd.load_checkpoint_guess_config(
    checkpoint, output_vae=False, output_clip=True)[:3]
key_map = comfy.lora.model_lora_keys_unet(model.model, {})
key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
base_out = unet_output(model)
report = {}
for name in names:
    complaints.lines.clear()
    m, c = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    changes = {**patched_changes(m), **patched_changes(c.patcher)}
    # The file's own module names (key_map holds several spellings of each weight).
    modules = {k.split(".", 1)[0] for k in comfy.utils.load_torch_file(
        f"{loras_dir}/{name}", safe_load=True)}
    by_kohya = {n: changes[key_map[n]].contiguous() for n in modules
                if isinstance(key_map.get(n), str) and key_map[n] in changes}
    save_file(by_kohya, f"{out_dir}/{name}.changes.safetensors")
    out = unet_output(m)
    report[name] = {"complaints": list(complaints.lines), "unet_patched": len(m.patches),
                    "clip_patched": len(c.patcher.patches), "named": len(by_kohya),
                    "dtype": str(m.model_dtype()),
                    "output_change": float((out - base_out).abs().max())}
print("REPORT " + json.dumps(report))
