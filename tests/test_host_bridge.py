"""The host bridge knows no family: it finds one through the families' facts and lets the
family's own hook build the bundle from what ComfyUI holds (an original-layout state dict)."""

import types

import pytest
import torch

from tsuika.trainers.families import FAMILIES, family_facts, family_for_host_model
from tsuika.trainers.formats.lora_keys import COMPONENTS
from tsuika.trainers.formats.safetensors_io import load_safetensors


class _FakeComfyModel:
    """The parts of a ComfyUI MODEL / CLIP / VAE the bridge reads."""

    def __init__(self, kind: str, ldm: dict, v_prediction: bool = False):
        config_cls = type(kind, (), {})
        model_type = types.SimpleNamespace(name="V_PREDICTION" if v_prediction else "EPS")
        self.model = types.SimpleNamespace(
            model_config=config_cls(), model_type=model_type,
            state_dict_for_saving=lambda clip_sd, vae_sd: dict(ldm))


def test_the_host_model_table_comes_from_the_families():
    from tsuika.nodes import _host

    table = _host.supported_comfy_models()
    assert table == {kind: f.name for f in FAMILIES.values() for kind in f.facts.host_models}
    assert table["SD15"] == "sd15" and family_for_host_model("SDXL").name == "sdxl"
    assert family_for_host_model("SD3") is None
    for family in FAMILIES.values():
        # Every fact a family states names things the rest of the code knows.
        assert family_facts(family.name) is family.facts
        assert family_facts(family.facts.base_model_version) is family.facts
        assert all(te in COMPONENTS for te in family.facts.text_encoders), family.name


def test_bundle_from_comfy_uses_the_family_hook_with_the_hosts_prediction_type(
        tiny_model, fake_comfy):
    from tsuika.nodes import _host

    ldm, _ = load_safetensors(tiny_model["single_file"])
    model = _FakeComfyModel("SD15", ldm, v_prediction=True)
    bundle = _host.bundle_from_comfy(model, types.SimpleNamespace(get_sd=dict),
                                     types.SimpleNamespace(get_sd=dict))
    assert fake_comfy[0] == "unload_all_models"  # shared weights unpatched before reading
    assert bundle.family == "sd15" and bundle.prediction_type == "v_prediction"
    assert bundle.scheduler_config["prediction_type"] == "v_prediction"
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(bundle.unet.conv_out.weight, ldm[key])
    assert bundle.unet.conv_out.weight.data_ptr() != ldm[key].data_ptr()  # a copy, not shared


def test_an_unsupported_host_model_is_refused_naming_it(tiny_model):
    from tsuika.nodes import _host

    with pytest.raises(ValueError, match=r"this is a SD3 model; Tsuika trains SD15, SDXL "
                                         r"models so far\. Load an SD1\.x or SDXL checkpoint"):
        _host.comfy_family(_FakeComfyModel("SD3", {}))
