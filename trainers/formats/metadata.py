"""kohya ``ss_*`` and ``modelspec.*`` training metadata (all values strings).

What readers use: A1111/Forge show ``ss_tag_frequency``, ``ss_output_name`` and
``ss_sd_model_name`` and sort LoRAs by base model from ``ss_base_model_version``
(``sdxl_*``) and ``ss_v2`` (``"True"`` means SD2); kohya's tools read ``ss_network_dim`` /
``ss_network_alpha``; ModelSpec readers read ``modelspec.architecture`` / ``title`` /
``resolution``. ComfyUI applies LoRAs from the tensors alone.

:func:`training_metadata` writes what every method's file says (the run, the base model, the
data); a method adds its own on top (:func:`network_metadata` for LoRA-family files), so a
checkpoint never carries fields written for a LoRA. The family's facts
(``families.FamilyFacts``) give the base-model version, architecture and resolution.

Local paths are private: by default every path-valued field is reduced to its last component
and any other absolute path found in a value is reduced the same way.
"""

from __future__ import annotations

import datetime
import json
import logging
import ntpath
import posixpath
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


MODELSPEC_VERSION = "1.0.0"

# Fields every method's file carries, copied as they are: field name -> metadata key.
_PLAIN_FIELDS = {
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr", "text_encoder_lr": "ss_text_encoder_lr", "step": "ss_steps",
    "max_train_steps": "ss_max_train_steps", "epoch": "ss_epoch", "num_epochs": "ss_num_epochs",
    "seed": "ss_seed", "num_train_images": "ss_num_train_images",
    "batch_size": "ss_batch_size_per_device",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "optimizer": "ss_optimizer", "lr_scheduler": "ss_lr_scheduler",
    "lr_warmup_steps": "ss_lr_warmup_steps", "mixed_precision": "ss_mixed_precision",
    "noise_offset": "ss_noise_offset", "min_snr_gamma": "ss_min_snr_gamma",
    "clip_skip": "ss_clip_skip", "max_grad_norm": "ss_max_grad_norm",
    "caption_dropout_rate": "ss_caption_dropout_rate", "shuffle_caption": "ss_shuffle_caption",
    "keep_tokens": "ss_keep_tokens", "output_name": "ss_output_name",
    "training_comment": "ss_training_comment",
    "author": "modelspec.author", "description": "modelspec.description",
    "license": "modelspec.license", "tags": "modelspec.tags",
    "trigger_phrase": "modelspec.trigger_phrase", "usage_hint": "modelspec.usage_hint",
}
# Fields with their own handling in training_metadata().
_SPECIAL_FIELDS = ("base_model_version", "base_model_name", "prediction_type", "resolution",
                   "started_at", "finished_at", "title", "dataset_dirs", "tag_frequency",
                   "extra")
# What a LoRA-family (network) file adds, copied as they are (network_args is JSON).
_NETWORK_FIELDS = {
    "network_module": "ss_network_module", "network_dim": "ss_network_dim",
    "network_alpha": "ss_network_alpha", "conv_dim": "ss_conv_dim",
    "conv_alpha": "ss_conv_alpha",
}
# Values that are JSON documents (read_metadata decodes them).
JSON_KEYS = ("ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_bucket_info",
             "ss_datasets", "ss_network_args", "lora_adapter_metadata",
             "tsuika.config")
# Config sections/keys that hold local paths (relative ones too: "data/class" names a local
# folder as much as "/home/me/data/class"); any key named dir/path or ending in _dir/_path is
# one as well, so a later option cannot be forgotten here.
_CONFIG_PATHS = (("model", "path"), ("data", "dir"), ("data", "cache_dir"), ("data", "class_dir"),
                 ("output", "dir"), ("train", "resume"), ("network", "init_lora"))


def _is_path_key(section: str, key: str) -> bool:
    return ((section, key) in _CONFIG_PATHS or key in ("dir", "path")
            or key.endswith(("_dir", "_path")))


def is_absolute_path(value: str) -> bool:
    """POSIX (``/home/x``), home (``~/x``) or Windows (``C:\\x``, ``\\\\server\\x``) path."""
    return (posixpath.isabs(value) or value == "~" or value.startswith(("~/", "~\\"))
            or ntpath.isabs(value) and ("\\" in value or ":" in value))


def path_name(value: str) -> str:
    """The last component of a POSIX or Windows path (``/a/b/`` -> ``b``)."""
    value = value.rstrip("/\\")
    return ntpath.basename(posixpath.basename(value)) or value


def _scrub(value: Any) -> Any:
    """``value`` with every absolute path string reduced to its last component."""
    if isinstance(value, str):
        return path_name(value) if is_absolute_path(value) else value
    if isinstance(value, Mapping):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _resolution(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"resolution = {value!r}: give an int (512) or a (width, height) pair.")


def fields_from_config(config) -> dict[str, Any]:
    """The metadata fields a ``TsuikaConfig`` determines for every method (see
    :func:`training_metadata`)."""
    c = config
    fields: dict[str, Any] = {
        "learning_rate": c.train.learning_rate, "unet_lr": c.train.learning_rate,
        "max_train_steps": c.train.steps, "seed": c.train.seed,
        "resolution": c.data.resolution, "batch_size": c.train.batch_size,
        "gradient_accumulation_steps": c.train.gradient_accumulation,
        "optimizer": c.train.optimizer, "lr_scheduler": c.train.lr_scheduler,
        "lr_warmup_steps": c.train.lr_warmup_steps, "mixed_precision": c.train.mixed_precision,
        "noise_offset": c.train.noise_offset, "min_snr_gamma": c.train.min_snr_gamma,
        "max_grad_norm": c.train.max_grad_norm, "output_name": c.output.name,
        "caption_dropout_rate": c.data.caption_dropout, "shuffle_caption": c.data.shuffle_tags,
        "keep_tokens": c.data.keep_tokens,
    }
    if c.network.train_text_encoder:
        fields["text_encoder_lr"] = c.train.text_encoder_lr
    if c.data.dir:
        fields["dataset_dirs"] = [c.data.dir]
    if c.data.trigger_word:
        fields["trigger_phrase"] = c.data.trigger_word
    return fields


def network_fields_from_config(config) -> dict[str, Any]:
    """The LoRA-family fields a ``TsuikaConfig`` determines (see :func:`network_metadata`)."""
    net = config.network
    fields: dict[str, Any] = {"network_dim": net.rank, "network_alpha": net.alpha}
    if net.conv_rank:
        fields["conv_dim"], fields["conv_alpha"] = net.conv_rank, net.conv_alpha
    return fields


def _config_json(config, include_paths: bool) -> str:
    data = json.loads(json.dumps(config.to_dict(), default=str))
    if not include_paths:
        for section, values in data.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                if value and isinstance(value, str) and _is_path_key(section, key):
                    values[key] = path_name(value)
        data = _scrub(data)
    return _json(data)


def training_metadata(config=None, *, include_paths: bool = False,
                      **fields: Any) -> dict[str, str]:
    """kohya ``ss_*`` + ``modelspec.*`` metadata every trained file carries; every value a
    string. A method adds its own fields on top (a LoRA: :func:`network_metadata`).

    Args:
        config: optional ``TsuikaConfig``; its options fill the fields (explicit fields win)
            and it is stored, paths scrubbed, as ``tsuika.config``.
        include_paths: keep local folder paths; by default only their last component is
            written (``ss_dataset_dirs`` keyed by folder name, ``ss_sd_model_name`` a file
            name) and any absolute path inside a value is reduced the same way.
        **fields: ``step`` (the step saved, ``ss_steps``), ``base_model_version`` (a
            registered family's name, ``sd15``, or its kohya version, ``sd_v1``),
            ``base_model_name``, ``prediction_type`` (``epsilon`` or
            ``v_prediction``), ``resolution`` (int or (w, h)), ``started_at`` /
            ``finished_at`` (Unix time; finished defaults to now), ``title`` (defaults to
            ``output_name``), ``dataset_dirs`` (list of folders, or ``{folder: {"n_repeats",
            "img_count"}}``), ``tag_frequency`` (``{folder: {tag: count}}``),
            ``extra`` (``{key: str}`` copied as is), and the plain
            fields listed in ``_PLAIN_FIELDS`` (learning rates, seed, optimizer ...).

    Raises:
        TypeError: an unknown field (the message lists the known ones).
        ValueError: an unknown ``base_model_version`` or a bad ``resolution``.
    """
    if config is not None:
        fields = {**fields_from_config(config), **{k: v for k, v in fields.items()
                                                    if v is not None}}
    unknown = sorted(set(fields) - set(_PLAIN_FIELDS) - set(_SPECIAL_FIELDS))
    if unknown:
        raise TypeError(f"training_metadata got unknown fields {unknown}; known fields: "
                        f"{', '.join(sorted([*_PLAIN_FIELDS, *_SPECIAL_FIELDS]))}.")
    from ..families import family_facts

    facts = family_facts(str(fields.get("base_model_version") or "sd15"))
    v_pred = str(fields.get("prediction_type") or "epsilon") in ("v_prediction", "v")
    finished = float(fields.get("finished_at") or time.time())
    width, height = _resolution(fields.get("resolution") or facts.resolution)

    meta: dict[str, str] = {}
    for name, key in _PLAIN_FIELDS.items():
        if fields.get(name) is not None:
            meta[key] = str(fields[name])
    meta.update({
        "ss_base_model_version": facts.base_model_version, "ss_v2": str(facts.v2),
        "ss_v_parameterization": str(v_pred), "ss_resolution": f"({width}, {height})",
        "ss_training_finished_at": str(finished),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": facts.architecture,
        "modelspec.implementation": facts.implementation,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
    })
    if fields.get("started_at") is not None:
        meta["ss_training_started_at"] = str(float(fields["started_at"]))
    title = fields.get("title") or fields.get("output_name")
    if title:
        meta["modelspec.title"] = str(title)
    if fields.get("base_model_name"):
        name = str(fields["base_model_name"])
        meta["ss_sd_model_name"] = name if include_paths else path_name(name)
    dirs = fields.get("dataset_dirs")
    if dirs:
        dirs = dirs if isinstance(dirs, Mapping) else {str(d): {} for d in dirs}
        meta["ss_dataset_dirs"] = _json(dirs if include_paths else
                                        {path_name(str(k)): v for k, v in dirs.items()})
    tags = fields.get("tag_frequency")
    if tags:
        meta["ss_tag_frequency"] = _json(tags if include_paths else
                                         {path_name(str(k)): v for k, v in tags.items()})
    if config is not None:
        meta["tsuika.config"] = _config_json(config, include_paths)
    for key, value in (fields.get("extra") or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"extra metadata {key!r} = {value!r}: keys and values must be "
                            "strings.")
        meta[key] = value
    if not include_paths:
        meta = {k: _scrub_value(k, v) for k, v in meta.items()}
    return meta


def network_metadata(metadata: Mapping[str, str], config=None, *, include_paths: bool = False,
                     **fields: Any) -> dict[str, str]:
    """``metadata`` (from :func:`training_metadata`) plus what a LoRA-family file says of its
    network: ``ss_network_module`` / ``_dim`` / ``_alpha``, ``ss_conv_*``,
    ``ss_network_args``, and ``/lora`` on ``modelspec.architecture``.

    Args:
        metadata: the run's method-neutral metadata.
        config: optional ``TsuikaConfig``; its network options fill the fields (explicit
            fields win).
        include_paths: keep absolute paths in ``network_args`` (by default reduced to their
            last component, as :func:`training_metadata` does).
        **fields: ``network_module`` (default ``networks.lora``), ``network_dim``,
            ``network_alpha``, ``conv_dim``, ``conv_alpha``, ``network_args`` (dict).

    Raises:
        TypeError: an unknown field (the message lists the known ones).
    """
    if config is not None:
        fields = {**network_fields_from_config(config),
                  **{k: v for k, v in fields.items() if v is not None}}
    known = [*_NETWORK_FIELDS, "network_args"]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise TypeError(f"network_metadata got unknown fields {unknown}; known fields: "
                        f"{', '.join(sorted(known))}.")
    fields.setdefault("network_module", "networks.lora")
    meta = dict(metadata)
    for name, key in _NETWORK_FIELDS.items():
        if fields.get(name) is not None:
            meta[key] = str(fields[name])
    if fields.get("network_args"):
        args = _json(fields["network_args"])
        meta["ss_network_args"] = args if include_paths else _scrub_value("ss_network_args", args)
    if "modelspec.architecture" in meta and not meta["modelspec.architecture"].endswith("/lora"):
        meta["modelspec.architecture"] += "/lora"
    return meta


def _scrub_value(key: str, value: str) -> str:
    if key in JSON_KEYS:
        try:
            return _json(_scrub(json.loads(value)))
        except json.JSONDecodeError:
            pass
    return _scrub(value)


def read_metadata(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """A file's metadata with the JSON-valued keys (``ss_tag_frequency`` ...) decoded.

    Values that should be JSON but are not are kept as strings (with a warning): metadata
    written by other tools is informative, never a reason to refuse a file.

    Args:
        metadata: the string metadata of a safetensors file (may be None).
    """
    out: dict[str, Any] = dict(metadata or {})
    for key in JSON_KEYS:
        raw = out.get(key)
        if not isinstance(raw, str) or not raw.strip():
            continue
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError as e:
            log.warning("metadata %s is not valid JSON (%s); kept as text", key, e)
    return out
