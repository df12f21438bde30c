"""The models side of the host bridge: ComfyUI's loaded MODEL / CLIP / VAE as the backend's
diffusers modules, sharing ComfyUI's tensors wherever the run never writes into them.

Why sharing: ComfyUI keeps its own copy of the model loaded while a train node runs (the
graph samples with it afterwards), so every weight the bundle copies is held twice. Frozen
weights (the VAE, text encoders a method does not fine-tune, the UNet under an adapter
method) are only read by training, so the bundle's modules hold views of ComfyUI's storage.
Weights a method trains in place (DreamBooth's UNet, its text encoders when trained) get
their own copy. Everything else a run does to a module replaces tensors instead of writing
into them (peft wrapping, dtype and device moves, the CPU conv packing, EMA swaps), which
``tests/host_scripts/host_untouched.py`` checks on a real ComfyUI: its model gives the same
output after a training as before.
"""

from __future__ import annotations

import gc
import logging

import torch

from ..trainers.families.base import ModelBundle

log = logging.getLogger(__name__)

# ComfyUI's ModelType names -> the prediction types the backend trains. EDM and flow
# models (Playground v2.5, EDM v-prediction fine-tunes) have other noise schedules: training
# them with the DDPM schedule would teach the wrong thing, so they are refused by name.
HOST_PREDICTION = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


def supported_comfy_models() -> dict[str, str]:
    """ComfyUI model-config class name -> backend family name, read from the families' facts
    (a new family lists its host models there, not here)."""
    from ..trainers.families import FAMILIES

    return {kind: f.name for f in FAMILIES.values() for kind in f.facts.host_models}


def comfy_family(model) -> str:
    """The backend family of a ComfyUI MODEL, or a clear error naming what it is (its kind,
    or a noise schedule the backend does not train)."""
    from ..trainers.families import FAMILIES, family_for_host_model

    kind = type(model.model.model_config).__name__
    family = family_for_host_model(kind)
    if family is None:
        names = " or ".join(f.facts.display_name for f in FAMILIES.values())
        raise ValueError(f"model: this is a {kind} model; Tsuika trains "
                         f"{', '.join(supported_comfy_models())} models so far. Load an "
                         f"{names} checkpoint with Load Checkpoint.")
    host_prediction_type(model)
    return family.name


def host_prediction_type(model) -> str:
    """The prediction type of a ComfyUI MODEL as the backend names it; a clear error for a
    model ComfyUI samples with another schedule (EDM, flow)."""
    schedule = model.model.model_type.name
    if schedule not in HOST_PREDICTION:
        raise ValueError(f"model: ComfyUI loaded this checkpoint as a {schedule} model; Tsuika "
                         f"trains {' and '.join(HOST_PREDICTION.values())} models only (model "
                         f"types {', '.join(HOST_PREDICTION)}). Load an epsilon or "
                         "v-prediction checkpoint.")
    return HOST_PREDICTION[schedule]


def free_host_memory() -> None:
    """Unload every model ComfyUI holds (also un-patching LoRAs baked into shared weights)."""
    import comfy.model_management as mm

    from ..trainers.device.host_memory import give_back_freed_memory

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    give_back_freed_memory()  # freed heap pages back to the OS: the server's RSS shrinks too


def offload_host_copies(model, clip, vae) -> list[str]:
    """Move ComfyUI's copies of MODEL / CLIP / VAE that still sit on an accelerator after
    unloading to the CPU, so training has the device to itself (VRAM near the CLI's).

    In ComfyUI's default memory modes unloading already puts them in RAM; with
    ``--highvram`` / ``--gpu-only`` the offload device is the GPU itself and they would stay
    there beside the training copy. ComfyUI moves them back by itself the next time a node
    needs them (its own ``unpatch_model(device_to=...)`` also records where they are).
    Returns the names of what was moved."""
    moved = []
    cpu = torch.device("cpu")
    for name, patcher in (("MODEL", model), ("CLIP", getattr(clip, "patcher", None)),
                          ("VAE", getattr(vae, "patcher", None))):
        module = getattr(patcher, "model", None)
        if not isinstance(module, torch.nn.Module):
            continue
        tensors = (*module.parameters(), *module.buffers())
        if any(t.device.type != "cpu" for t in tensors):
            patcher.unpatch_model(device_to=cpu)
            moved.append(name)
    if moved:
        log.info("moved ComfyUI's %s to the CPU while training", ", ".join(moved))
    return moved


def written_components(config) -> set[str]:
    """The bundle components whose own weights a run with ``config`` writes into (so they
    cannot share ComfyUI's tensors): the UNet, and the text encoders when trained, of a
    method that trains base weights (DreamBooth). Adapter methods, textual inversion and
    hypernetworks leave every base weight as it is. ``"text_encoders"`` stands for all of
    the family's text encoders.

    Args:
        config: the run's checked ``TsuikaConfig``.
    """
    from ..trainers.methods import get_method

    method = get_method(config.network.method)
    if not method.trains_base_weights:
        return set()
    return {"unet", "text_encoders"} if method.trains_text_encoder(config) else {"unet"}


def shared_view(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor over ``t``'s storage (no copy).

    ComfyUI loads models under ``torch.inference_mode``: its weights are inference tensors,
    which can neither become parameters outside that mode nor be saved for backward (a
    frozen LoRA base layer's weight is: the input's gradient needs it). A tensor made on the
    same storage is an ordinary one, and autograd saves it like any other."""
    if not t.is_inference():
        return t.detach()
    with torch.inference_mode(False):
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def host_storages(bundle: ModelBundle, pointers: set[int]) -> dict[str, int]:
    """Bytes of each bundle module's tensors that lie in ComfyUI's storage (``pointers``:
    the storages' data pointers), by component name (``vae`` included)."""
    out = {}
    for name, module in {**bundle.components, "vae": bundle.vae}.items():
        out[name] = sum(t.numel() * t.element_size()
                        for t in (*module.parameters(), *module.buffers())
                        if t.numel() and t.untyped_storage().data_ptr() in pointers)
    return out


def _own_copies(module: torch.nn.Module, pointers: set[int]) -> None:
    """Give ``module`` its own copy of every tensor still in ComfyUI's storage."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for t in store.values():
                if t is not None and t.numel() and t.untyped_storage().data_ptr() in pointers:
                    t.data = t.data.clone()


def bundle_from_comfy(model, clip, vae, written: set[str] | frozenset = frozenset()
                      ) -> ModelBundle:
    """The user's loaded model as the backend's modules, sharing ComfyUI's tensors.

    Args:
        model, clip, vae: ComfyUI's MODEL, CLIP and VAE (from Load Checkpoint).
        written: the components the caller writes into (``written_components``), which get
            their own copies: ``"unet"``, ``"text_encoders"``. Everything else shares
            ComfyUI's storage in ComfyUI's dtype; the run casts what its compute needs.
    """
    from ..trainers.families import get_family

    family = get_family(comfy_family(model))
    pred = host_prediction_type(model)
    free_host_memory()  # unpatches shared weights, so we read the originals
    offload_host_copies(model, clip, vae)
    with torch.inference_mode(False):
        # ComfyUI hands back the original checkpoint layout, which the family's own hook reads.
        sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
        pointers = {t.untyped_storage().data_ptr() for t in sd.values() if t.numel()}
        for key in list(sd):
            sd[key] = shared_view(sd[key])
        if getattr(model.model.model_config, "sampling_settings", {}).get("zsnr"):
            # ComfyUI read the file's "ztsnr" marker into its sampling settings and does not
            # write it back: put it where a single file has it.
            sd["ztsnr"] = torch.tensor([])
        # dtype None: each tensor stays in ComfyUI's dtype (no cast here that the run would
        # redo); consume: the dict lets go of each tensor once its module holds it.
        bundle = family.bundle_from_ldm(sd, source_name="ComfyUI model", prediction_type=pred,
                                        dtype=None, consume=True)
        for name, module in bundle.components.items():
            if name in written or ("text_encoders" in written and name != "unet"):
                _own_copies(module, pointers)
    shared = host_storages(bundle, pointers)
    log.info("bundle from ComfyUI's model: MiB shared with ComfyUI per component %s",
             {k: round(v / 2**20) for k, v in shared.items()})
    bundle.extra["host_shared_bytes"] = shared
    return bundle


def apply_lora(model, clip, lora: dict, strength_model: float, strength_clip: float):
    """MODEL and CLIP clones with ``lora`` patched in (the originals are untouched)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, dict(lora), strength_model,
                                         strength_clip)


def load_checkpoint(path, with_clip: bool = True, with_vae: bool = False):
    """(MODEL, CLIP, VAE) of a single-file checkpoint, as Load Checkpoint gives them; CLIP and
    VAE are None unless asked for (a trained checkpoint's VAE is the graph's own)."""
    import comfy.sd
    import folder_paths

    out = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=with_vae, output_clip=with_clip,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return out[0], out[1], out[2]
