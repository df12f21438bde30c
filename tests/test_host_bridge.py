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

    def __init__(self, kind: str, ldm: dict, v_prediction: bool = False,
                 model_type: str | None = None, sampling_settings: dict | None = None):
        config_cls = type(kind, (), {"sampling_settings": dict(sampling_settings or {})})
        model_type = types.SimpleNamespace(
            name=model_type or ("V_PREDICTION" if v_prediction else "EPS"))
        self.handed_out: list[dict] = []  # the dicts state_dict_for_saving returned

        def state_dict_for_saving(clip_sd, vae_sd):
            self.handed_out.append(dict(ldm))  # a fresh dict of the same tensors, as ComfyUI's
            return self.handed_out[-1]

        self.model = types.SimpleNamespace(
            model_config=config_cls(), model_type=model_type,
            state_dict_for_saving=state_dict_for_saving)


def test_the_host_model_table_comes_from_the_families():
    from tsuika.nodes import _host

    table = _host.supported_comfy_models()
    assert table == {kind: f.name for f in FAMILIES.values() for kind in f.facts.host_models}
    assert table["SD15"] == "sd15" and family_for_host_model("SDXL").name == "sdxl"
    assert family_for_host_model("Flux") is None
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
    # Nothing written asked: every module reads ComfyUI's own storage, no copy.
    assert bundle.unet.conv_out.weight.data_ptr() == ldm[key].data_ptr()
    shared = bundle.extra["host_shared_bytes"]
    assert set(shared) == {"unet", "text_encoder", "vae"} and all(shared.values()), shared
    stored = sum(t.numel() * t.element_size() for t in ldm.values())
    assert sum(shared.values()) == stored  # all of it (position ids aside: not in the file)


def test_an_unsupported_host_model_is_refused_naming_it(tiny_model):
    from tsuika.nodes import _host

    with pytest.raises(ValueError, match=r"this is a Flux model; Tsuika trains SD15, SDXL "
                                         r"models so far\. Load an SD1\.x or SDXL checkpoint"):
        _host.comfy_family(_FakeComfyModel("Flux", {}))


@pytest.mark.parametrize("schedule", ["EDM", "V_PREDICTION_EDM", "FLOW"])
def test_a_model_comfyui_samples_with_another_schedule_is_refused_naming_it(schedule):
    from tsuika.nodes import _host

    model = _FakeComfyModel("SD15", {}, model_type=schedule)
    with pytest.raises(ValueError, match=rf"loaded this checkpoint as a {schedule} model; "
                                         r"Tsuika trains epsilon and v_prediction models only"):
        _host.comfy_family(model)  # what the train node calls before any work


def test_bundle_from_comfy_copies_into_its_own_dict_and_keeps_the_zsnr_marker(
        tiny_model, fake_comfy):
    from tsuika.nodes import _host

    ldm, _ = load_safetensors(tiny_model["single_file"])
    before = {k: v.clone() for k, v in ldm.items()}
    model = _FakeComfyModel("SD15", ldm, v_prediction=True,
                            sampling_settings={"zsnr": True})  # what ComfyUI read from "ztsnr"
    bundle = _host.bundle_from_comfy(model, types.SimpleNamespace(get_sd=dict),
                                     types.SimpleNamespace(get_sd=dict))
    assert bundle.extra["ldm_info"]["zero_terminal_snr"] is True
    assert model.handed_out == [{}]  # consumed: no copy outlives its module's load
    assert all(torch.equal(ldm[k], before[k]) for k in before)  # ComfyUI's tensors untouched
    plain = _host.bundle_from_comfy(_FakeComfyModel("SD15", ldm), types.SimpleNamespace(
        get_sd=dict), types.SimpleNamespace(get_sd=dict))
    assert plain.extra["ldm_info"]["zero_terminal_snr"] is False


class _Patcher:
    """A ComfyUI ModelPatcher's part the offload reads: its module, and unpatch_model."""

    def __init__(self, device: str):
        self.model = torch.nn.Linear(2, 2, device=device)
        self.calls: list[torch.device] = []

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        self.calls.append(device_to)


def test_host_copies_left_on_an_accelerator_are_offloaded_to_the_cpu_while_training():
    from tsuika.nodes import _host

    # "meta" stands for a GPU here: any non-CPU device (ComfyUI's --highvram keeps the
    # unloaded UNet on its GPU); the CLIP and VAE already sit in RAM as after a plain unload.
    model, clip_patcher, vae_patcher = _Patcher("meta"), _Patcher("cpu"), _Patcher("cpu")
    moved = _host.offload_host_copies(model, types.SimpleNamespace(patcher=clip_patcher),
                                      types.SimpleNamespace(patcher=vae_patcher))
    assert moved == ["MODEL"]
    assert model.calls == [torch.device("cpu")]  # through ComfyUI's own API: it tracks it
    assert clip_patcher.calls == [] and vae_patcher.calls == []


def test_an_sdxl_host_model_becomes_a_bundle_with_both_text_encoders(tmp_path, fake_comfy):
    """What ComfyUI holds for an SDXL checkpoint (its original layout, as the single file of
    the sdxl-tiny fixture) goes through the family's hook: no family named in the bridge."""
    from tsuika.nodes import _host
    from tsuika.trainers.fixtures import write_fixture

    ldm, _ = load_safetensors(write_fixture("sdxl-tiny", tmp_path, seed=0)["single_file"])
    proj = ldm["conditioner.embedders.1.model.text_projection"].clone()
    bundle = _host.bundle_from_comfy(_FakeComfyModel("SDXL", ldm),
                                     types.SimpleNamespace(get_sd=dict),
                                     types.SimpleNamespace(get_sd=dict))
    assert bundle.family == "sdxl" and bundle.prediction_type == "epsilon"
    assert list(bundle.components) == ["unet", "text_encoder_1", "text_encoder_2"]
    # OpenCLIP's projection (x @ P) is the transformers Linear's weight transposed
    assert torch.equal(bundle.text_encoders[1].text_projection.weight, proj.T)


def _inference_copy(ldm: dict) -> dict:
    """The tensors as ComfyUI holds them: made under inference_mode (its nodes run there)."""
    with torch.inference_mode():
        return {k: v.clone() for k, v in ldm.items()}


def _host_outputs(ldm: dict) -> dict[str, torch.Tensor]:
    """What ComfyUI's model computes from its tensors: here the tensors themselves, compared
    bit for bit (any write into them shows)."""
    return {k: v.clone() for k, v in ldm.items()}


@pytest.mark.parametrize("method,extra,written", [
    ("lora", {"network.train_text_encoder": "true"}, set()),
    ("dreambooth", {"train.learning_rate": "1e-4"}, {"unet"}),
])
def test_training_on_comfyuis_shared_tensors_never_writes_into_them(
        tiny_model, image_folder, tmp_path, fake_comfy, method, extra, written):
    """The bundle shares ComfyUI's inference tensors (no copy of what the run only reads),
    trains through them (autograd saves a frozen base layer's weight), and after a whole
    run ComfyUI's tensors are bit for bit what they were; DreamBooth's UNet, which it trains
    in place, is the run's own copy."""
    from conftest import tiny_overrides

    from tsuika.nodes import _host
    from tsuika.trainers.config import load_config
    from tsuika.trainers.loop import train

    ldm = _inference_copy(load_safetensors(tiny_model["single_file"])[0])
    before = _host_outputs(ldm)
    config = load_config(None, tiny_overrides(tiny_model["single_file"], image_folder,
                                              tmp_path / "out", steps=3,
                                              **{"network.method": method, **extra}))
    assert _host.written_components(config) == written
    bundle = _host.bundle_from_comfy(_FakeComfyModel("SD15", ldm),
                                     types.SimpleNamespace(get_sd=dict),
                                     types.SimpleNamespace(get_sd=dict), written)
    shared = bundle.extra["host_shared_bytes"]
    assert shared["vae"] and shared["text_encoder"]  # frozen: read from ComfyUI's storage
    assert bool(shared["unet"]) == ("unet" not in written)
    assert not any(p.is_inference() for m in bundle.components.values()
                   for p in m.parameters())
    conv_out = bundle.unet.conv_out.weight
    result = train(config, bundle=bundle)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    changed = [k for k in before if not torch.equal(ldm[k], before[k])]
    assert changed == []  # ComfyUI's model is exactly as it was
    if method == "dreambooth":  # the run's own UNet did train
        key = "model.diffusion_model.out.2.weight"
        assert not torch.equal(conv_out.detach(), before[key])


def test_a_written_text_encoder_gets_its_own_copy_and_the_rest_stays_shared(
        tiny_model, fake_comfy):
    from tsuika.nodes import _host

    ldm = _inference_copy(load_safetensors(tiny_model["single_file"])[0])
    bundle = _host.bundle_from_comfy(_FakeComfyModel("SD15", ldm),
                                     types.SimpleNamespace(get_sd=dict),
                                     types.SimpleNamespace(get_sd=dict),
                                     {"unet", "text_encoders"})
    shared = bundle.extra["host_shared_bytes"]
    assert shared["unet"] == 0 and shared["text_encoder"] == 0 and shared["vae"] > 0
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(bundle.unet.conv_out.weight, ldm[key])  # same values, own storage


def test_the_bundle_keeps_comfyuis_dtypes_and_only_the_vae_is_cast(tiny_model, fake_comfy):
    """ComfyUI's fp16 tensors stay fp16 and shared (the run casts what its compute needs,
    once); the VAE is fp32 everywhere, so an fp16 VAE is the one cast here."""
    from tsuika.nodes import _host

    with torch.inference_mode():
        ldm = {k: v.half() for k, v in load_safetensors(tiny_model["single_file"])[0].items()}
    bundle = _host.bundle_from_comfy(_FakeComfyModel("SD15", ldm),
                                     types.SimpleNamespace(get_sd=dict),
                                     types.SimpleNamespace(get_sd=dict))
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in bundle.text_encoders[0].parameters()} == {torch.float16}
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}
    shared = bundle.extra["host_shared_bytes"]
    assert shared["unet"] and shared["text_encoder"] and shared["vae"] == 0, shared


@pytest.mark.parametrize("method, extra, kept", [
    ("lora", {}, True),
    ("lora", {"network.train_text_encoder": "true"}, False),
    ("textual_inversion", {"network.token": "tsktok", "network.init_word": "red"}, False)],
    ids=["lora", "lora-te", "textual-inversion"])
def test_frozen_shared_text_encoders_stay_as_stored_and_give_the_same_run(
        tiny_model, image_folder, tmp_path, fake_comfy, method, extra, kept):
    """ComfyUI's fp16 text encoders, frozen in the run: kept fp16 and shared (computing in
    the run's fp32 a layer at a time) instead of cast whole, with the very losses of the
    run that casts them; a method that trains the text encoders gets the whole cast."""
    from conftest import tiny_overrides

    from tsuika.nodes import _host
    from tsuika.trainers.config import load_config
    from tsuika.trainers.loop import train

    with torch.inference_mode():
        ldm = {k: v.half() if k.startswith("cond_stage_model.") else v.clone()
               for k, v in load_safetensors(tiny_model["single_file"])[0].items()}
    options = tiny_overrides(tiny_model["single_file"], image_folder, tmp_path / "shared",
                             steps=3, **{"network.method": method, **extra})
    config = load_config(None, options)
    bundle = _host.bundle_from_comfy(_FakeComfyModel("SD15", ldm),
                                     types.SimpleNamespace(get_sd=dict),
                                     types.SimpleNamespace(get_sd=dict),
                                     _host.written_components(config))
    layer = next(m for m in bundle.text_encoders[0].modules() if isinstance(m, torch.nn.Linear))
    storage = layer.weight.data_ptr()
    shared_run = train(config, bundle=bundle)
    assert (layer.weight.dtype == torch.float16 and layer.weight.data_ptr() == storage) == kept
    # The same run on the same host model, told it is not shared: the encoder cast whole.
    own = _host.bundle_from_comfy(_FakeComfyModel("SD15", ldm),
                                  types.SimpleNamespace(get_sd=dict),
                                  types.SimpleNamespace(get_sd=dict),
                                  _host.written_components(config))
    del own.extra["host_shared_bytes"]
    own_run = train(load_config(None, tiny_overrides(
        tiny_model["single_file"], image_folder, tmp_path / "own", steps=3,
        **{"network.method": method, **extra})), bundle=own)
    assert shared_run.losses == own_run.losses
