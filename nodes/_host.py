"""The one bridge between Tsuika's backend and the ComfyUI host.

Everything that touches ComfyUI internals lives here or in ``_host_models`` (the models side:
the user's loaded MODEL / CLIP / VAE as the backend's modules sharing ComfyUI's tensors,
freeing ComfyUI's memory, applying a LoRA to MODEL + CLIP, re-exported here): progress and
cancel, web events, folders, a run's lifecycle in the server. The node modules stay thin
callers of this and of ``trainers/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from pathlib import Path

import torch

from ..trainers.callbacks import Callbacks, SaveInfo, StepInfo
from ._host_models import (  # noqa: F401  (the bridge's one name space for the node modules)
    HOST_PREDICTION,
    apply_lora,
    bundle_from_comfy,
    comfy_family,
    free_host_memory,
    host_prediction_type,
    load_checkpoint,
    offload_host_copies,
    supported_comfy_models,
    written_components,
)

log = logging.getLogger(__name__)


class LoraDict(dict):
    """A LORA_MODEL value: kohya-named tensors (what ComfyUI's own LoRA nodes accept), plus the
    training metadata our Save node writes into the file."""

    metadata: dict[str, str]

    def __init__(self, tensors: dict, metadata: dict | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


def _drop_frame_locals(exc: BaseException | None) -> None:
    """Release what the frames of a failed run hold (the model copy, adapters, optimizer).

    ComfyUI's executor catches a failed node's error with a ``sys.exc_info()`` local: a
    reference cycle with the traceback that only a garbage collection breaks, and ComfyUI
    collects at most every 10 s after a prompt. Without this, a failed or cancelled training
    keeps its whole model copy alive until then, into the next run if one is queued. The
    traceback's file/line text stays for the error dialog."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # skips frames still running (this one's)
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def leave_host_as_found():
    """Around one training in the server: whether it ends, fails or is cancelled, nothing of
    the run stays alive afterwards and the memory goes back to the host."""
    try:
        yield
    except BaseException as e:
        _drop_frame_locals(e)
        raise
    finally:
        free_host_memory()


def run_dir(name: str) -> Path:
    """A new folder for one training run under ComfyUI's output directory (``name`` has been
    checked to be a plain file name; it is never rewritten)."""
    import time

    import folder_paths

    base = Path(folder_paths.get_output_directory()) / "tsuika" / name
    return base / time.strftime("run_%Y%m%d-%H%M%S")


def cache_dir() -> Path:
    """Latent caches shared by all runs (entries are keyed by content, never stale)."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "tsuika" / ".cache"


def class_images_dir(prompt: str, resolution, model) -> Path:
    """The folder of class images the base model draws for prior preservation, under
    ComfyUI's output: one per class prompt, resolution and base model (a fingerprint of a few
    of its weights), so a later run with the same ones reuses them and another model or
    prompt never does."""
    import hashlib
    import re

    import folder_paths

    digest = hashlib.sha256(f"{prompt}\n{resolution}\n".encode())
    with torch.inference_mode(False):
        tensors = list(model.model.diffusion_model.state_dict().values())
        for t in (tensors[0], tensors[-1]):  # small: the first conv, the last norm or conv
            digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40] or "class"
    return (Path(folder_paths.get_output_directory()) / "tsuika" / "class_images"
            / f"{slug}-{digest.hexdigest()[:12]}")


def latest_state(name: str) -> tuple[str, list[str]]:
    """The newest sound resumable state of runs named ``name`` (newest run first), and one
    report line per newer state passed over because it is damaged (kept, never deleted); a
    clear error when there is none."""
    import folder_paths

    from ..trainers.state import newest_sound_state

    base = Path(folder_paths.get_output_directory()) / "tsuika" / name
    state, passed = newest_sound_state(sorted(base.glob("run_*"), reverse=True))
    # Named within the training's folder: the run and the step say which one it is.
    skipped = [f"skipped state {folder.parent.parent.name}/{folder.name}: {e.reason} (kept as "
               "it is)" for folder, e in passed]
    if state is not None:
        return str(state), skipped
    if skipped:
        raise ValueError(f"resume: no saved state of a training named {name!r} can be used: "
                         + "; ".join(skipped) + ". Turn 'resume' off to start again.")
    raise ValueError(f"resume: there is no saved state of a training named {name!r} yet; "
                     "turn 'resume' off to start one (a cancelled training saves one).")


def publish_partial(src: str | Path, name: str, step: int, kind: str = "loras",
                    suffix: str = ".safetensors") -> str:
    """Copy a cancelled run's file into ComfyUI's ``kind`` folder (``loras``, ``checkpoints``,
    ``embeddings``, ``hypernetworks``) as ``<name>-partial-step<N>``, so that folder's loader
    lists it; never over an existing file. Returns the file name. A copy (a hard link where
    it can: a partial checkpoint is GBs) rather than registering the run folder as a models
    path: that would list every intermediate save and every resumable state file in the
    loader too."""
    return publish_file(src, f"{name}-partial-step{step}", kind, link=True, suffix=suffix)


def publish_file(src: str | Path, stem: str, kind: str, link: bool = False,
                 suffix: str = ".safetensors") -> str:
    """Put ``src`` into ComfyUI's first ``kind`` folder as ``<stem><suffix>``, or
    ``<stem>-2``, ``-3``... when that name is taken: never over an existing file, and it
    appears complete at once. Returns the file name.

    Args:
        src: the file (in a run folder).
        stem: the file name without extension (a checked plain name).
        kind: the ComfyUI models folder kind.
        link: share the run folder's file (a hard link: no second copy on disk, which matters
            for a multi-GB checkpoint) where both lie on one file system; a copy otherwise.
            The run's files are written atomically (a new file replaces the old name), so a
            later save in the run folder never changes the published file.
        suffix: the published file's extension (a hypernetwork's is ``.pt``).
    """
    import shutil

    folder = models_dir(kind)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.tmp"
    try:
        if not link:
            raise OSError("copy asked")
        os.link(src, tmp)
    except OSError:  # another file system (or asked): a copy
        shutil.copyfile(src, tmp)
    try:
        for i in range(1, 100):
            target = folder / (f"{stem}{suffix}" if i == 1 else f"{stem}-{i}{suffix}")
            try:
                os.link(tmp, target)  # appears complete at once, and never replaces a file
                return target.name
            except FileExistsError:
                continue
        raise FileExistsError(f"{stem}{suffix} and 98 numbered copies exist in {folder}")
    finally:
        tmp.unlink(missing_ok=True)


def interrupted() -> None:
    """End the node as ComfyUI's ordinary interruption (what its Cancel button does)."""
    import comfy.model_management as mm

    raise mm.InterruptProcessingException()


def loras_dir() -> Path:
    """The folder Save LoRA writes into: ComfyUI's first ``loras`` folder."""
    return models_dir("loras")


def models_dir(kind: str) -> Path:
    """ComfyUI's first folder of a models kind (``loras``, ``checkpoints``, ...): the one its
    loader lists first and the pack writes into."""
    import folder_paths

    return Path(folder_paths.get_folder_paths(kind)[0])


def checkpoints_dir() -> Path:
    """The folder the tools write checkpoints into: ComfyUI's first ``checkpoints`` folder."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("checkpoints")[0])


def metadata_allowed() -> bool:
    """False when the server runs with ``--disable-metadata`` (no workflow in saved files)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return True
    return not getattr(args, "disable_metadata", False)


def emit(event: str, payload: dict) -> None:
    """Send a ``tsuika.*`` web event to the client that queued the prompt (if a server runs)."""
    try:
        import server
    except ImportError:
        return
    inst = getattr(server.PromptServer, "instance", None)
    if inst is not None:
        inst.send_sync(event, payload, inst.client_id)


class ComfyProgress(Callbacks):
    """Progress bar (one update per step, also ComfyUI's cancel check), sample previews and
    the live loss chart. A cancel becomes a graceful stop: the loop saves and says where."""

    def __init__(self, node_id: str | None, total: int):
        import comfy.utils

        self.node_id = node_id
        self.total = total
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.stop = False
        self.messages: list[str] = []
        self.start_info: dict = {}

    def on_start(self, info: dict) -> None:
        self.start_info = info

    def _update(self, value: int, preview=None) -> None:
        import comfy.model_management as mm

        try:
            self.bar.update_absolute(value, self.total, preview)
        except mm.InterruptProcessingException:
            self.stop = True

    def on_step(self, info: StepInfo) -> None:
        self._update(info.step)
        emit("tsuika.loss", {"node": self.node_id, "step": info.step, "total": info.total_steps,
                             "loss": info.loss, "lr": info.learning_rate})

    def on_sample(self, step, images, prompts) -> None:
        if images:
            from ..trainers.report import image_grid

            self._update(step, ("JPEG", image_grid([images]), 512))

    def on_save(self, info: SaveInfo) -> None:
        emit("tsuika.saved", {"node": self.node_id, "step": info.step, "path": info.file_path})

    def on_message(self, text: str) -> None:
        log.info("%s", text)
        self.messages.append(text)

    def should_stop(self) -> bool:
        if not self.stop:
            import comfy.model_management as mm

            if mm.processing_interrupted():
                self.stop = True
                try:  # consume the one-shot flag: the node reports the stop itself
                    mm.throw_exception_if_processing_interrupted()
                except mm.InterruptProcessingException:
                    pass
        return self.stop


def images_to_tensor(images: list) -> torch.Tensor:
    """PIL images (same size) as a ComfyUI IMAGE batch [B, H, W, C] in 0..1."""
    import numpy as np

    if not images:
        return torch.zeros((1, 64, 64, 3))
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr)
