"""kohya ``ss_*`` and ``modelspec.*`` training metadata (all values strings)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def training_metadata(config, step: int, base_model_name: str, base_model_version: str,
                      prediction_type: str, started_at: float,
                      include_paths: bool = False) -> dict[str, str]:
    """Metadata of a trained LoRA; local paths only when ``include_paths``."""
    c = config
    data_dir = Path(c.data.dir)
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(c.network.rank),
        "ss_network_alpha": str(c.network.alpha), "ss_learning_rate": str(c.train.learning_rate),
        "ss_text_encoder_lr": str(c.train.text_encoder_lr), "ss_unet_lr": str(c.train.learning_rate),
        "ss_steps": str(step), "ss_max_train_steps": str(c.train.steps), "ss_seed": str(c.train.seed),
        "ss_resolution": f"({c.data.resolution}, {c.data.resolution})",
        "ss_base_model_version": "sd_v1" if base_model_version == "sd15" else base_model_version,
        "ss_sd_model_name": base_model_name, "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(time.time()), "ss_output_name": c.output.name,
        "ss_v2": str(prediction_type == "v_prediction"), "ss_batch_size_per_device": str(c.train.batch_size),
        "ss_gradient_accumulation_steps": str(c.train.gradient_accumulation),
        "ss_optimizer": c.train.optimizer, "ss_lr_scheduler": c.train.lr_scheduler,
        "ss_mixed_precision": c.train.mixed_precision, "ss_noise_offset": str(c.train.noise_offset),
        "ss_min_snr_gamma": str(c.train.min_snr_gamma),
        "ss_dataset_dirs": json.dumps({data_dir.name: {}} if not include_paths else {str(data_dir): {}}),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": c.output.name, "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tsuika.config": json.dumps(c.to_dict() if include_paths else _scrub(c.to_dict())),
    }
    return meta


def _scrub(d: dict) -> dict:
    out = json.loads(json.dumps(d))
    for sec, key in (("model", "path"), ("data", "dir"), ("output", "dir"), ("data", "cache_dir"),
                     ("train", "resume")):
        if out[sec].get(key):
            out[sec][key] = Path(out[sec][key]).name
    return out
