"""What stands between a run and its files: finite checks, run identity, resume fit.

- Nothing non-finite is written: :func:`non_finite` names the trained tensors and optimizer
  moments that hold NaN/inf, and the loop refuses to save them (:class:`NonFiniteLoss`).
- A state records what it belongs to (:func:`run_identity`: method, the network options that
  shape the trained tensors, the base model, the dataset, the seed); :func:`compare_identity`
  says what differs, as refusals or warnings; :func:`recorded_network` reads what a state was
  trained with, so a caller whose options are only defaults can take the state's instead.
- :func:`resume_into` checks every saved tensor and optimizer moment against the parameter
  it is loaded into BEFORE any copy (a rank-1 state copied into rank-4 parameters used to
  broadcast and then crash the fused optimizer), then loads it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import TsuikaConfig
from .formats.safetensors_io import safetensors_metadata
from .methods.base import MethodError
from .state import StateError, TrainingState

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss or the trained weights became NaN or infinite; the message names the last
    save that was verified finite (or says there is none)."""


# Per-parameter optimizer tensors shaped like the parameter (torch's AdamW/SGD, our AdamWBf16,
# bitsandbytes' 8-bit state1/state2).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2")
# The network options whose change makes a state's tensors mean something else, per method;
# a method not listed: every network option except dropout.
_SHAPE_OPTIONS = {"dreambooth": ("train_text_encoder",),
                  "hypernetwork": ("hypernetwork_layers", "hypernetwork_layer_norm",
                                   "hypernetwork_activation"),
                  "textual_inversion": ("token", "vectors_per_token")}
_PROBE_TENSORS = 8
_PROBE_TOLERANCE = 2e-2  # relative: a model loaded in bf16 and in fp32 must still match


def non_finite(tensors: Mapping[str, torch.Tensor], limit: int = 3) -> list[str]:
    """Names of (at most ``limit``) floating tensors in ``tensors`` holding NaN or inf.

    Args:
        tensors: name -> tensor (any device).
        limit: stop after this many.
    """
    bad: list[str] = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() \
                and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def optimizer_tensors(optimizer_state: dict) -> dict[str, torch.Tensor]:
    """``{"param 3 exp_avg": tensor, ...}`` of an optimizer ``state_dict()``."""
    out: dict[str, torch.Tensor] = {}
    for index, entry in (optimizer_state.get("state") or {}).items():
        if isinstance(entry, dict):
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    out[f"param {index} {key}"] = value
    return out


def state_non_finite(state: TrainingState) -> list[str]:
    """Which trained tensors or optimizer moments of ``state`` are not finite."""
    return (non_finite(state.trainable)
            + non_finite(optimizer_tensors(state.optimizer))
            + non_finite({f"EMA {k}": t for k, t in (state.ema or {}).items()}))[:3]


# -- identity ----------------------------------------------------------------------------------
def model_probe(module: torch.nn.Module) -> list[float]:
    """A cheap fingerprint of a model's weights: a few values at fixed places of a few fixed
    tensors (the first, middle and last element of every k-th parameter), as floats.

    Computed before any adapter is added or weight trained. Compared with a tolerance, so
    the same model loaded in another precision still matches.
    """
    params = sorted((n, p) for n, p in module.named_parameters() if p.numel())
    if not params:
        return []
    every = max(1, len(params) // _PROBE_TENSORS)
    values: list[float] = []
    for _, p in params[::every][:_PROBE_TENSORS]:
        flat = p.detach().reshape(-1)
        for i in (0, flat.numel() // 2, flat.numel() - 1):
            values.append(float(flat[i].float().cpu()))
    return values


def run_identity(config: TsuikaConfig, bundle, dataset_fingerprint: str | None) -> dict:
    """What a state belongs to, stored in its state.json as ``identity``.

    Args:
        config: the run's config.
        bundle: the base model (before adapters are added or weights trained).
        dataset_fingerprint: the dataset scan's fingerprint (None if unknown).
    """
    net = config.network
    return {"method": net.method,
            "network": {k: v for k, v in vars(net).items() if k != "method"},
            "model": {"family": bundle.family, "source": str(bundle.source_name or ""),
                      "probe": model_probe(bundle.unet)},
            "dataset": dataset_fingerprint, "seed": config.train.seed}


def _probe_differs(a: list, b: list) -> bool:
    if len(a) != len(b):
        return True
    for x, y in zip(a, b):
        if not (math.isfinite(x) and math.isfinite(y)):
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                return True
        elif abs(x - y) > _PROBE_TOLERANCE * max(abs(x), abs(y), 1e-3):
            return True
    return False


def shape_differences(method: str, recorded: Mapping, network: Mapping,
                      ) -> list[tuple[str, object, object]]:
    """``(key, recorded value, this run's value)`` of each network option that shapes the
    trained tensors of ``method`` and differs (an option the state does not record is not
    compared).

    Args:
        method: the ``network.method`` of both.
        recorded: the network options a state was trained with (:func:`recorded_network`).
        network: this run's network options (``vars(config.network)``).
    """
    keys = _SHAPE_OPTIONS.get(method) or [k for k in network if k not in ("dropout", "method")]
    return [(key, recorded[key], network.get(key)) for key in keys
            if key in recorded and recorded[key] != network.get(key)]


def recorded_network(folder: Path) -> tuple[dict | None, str]:
    """The network options (``method`` included) a state was trained with, and where they
    were read: its ``state.json`` identity, or, for a state written by an older Tsuika
    without one, the config recorded in the file saved with it (``tsuika.config``, beside
    the ``states`` folder: ``<name>-step<N>.safetensors``, or the final file whose
    ``ss_steps`` is the state's step). ``(None, "")`` when neither says.

    Args:
        folder: a state folder (``<output.dir>/states/step_<N>``), already checked
            (:func:`trainers.state.check_state`).
    """
    try:
        info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("cannot read %s: %s", folder / "state.json", e)
        return None, ""
    identity = info.get("identity") if isinstance(info, dict) else None
    if isinstance(identity, dict) and isinstance(identity.get("network"), dict):
        return {**identity["network"], "method": identity.get("method")}, "state.json"
    step = info.get("step") if isinstance(info, dict) else None
    run = folder.parent.parent
    named = sorted(run.glob(f"*-step{step:08d}.safetensors")) if isinstance(step, int) else []
    others = sorted(set(run.glob("*.safetensors")) - set(named))
    for path in named + others:
        try:
            meta = safetensors_metadata(path)
            net = json.loads(meta.get("tsuika.config", "")).get("network")
        except (OSError, ValueError, AttributeError) as e:
            log.debug("no network options in %s: %s", path, e)
            continue
        if isinstance(net, dict) and (path in named or meta.get("ss_steps") == str(step)):
            return dict(net), path.name
    return None, ""


def compare_identity(saved: dict | None, now: dict) -> tuple[list[str], list[str]]:
    """(refusals, warnings): what differs between a state's identity and this run's.

    A different method, network shape option or base model refuses the resume (the
    tensors would mean something else); a different dataset or seed only warns (training
    on more images from a state is a normal thing to do).
    """
    if not isinstance(saved, dict):
        return [], [("the state records no run identity (written by an older Tsuika); "
                     "cannot check it belongs to this run")]
    refuse: list[str] = []
    warn: list[str] = []
    if saved.get("method") != now["method"]:
        refuse.append(f"network.method: state {saved.get('method')!r}, this run "
                      f"{now['method']!r}")
    else:
        refuse += [f"network.{key}: state {was!r}, this run {is_now!r}" for key, was, is_now
                   in shape_differences(now["method"], saved.get("network") or {},
                                        now["network"])]
    old_model, new_model = saved.get("model") or {}, now["model"]
    if old_model.get("family") not in (None, new_model["family"]):
        refuse.append(f"model family: state {old_model.get('family')!r}, this run "
                      f"{new_model['family']!r}")
    elif old_model.get("probe") and _probe_differs(old_model["probe"], new_model["probe"]):
        refuse.append(f"base model: the state was trained on {old_model.get('source')!r}, "
                      f"this run loads {new_model['source']!r} (other weights)")
    if saved.get("dataset") and now.get("dataset") and saved["dataset"] != now["dataset"]:
        warn.append("the dataset changed since the state was saved (images, captions or "
                    "repeats)")
    if saved.get("seed") is not None and saved.get("seed") != now["seed"]:
        warn.append(f"train.seed: state {saved.get('seed')}, this run {now['seed']} (the run "
                    "will not repeat an uninterrupted one)")
    return refuse, warn


# -- resume --------------------------------------------------------------------------------
def check_optimizer_fits(folder: Path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a saved optimizer state whose groups or moments do not match ``optimizer``.

    Raises:
        StateError: naming the folder, the tensor and both shapes.
    """
    groups = saved.get("param_groups") or []
    now = [list(g["params"]) for g in optimizer.param_groups]
    where = f"state {str(folder)!r}: optimizer.pt"
    if len(groups) != len(now):
        raise StateError(f"{where} has {len(groups)} parameter groups, this run has "
                         f"{len(now)}; it was made with other options (network."
                         "train_text_encoder?). Resume with the options it was saved with, or "
                         "start without train.resume.")
    params: dict = {}
    for gi, (g, live) in enumerate(zip(groups, now)):
        ids = g.get("params") if isinstance(g, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live):
            n = len(ids) if isinstance(ids, list) else "?"
            raise StateError(f"{where}: group {gi} has {n} parameters, this run has "
                             f"{len(live)}; it was made with other network options. Resume "
                             "with the options it was saved with, or start without "
                             "train.resume.")
        params.update(zip(ids, live))
    for index, entry in (saved.get("state") or {}).items():
        p = params.get(index)
        if p is None:
            raise StateError(f"{where} holds moments for parameter {index!r}, which no group "
                             "names; the file is damaged. Resume from another state.")
        if not isinstance(entry, dict):
            raise StateError(f"{where}: the entry of parameter {index!r} is damaged.")
        for key in MOMENT_KEYS:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise StateError(f"{where}: {key} of parameter {index} has shape "
                                 f"{tuple(value.shape)}, the parameter it belongs to has "
                                 f"{tuple(p.shape)}; the state was made with other network "
                                 "options (network.rank?). Resume with the options it was "
                                 "saved with, or start without train.resume.")


def resume_into(folder: Path, state: TrainingState, config: TsuikaConfig, identity: dict,
                method, bundle, optimizer, lr_scheduler) -> list[str]:
    """Check that ``state`` fits this run, then load it; returns warnings to show the user.

    Nothing is copied into the model or the optimizer before every check passed.

    Args:
        folder: where ``state`` was read from (named in every message).
        state: the loaded state.
        config: this run's config.
        identity: this run's :func:`run_identity`.
        method, bundle, optimizer, lr_scheduler: what the state is loaded into.

    Raises:
        StateError: the state belongs to another run, holds NaN/inf, or does not fit.
    """
    refuse, warnings = compare_identity(state.info.get("identity"), identity)
    if refuse:
        raise StateError(f"state {str(folder)!r} belongs to another run: " + "; ".join(refuse)
                         + ". Resume with the options it was saved with, or start without "
                         "train.resume (another output.dir or output.name keeps both runs).")
    bad = state_non_finite(state)
    if bad:
        raise StateError(f"state {str(folder)!r} holds NaN or infinite values ({', '.join(bad)}"
                         "); resume from an earlier state or start without train.resume.")
    check_optimizer_fits(folder, state.optimizer, optimizer)
    try:
        method.load_trainable_state(bundle, state.trainable)
    except MethodError as e:
        raise StateError(f"state {str(folder)!r}: trainable.safetensors does not fit this run: "
                         f"{e}") from e
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise StateError(f"state {str(folder)!r}: optimizer.pt cannot be loaded ({e}); resume "
                         "from another state or start without train.resume.") from e
    try:
        lr_scheduler.load_state_dict(state.scheduler)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StateError(f"state {str(folder)!r}: scheduler.pt cannot be loaded ({e}); resume "
                         "from another state or start without train.resume.") from e
    return [f"resuming {folder}: {w}" for w in warnings]
