"""LoRA layouts: kohya names and alphas as the training export writes them (the LoRA algorithm on
a peft-adapted tiny model), read back through every layout, diffusers' own loader and writer
agreeing with us, and loud failures on anything unexpected."""

from __future__ import annotations

import copy
import json
import logging
import warnings
from types import SimpleNamespace

import pytest
import torch

from tsuika.trainers.formats import lora_layouts as L
from tsuika.trainers.formats.kohya import kohya_tensors, lora_module_tensors
from tsuika.trainers.formats.lora_keys import (
    LoraKeyError,
    ModuleIndex,
    flat_index,
    kohya_name,
    module_path_from_kohya,
    module_paths_of,
)
from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors
from tsuika.trainers.methods.algorithms import get_algorithm
from tsuika.trainers.methods.algorithms.base import export_kohya

RANK, ALPHA = 4, 2.0  # alpha != rank on purpose: a writer assuming alpha = rank fails
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _base_models(seed: int = 0):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=16, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    return unet.eval(), te.eval()


def _adapt(unet, te, alpha_pattern=None):
    """Inject peft LoRA (random lora_B so the update is not zero)."""
    from peft import LoraConfig, inject_adapter_in_model

    unet = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA,
                                              target_modules=UNET_TARGETS,
                                              alpha_pattern=alpha_pattern or {}), unet)
    te = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA,
                                            target_modules=TE_TARGETS), te)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (unet, te):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet, te


def _export(unet, te, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """What training writes for peft-adapted models: the LoRA algorithm's export."""
    return export_kohya(get_algorithm("lora"), {"unet": unet, "text_encoder": te}, dtype)


def _kohya(lsd: L.LoraStateDict) -> dict[str, torch.Tensor]:
    """``lsd`` in kohya layout, through the same writer the training export uses."""
    return kohya_tensors({key: lora_module_tensors(w.down, w.up, w.alpha)
                          for key, w in lsd.modules.items()})


@pytest.fixture(scope="module")
def trained():
    """Base models, a peft-adapted copy, its export (``tensors``), the export read back
    (``lsd``) and the base models' module index."""
    unet, te = _base_models()
    index = ModuleIndex.from_models({"unet": unet, "text_encoder": te})
    a_unet, a_te = _adapt(copy.deepcopy(unet), copy.deepcopy(te))
    tensors = _export(a_unet, a_te)
    return SimpleNamespace(unet=unet, te=te, a_unet=a_unet, a_te=a_te, tensors=tensors,
                           lsd=L.read_lora(tensors, index), index=index)


def _assert_same(a: L.LoraStateDict, b: L.LoraStateDict):
    assert set(a.modules) == set(b.modules)
    for key, wa in a.modules.items():
        wb = b.modules[key]
        assert torch.equal(wa.down, wb.down) and torch.equal(wa.up, wb.up), key
        assert wa.alpha == wb.alpha, key


def _merged(base, lsd: L.LoraStateDict, component: str):
    """A copy of ``base`` with every LoRA update of ``component`` added to the weights."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for (comp, path), w in lsd.modules.items():
            if comp == component:
                weight = model.get_submodule(path).weight
                delta = w.up.flatten(1).float() @ w.down.flatten(1).float()
                weight += w.scale * delta.reshape(weight.shape)
    return model


def _unet_out(unet):
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=hidden).sample


def _te_out(te):
    with torch.no_grad():
        return te(torch.tensor([[0, 5, 6, 7, 1]])).last_hidden_state


# -- names and alphas ------------------------------------------------------------------------
def test_module_paths_ignore_peft_wrappers_and_te_has_no_text_model_level(trained):
    a_unet, a_te, index = trained.a_unet, trained.a_te, trained.index
    assert set(module_paths_of(a_unet)) == index.paths("unet")
    assert set(module_paths_of(a_te)) == index.paths("text_encoder")
    assert "encoder.layers.0.self_attn.q_proj" in index.paths("text_encoder")
    assert not any(p.startswith("text_model") for p in index.paths("text_encoder"))


def test_kohya_export_has_the_exact_names_loaders_expect(trained):
    lsd, tensors = trained.lsd, trained.tensors
    expected = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj.alpha",
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
        "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight",
    }
    assert expected <= set(tensors)
    names = {k.split(".")[0] for k in tensors}
    assert all(n.startswith(("lora_unet_", "lora_te_text_model_")) for n in names)
    assert len(names) == len(lsd.modules) and len(tensors) == 3 * len(names)
    conv_down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    conv_up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert conv_down.shape == (RANK, 32, 3, 3) and conv_up.shape == (32, RANK, 1, 1)


def test_kohya_alphas_are_the_trained_alpha_not_the_rank(trained):
    tensors = trained.tensors
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and all(v.ndim == 0 for v in alphas.values())
    assert {float(v) for v in alphas.values()} == {ALPHA}
    half = _export(trained.a_unet, trained.a_te, torch.float16)  # fp16 never rounds the alpha
    assert {v.dtype for k, v in half.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {v.dtype for k, v in half.items() if k.endswith(".alpha")} == {torch.float32}


def test_per_module_alpha_pattern_survives_export(trained):
    a_unet, a_te = _adapt(copy.deepcopy(trained.unet), copy.deepcopy(trained.te),
                          alpha_pattern={"to_q": 7.0})
    tensors = _export(a_unet, a_te)
    for key, value in tensors.items():
        if key.endswith(".alpha") and key.startswith("lora_unet_"):
            assert float(value) == (7.0 if key.endswith("to_q.alpha") else ALPHA), key


def test_flat_index_inverts_kohya_names(trained):
    index = trained.index
    paths = sorted(index.paths("text_encoder"))
    flat = flat_index("text_encoder", paths)
    name = kohya_name("text_encoder", "encoder.layers.1.self_attn.out_proj")
    assert name == "lora_te_text_model_encoder_layers_1_self_attn_out_proj"
    assert module_path_from_kohya(name, flat) == "encoder.layers.1.self_attn.out_proj"
    # a model that still has the text_model level gets the same names and its own paths
    old = flat_index("text_encoder", ["text_model." + p for p in paths])
    assert old[name] == "text_model.encoder.layers.1.self_attn.out_proj"
    with pytest.raises(LoraKeyError, match="Closest names"):
        module_path_from_kohya("lora_te_text_model_encoder_layers_1_self_attn_out_prj", flat)
    with pytest.raises(LoraKeyError, match="flatten"):
        flat_index("unet", ["a_b.c", "a.b_c"])


# -- round trips -----------------------------------------------------------------------------
def test_kohya_file_round_trip_keeps_tensors_alpha_and_metadata(trained, tmp_path):
    lsd, index = trained.lsd, trained.index
    lsd = L.LoraStateDict(lsd.modules, {"ss_network_alpha": str(ALPHA), "ss_output_name": "x"})
    path = save_safetensors(tmp_path / "k.safetensors", _kohya(lsd), lsd.metadata)
    back = L.read_lora(path, index)
    _assert_same(lsd, back)
    assert back.metadata == lsd.metadata
    assert L.detect_format(load_safetensors(path)[0]).name == "kohya"


def test_the_export_read_back_and_merged_gives_the_adapted_model(trained):
    from tsuika.trainers.ops.merge import merge_lora

    a_unet, _ = _adapt(copy.deepcopy(trained.unet), copy.deepcopy(trained.te),
                       alpha_pattern={"to_k": 5.0})
    unet_only = ModuleIndex({"unet": trained.index.paths("unet")})
    back = L.read_lora(export_kohya(get_algorithm("lora"), {"unet": a_unet}, torch.float32),
                       unet_only)
    assert {w.alpha for (_, p), w in back.modules.items() if p.endswith("to_k")} == {5.0}
    _assert_same(back, L.read_lora(_kohya(back), unet_only))  # the writer loses nothing
    merged = copy.deepcopy(trained.unet)
    assert merge_lora({"unet": merged}, back) == len(back.modules)
    assert torch.allclose(_unet_out(merged), _unet_out(a_unet), atol=1e-5)
    assert not torch.allclose(_unet_out(merged), _unet_out(trained.unet), atol=1e-4)


def test_peft_layout_written_by_diffusers_reads_with_its_alphas(trained, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    a_unet, a_te = _adapt(copy.deepcopy(trained.unet), copy.deepcopy(trained.te),
                          alpha_pattern={"to_q": 0.5})
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(a_unet),
        text_encoder_lora_layers=get_peft_model_state_dict(a_te),
        unet_lora_adapter_metadata=a_unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=a_te.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    tensors, meta = load_safetensors(path)
    assert L.detect_format(tensors).name == "peft" and L.ADAPTER_METADATA_KEY in meta
    expected = L.read_lora(_export(a_unet, a_te), trained.index)
    _assert_same(expected, L.read_lora(path, trained.index))
    _assert_same(expected, L.read_lora(path))  # diffusers' prefixes name the components


def test_peft_without_alpha_metadata_means_scale_one_and_old_spellings(trained):
    lsd, index = trained.lsd, trained.index
    (comp, path), w = next((k, v) for k, v in lsd.modules.items() if k[0] == "text_encoder")
    old = {f"text_encoder.text_model.{path}.lora.down.weight": w.down,
           f"text_encoder.text_model.{path}.lora.up.weight": w.up}
    got = L.read_lora(old, index)
    assert list(got.modules) == [(comp, path)] and got.modules[(comp, path)].alpha == RANK
    old[f"text_encoder.text_model.{path}.alpha"] = torch.tensor(ALPHA)
    assert L.read_lora(old, index).modules[(comp, path)].alpha == ALPHA
    raw = {f"base_model.model.{path}.lora_A.weight": w.down,
           f"base_model.model.{path}.lora_B.weight": w.up}
    assert list(L.read_lora(raw, index).modules) == [(comp, path)]  # found in the index
    with pytest.raises(L.LoraFormatError, match="component="):
        L.read_lora(raw)
    assert list(L.read_lora(raw, component="text_encoder").modules) == [(comp, path)]
    proc = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
            f".{part}.weight": t for part, t in (("down", w.down), ("up", w.up))}
    assert list(L.read_lora(proc, index).modules) == [
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0")]


def test_comfy_native_file_reads_through_an_ldm_map(trained):
    lsd, index = trained.lsd, trained.index
    ldm_map = {  # hand-written: LDM module path -> diffusers module path
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q":
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    }
    q = lsd.modules[("unet", ldm_map["input_blocks.1.1.transformer_blocks.0.attn1.to_q"])]
    c = lsd.modules[("unet", "down_blocks.0.resnets.0.conv1")]
    te = lsd.modules[("text_encoder", "encoder.layers.1.mlp.fc1")]
    comfy = {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": q.up,
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight":
            q.down,
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.alpha":
            torch.tensor(1.0),
        "diffusion_model.input_blocks.1.0.in_layers.2.lora_up.weight": c.up,
        "diffusion_model.input_blocks.1.0.in_layers.2.lora_down.weight": c.down,
        "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.lora_up.weight":
            te.up,
        "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.lora_down.weight":
            te.down,
    }
    assert L.detect_format(comfy).name == "comfy"
    with pytest.raises(L.LoraFormatError, match="ldm_to_diffusers_module_map"):
        L.read_lora(comfy, index)
    got = L.read_lora(comfy, index, ldm_to_diffusers_module_map=ldm_map)
    assert set(got.modules) == {("unet", ldm_map[k]) for k in ldm_map} | {
        ("text_encoder", "encoder.layers.1.mlp.fc1")}
    assert got.modules[("unet", ldm_map["input_blocks.1.1.transformer_blocks.0.attn1.to_q"])
                       ].alpha == 1.0
    assert got.modules[("unet", "down_blocks.0.resnets.0.conv1")].alpha == RANK  # no alpha key
    assert torch.equal(got.modules[("text_encoder", "encoder.layers.1.mlp.fc1")].up, te.up)
    # ComfyUI's trainer also saves full norm/bias differences: refused unless dropped
    comfy["diffusion_model.input_blocks.1.0.in_layers.2.diff_b"] = torch.zeros(32)
    with pytest.raises(L.LoraFormatError, match="drop_weight_diffs"):
        L.read_lora(comfy, index, ldm_to_diffusers_module_map=ldm_map)
    assert len(L.read_lora(comfy, index, ldm_to_diffusers_module_map=ldm_map,
                           drop_weight_diffs=True).modules) == 3
    # kohya names in LDM naming (lora_unet_input_blocks_...) read through the same map
    kohya_ldm = {"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": c.down,
                 "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": c.up,
                 "lora_unet_input_blocks_1_0_in_layers_2.alpha": torch.tensor(3.0)}
    full_ckpt_map = {f"model.diffusion_model.{k}": v for k, v in ldm_map.items()}
    got = L.read_lora(kohya_ldm, index, ldm_to_diffusers_module_map=full_ckpt_map)
    assert got.modules[("unet", "down_blocks.0.resnets.0.conv1")].alpha == 3.0


# -- diffusers accepts our files -------------------------------------------------------------
def _tiny_pipeline(tmp_path, unet, te):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4,
                        norm_num_groups=8)
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_diffusers_load_lora_weights_takes_every_key_with_our_alphas(trained, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet, te, lsd = trained.unet, trained.te, trained.lsd
    path = save_safetensors(tmp_path / "ours.safetensors", trained.tensors, {})
    pipe = _tiny_pipeline(tmp_path, copy.deepcopy(unet), copy.deepcopy(te))
    before = _unet_out(pipe.unet)
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    problems = [r.getMessage() for r in handler.records] + [str(w.message) for w in caught]
    assert problems == [], problems
    adapted = {("unet", n) for n, m in pipe.unet.named_modules()
               if isinstance(m, BaseTunerLayer)}
    adapted |= {("text_encoder", n) for n, m in pipe.text_encoder.named_modules()
                if isinstance(m, BaseTunerLayer)}
    assert adapted == set(lsd.modules)  # every module applied, none extra
    after = _unet_out(pipe.unet)
    assert not torch.allclose(before, after, atol=1e-4)
    # diffusers applied each update with scale alpha / rank, exactly as we merge it
    assert torch.allclose(after, _unet_out(_merged(unet, lsd, "unet")), atol=1e-5)
    assert torch.allclose(_te_out(pipe.text_encoder), _te_out(_merged(te, lsd, "text_encoder")),
                          atol=1e-5)


# -- loud failures ---------------------------------------------------------------------------
def test_leftover_keys_are_listed(trained):
    tensors, index = trained.tensors, trained.index
    extra = {f"lora_unet_mystery_{i}.weird": torch.zeros(1) for i in range(12)}
    with pytest.raises(L.LoraFormatError) as err:
        L.read_lora({**tensors, **extra}, index)
    msg = str(err.value)
    assert "12 key(s)" in msg and "lora_unet_mystery_0.weird" in msg and "(and 2 more)" in msg


def test_unknown_and_ambiguous_formats_list_the_known_ones(trained):
    with pytest.raises(L.LoraFormatError) as err:
        L.detect_format(["model.diffusion_model.input_blocks.0.0.weight"])
    assert all(name in str(err.value) for name in ("kohya", "peft", "comfy"))
    with pytest.raises(L.LoraFormatError, match="several"):
        L.detect_format(["lora_unet_a.lora_down.weight", "unet.a.lora_A.weight"])
    with pytest.raises(L.LoraFormatError, match="known formats"):
        L.read_lora({"x": torch.zeros(1)}, format="nope")


def test_unsupported_parts_and_bad_shapes_are_refused(trained):
    tensors, index = trained.tensors, trained.index
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    with pytest.raises(L.LoraFormatError, match="lora_mid"):
        L.read_lora({**tensors, f"{name}.lora_mid.weight": torch.zeros(RANK, RANK, 3, 3)}, index)
    with pytest.raises(L.LoraFormatError, match="LoHa"):
        L.read_lora({f"{name}.hada_w1_a": torch.zeros(2, 2)}, index)
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    bad = dict(tensors)
    bad[f"{q}.lora_up.weight"] = torch.zeros(32, RANK + 1)
    with pytest.raises(L.LoraFormatError, match="rank mismatch"):
        L.read_lora(bad, index)
    bad = dict(tensors)
    bad[f"{q}.alpha"] = torch.tensor(0.0)
    with pytest.raises(L.LoraFormatError, match="alpha = 0.0"):
        L.read_lora(bad, index)
    bad = dict(tensors)
    del bad[f"{q}.lora_up.weight"]
    with pytest.raises(L.LoraFormatError, match="both a down and an up"):
        L.read_lora(bad, index)
    with pytest.raises(L.LoraFormatError, match="module_index"):
        L.read_lora(tensors)
    unet_only = ModuleIndex({"unet": index.paths("unet")})
    with pytest.raises(LoraKeyError, match="no text_encoder model was given"):
        L.read_lora(tensors, unet_only)
    with pytest.raises(L.LoraFormatError, match="rank mismatch"):
        L.LoraWeights(torch.zeros(4, 8), torch.zeros(8, 3), 1.0)


def test_lora_for_another_model_names_the_module(trained):
    tensors, index = dict(trained.tensors), trained.index
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, 4)
    with pytest.raises(LoraKeyError, match="down_blocks_9"):
        L.read_lora(tensors, index)


def test_the_kohya_writer_refuses_two_modules_with_one_name(trained):
    w = next(iter(trained.lsd.modules.values()))
    parts = lora_module_tensors(w.down, w.up, w.alpha)
    with pytest.raises(L.LoraFormatError, match="both get the kohya name 'lora_unet_a_b_c'"):
        kohya_tensors({("unet", "a_b.c"): parts, ("unet", "a.b_c"): parts})
