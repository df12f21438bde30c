"""An SDXL LoRA trained by Tsuika (UNet and both text encoders) loads in diffusers'
``StableDiffusionXLPipeline.load_lora_weights`` with every key used and no complaint.

The pipeline is built from the ``sdxl-tiny`` fixture's diffusers folder, offline."""

import logging
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    from tsuika.trainers.config import build_config
    from tsuika.trainers.fixtures import write_fixture
    from tsuika.trainers.loop import train

    tmp = tmp_path_factory.mktemp("sdxl_lora")
    model = write_fixture("sdxl-tiny", tmp / "model", seed=0)
    cfg = build_config(overrides=[
        f"model.path={model['diffusers']}", f"data.dir={ROOT / 'examples/sample_data/heart'}",
        f"output.dir={tmp / 'out'}", "network.train_text_encoder=true", "network.rank=4",
        "train.steps=2", "data.resolution=64", "train.device=cpu",
        "train.learning_rate=1e-2", "train.text_encoder_lr=1e-2", "output.save_dtype=fp32"])
    return model["diffusers"], train(cfg).file_path


def test_diffusers_sdxl_pipeline_loads_every_key_of_our_lora(sdxl_lora):
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    folder, lora = sdxl_lora
    with safe_open(str(lora), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys() if k.endswith(".lora_down.weight")}
    by_prefix = {p: {m for m in modules if m.startswith(p)}
                 for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert all(by_prefix.values()), {p: len(v) for p, v in by_prefix.items()}
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73])
    before = pipe.text_encoder_2(ids)[0]
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(lora))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    problems = [r.getMessage() for r in handler.records] + [str(w.message) for w in caught]
    assert problems == [], problems
    adapted = {name: sum(isinstance(m, BaseTunerLayer) for m in module.modules())
               for name, module in (("lora_unet_", pipe.unet), ("lora_te1_", pipe.text_encoder),
                                    ("lora_te2_", pipe.text_encoder_2))}
    # every module of the file became one adapted layer in its component, none extra
    assert adapted == {p: len(v) for p, v in by_prefix.items()}, adapted
    assert not torch.allclose(pipe.text_encoder_2(ids)[0], before)  # it changes the output
