"""A measuring probe that ``server_memory.py`` installs as a one-file custom node in the
benchmark's own ComfyUI base directory (never part of the pack): ``GET /tsuika_probe`` reports
what a finished training could have left behind in the server process.

ComfyUI's prompt worker collects garbage itself after a prompt (at most every 10 s). The probe
takes one snapshot just before each of those collections: what a finished prompt left for
the collector (reference cycles still holding a model copy, say) shows there, whichever of the
two (worker or HTTP poll) comes first. It only reads: live tensors and their bytes (storages
counted once), live torch modules and
adapter layers, the models ComfyUI keeps loaded, threads, torch's thread count and global RNG,
and the garbage collector's view. Tensors owned by the models ComfyUI holds are reported apart,
so what is left is memory nobody should be holding.
"""

import gc
import hashlib
import sys
import threading
import time

import torch
from aiohttp import web

import comfy.model_management as mm
from server import PromptServer

NODE_CLASS_MAPPINGS: dict = {}


def _storage_key(t):
    try:
        return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return None


_real_collect = gc.collect
_before_host_gc: dict = {}


def snapshot(collect: bool = True) -> dict:
    if collect:
        _real_collect()
    host = set()
    for loaded in list(mm.current_loaded_models):
        model = loaded.model.model if loaded.model is not None else None
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                key = _storage_key(t)
                if key:
                    host.add(key)
    storages, modules, adapters, module_classes = {}, 0, 0, {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key and key[1]:
                storages[key] = key[1]
        elif isinstance(obj, torch.nn.Module):
            modules += 1
            name = type(obj).__module__ + "." + type(obj).__name__
            module_classes[name] = module_classes.get(name, 0) + 1
            if type(obj).__module__.startswith("peft."):
                adapters += 1
    ours = {k: v for k, v in storages.items() if k not in host}
    top = sorted(module_classes.items(), key=lambda kv: -kv[1])[:8]
    return {
        "tensor_storages": len(storages),
        "tensor_mib": sum(storages.values()) / 2**20,
        "tensor_mib_outside_loaded_models": sum(ours.values()) / 2**20,
        "modules": modules,
        "peft_modules": adapters,
        "top_module_classes": top,
        "comfy_loaded_models": len(mm.current_loaded_models),
        "threads": threading.active_count(),
        "torch_threads": torch.get_num_threads(),
        "rng_sha": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12],
        "gc_garbage": len(gc.garbage),
        "gc_objects": len(gc.get_objects()),
        "time": time.time(),
    }


def _collect_watching(*args, **kwargs):
    if sys._getframe(1).f_code.co_name == "prompt_worker":  # ComfyUI's own, after a prompt
        _before_host_gc.clear()
        _before_host_gc.update(snapshot(collect=False))
    return _real_collect(*args, **kwargs)


gc.collect = _collect_watching


@PromptServer.instance.routes.get("/tsuika_probe")
async def _probe(request):
    return web.json_response({"now": snapshot(request.query.get("collect", "1") != "0"),
                              "before_host_gc": dict(_before_host_gc)})
