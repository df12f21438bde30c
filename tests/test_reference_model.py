"""The reference model's training script: its stages run on a micro architecture, the output
loads through the family loader (folder and single file) and samples images."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tsuika.reference import train_model as tm
from tsuika.reference.scores import evaluate
from tsuika.reference.world import prompts_for_eval, sample_scene


def write_micro_configs(folder):
    """The shipped configs with every width shrunk (same structure, same tokenizer)."""
    cfg = tm.load_configs()
    unet_levels = len(cfg["unet"]["block_out_channels"])
    vae_levels = len(cfg["vae"]["block_out_channels"])
    cfg["unet"].update(block_out_channels=[16] * (unet_levels - 1) + [32], attention_head_dim=2,
                       cross_attention_dim=16, norm_num_groups=8)
    cfg["vae"].update(block_out_channels=[8] * (vae_levels - 1) + [16], norm_num_groups=4)
    cfg["text_encoder"].update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, projection_dim=16)
    folder.mkdir()
    for part, data in cfg.items():
        (folder / f"{part}.json").write_text(json.dumps(data))
    return folder


def micro_args(out, configs, *extra):
    return ["--out", str(out), "--config-dir", str(configs), "--vae-steps", "2",
            "--vae-batch", "4", "--unet-steps", "3", "--batch", "4", "--pool-size", "8",
            "--val-images", "6", "--eval-images", "0", "--sample-steps", "2",
            "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro model trained for a few steps by the command line entry point."""
    root = tmp_path_factory.mktemp("reference_model")
    configs = write_micro_configs(root / "configs")
    assert tm.main(micro_args(root / "out", configs)) == 0
    return root / "out"


def test_shipped_configs_fit_the_single_file_layout():
    """Every shipped architecture choice survives diffusers -> LDM -> diffusers, so the
    single-file checkpoint rebuilds the same model."""
    from tsuika.trainers.formats.ldm_checkpoint import (
        config_metadata_hints,
        diffusers_to_ldm,
        ldm_to_diffusers,
    )

    cfg = tm.load_configs()
    unet, vae, te = tm.build_models(cfg, seed=0)
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te.state_dict(),
                           unet_config=dict(unet.config), vae_config=dict(vae.config))
    conv = ldm_to_diffusers(ldm, metadata=config_metadata_hints(
        dict(unet.config), dict(vae.config), cfg["text_encoder"]))
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "attention_head_dim", "cross_attention_dim", "norm_num_groups"):
        assert list(conv.unet_config[key]) == list(cfg["unet"][key]) \
            if isinstance(cfg["unet"][key], list) else conv.unet_config[key] == cfg["unet"][key]
    for key in ("block_out_channels", "latent_channels", "norm_num_groups", "scaling_factor"):
        assert conv.vae_config[key] == cfg["vae"][key]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert conv.text_encoder_config[key] == cfg["text_encoder"][key]
    assert cfg["text_encoder"]["vocab_size"] == 49408  # the real CLIP tokenizer's vocabulary
    assert cfg["scheduler"]["prediction_type"] == "epsilon"


def test_latent_normalisation_keeps_reconstructions_and_standardises(tmp_path):
    cfg = tm.load_configs(write_micro_configs(tmp_path / "configs"))
    _, vae, _ = tm.build_models(cfg, seed=0)
    vae.eval()
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(16)]
    x = tm.render_batch(scenes, 64)
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mode()).sample
    stats = tm.normalize_latents(vae, scenes, device=torch.device("cpu"))
    with torch.no_grad():
        after = vae.decode(vae.encode(x).latent_dist.mode()).sample
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert torch.allclose(before, after, atol=1e-4)
    scaled = z * vae.config.scaling_factor
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (scaled.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    assert len(stats["latent_std_before"]) == cfg["vae"]["latent_channels"]


def test_run_writes_report_and_both_formats(trained):
    report = json.loads((trained / "training_report.json").read_text())
    assert report["unet"]["steps"] == 3 and report["vae"]["steps"] == 2
    assert len(report["unet"]["loss_curve"]) == 3
    assert all(math.isfinite(loss) for _, loss in report["unet"]["loss_curve"])
    assert report["seed"] == 0 and "--unet-steps 3" in report["command"]
    assert report["sample_seconds_per_image"] > 0
    assert (trained / "samples.png").is_file()
    assert (trained / "diffusers" / "model_index.json").is_file()
    assert (trained / f"{tm.MODEL_NAME}.safetensors").is_file()
    assert "evaluation" not in report  # --eval-images 0
    ceiling = report["vae"]["ceiling"]  # measured right after the VAE stage
    assert set(ceiling) == {"heart", "checkered", "zorbit"}
    assert all(0.0 <= v <= 1.0 for v in ceiling.values())


def test_whole_world_vae_sees_held_out_concepts_and_the_default_does_not(monkeypatch):
    import tsuika.reference.vae_stage as vs

    seen = []
    real = vs.sample_scene

    def spy(rng, include_held_out=False, **kw):
        seen.append(include_held_out)
        return real(rng, include_held_out=include_held_out, **kw)

    monkeypatch.setattr(vs, "sample_scene", spy)
    cfg = tm.load_configs()
    cfg["vae"].update(block_out_channels=[8] * (len(cfg["vae"]["block_out_channels"]) - 1) + [16],
                      norm_num_groups=4)
    for whole_world in (False, True):
        seen.clear()
        _, vae, _ = tm.build_models(cfg, seed=0)
        vs.train_vae(vae, steps=1, batch_size=2, whole_world=whole_world)
        assert seen == [whole_world] * 2


@pytest.mark.parametrize("form", ["diffusers", "single_file"])
def test_output_loads_and_samples_through_the_family(trained, form):
    from tsuika.trainers.device import Precision
    from tsuika.trainers.families import get_family, load_model
    from tsuika.trainers.sampling import sample_images

    path = trained / ("diffusers" if form == "diffusers" else f"{tm.MODEL_NAME}.safetensors")
    bundle = load_model(path)
    assert bundle.family == "sd15" and bundle.prediction_type == "epsilon"
    assert {p.dtype for m in (bundle.unet, bundle.vae, *bundle.text_encoders)
            for p in m.parameters()} == {torch.float32}
    images = sample_images(get_family(bundle.family), bundle, ["a red circle", "a blue star"],
                           Precision(torch.device("cpu"), torch.float32), size=64, steps=2)
    assert [im.size for im in images] == [(64, 64), (64, 64)]


def test_folder_and_single_file_hold_the_same_weights(trained):
    from tsuika.trainers.families import load_model

    folder = load_model(trained / "diffusers")
    single = load_model(trained / f"{tm.MODEL_NAME}.safetensors")
    for a, b in ((folder.unet, single.unet), (folder.vae, single.vae),
                 (folder.text_encoders[0], single.text_encoders[0])):
        sa, sb = a.state_dict(), b.state_dict()
        sa.pop("embeddings.position_ids", None), sb.pop("embeddings.position_ids", None)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_existing_outputs_are_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "training_report.json").write_text("{}")
    configs = write_micro_configs(tmp_path / "configs")
    assert tm.main(micro_args(out, configs)) == 2
    assert (out / "training_report.json").read_text() == "{}"
    assert not (out / "diffusers").exists()


def test_time_budget_stops_training_and_still_saves(tmp_path):
    configs = write_micro_configs(tmp_path / "configs")
    out = tmp_path / "out"
    args = micro_args(out, configs, "--time-budget-minutes", "0.000001")
    args[args.index("--unet-steps") + 1] = "1000"
    assert tm.main(args) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["unet"]["steps"] < 1000
    assert (out / f"{tm.MODEL_NAME}.safetensors").is_file()


def test_subject_mask_covers_the_subject_only():
    from tsuika.reference.concepts import Scene

    spec = {"shape": "square", "color": "red", "texture": "solid", "background": "gray",
            "position": "center"}
    small, large = (Scene.from_spec({**spec, "size": s}) for s in ("small", "large"))
    mask = tm.subject_mask(tm.render_batch([small, large], 64), [small, large])
    assert mask[:, :, 32, 32].tolist() == [[1.0], [1.0]]  # the centre is the subject
    assert mask[:, :, 0, 0].tolist() == [[0.0], [0.0]]  # a corner is background
    assert mask[1].sum() > 2 * mask[0].sum()


def test_dihedral_augmentation_turns_images():
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    seen = {tuple(tm.augment_dihedral(image, random.Random(seed))[0].flatten().tolist())
            for seed in range(40)}
    assert len(seen) == 8  # the 4 turns x 2 mirrorings of a square
    assert tuple(image[0].flatten().tolist()) in seen


class _StubEvaluator:
    """Predicts a fixed answer: the prompt's own scene (``perfect``) or always a black square."""

    vocab = {"shape": ("circle", "square", "heart"), "color": ("red", "black"),
             "texture": ("solid",), "background": ("gray",), "position": ("center",),
             "size": ("small", "large")}

    def __init__(self, answer):
        self.answer = answer

    def predict(self, images):
        return [dict(self.answer) for _ in range(len(images))]


def test_evaluate_scores_right_and_wrong_predictions():
    prompts = prompts_for_eval()
    retention = prompts[0]
    held = next(p for p in prompts if p.concept == "heart")
    assert retention.spec["shape"] != "heart" and retention.spec["color"] != "black"
    images = torch.zeros(3, 3, 64, 64)
    right = evaluate(_StubEvaluator(retention.spec), {retention: images})
    assert right["retention_prompt_fidelity"] == 1.0
    assert right["retention_subject_fidelity"] == 1.0
    assert set(right["retention_attribute_accuracy"].values()) == {1.0}
    wrong_answer = {**retention.spec, "shape": "heart", "color": "black"}
    wrong = evaluate(_StubEvaluator(wrong_answer), {retention: images, held: images})
    assert wrong["retention_prompt_fidelity"] == 0.0
    assert wrong["retention_subject_fidelity"] == 0.0
    background_wrong = {**retention.spec, "background": "none of them"}
    partly = evaluate(_StubEvaluator(background_wrong), {retention: images})
    assert partly["retention_subject_fidelity"] == 1.0
    assert partly["retention_prompt_fidelity"] == 0.0
    assert wrong["retention_attribute_accuracy"]["shape"] == 0.0
    assert wrong["retention_attribute_accuracy"]["background"] == 1.0
    assert wrong["held_out_baseline"][0]["concept_fidelity"] == 1.0  # it said "heart"


def test_the_shipped_model_loads_as_folder_and_single_file_with_the_same_weights():
    from tsuika.reference.quality import REFERENCE_MODEL
    from tsuika.trainers.families import load_model

    folder = load_model(REFERENCE_MODEL)
    single = load_model(REFERENCE_MODEL.parent / f"{tm.MODEL_NAME}.safetensors")
    for a, b in ((folder.unet, single.unet), (folder.vae, single.vae),
                 (folder.text_encoders[0], single.text_encoders[0])):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=0, atol=0, msg=k)
    assert folder.scheduler_config["prediction_type"] == single.prediction_type == "epsilon"


def test_decoder_finetune_changes_only_the_decoder(trained, tmp_path):
    from tsuika.reference import finetune_decoder as fd
    from tsuika.trainers.families import load_model

    out = tmp_path / "decoded"
    assert fd.main(["--model", str(trained), "--out", str(out), "--steps", "2",
                    "--batch", "2", "--anchor-images", "3", "--eval-images", "1"]) == 0
    before, after = load_model(trained / "diffusers"), load_model(out / "diffusers")
    report = json.loads((out / "decoder_report.json").read_text())
    assert report["steps"] == 2 and set(report["ceiling"]) == {"heart", "checkered", "zorbit"}
    assert report["loss_curve"][-1][2] > 0  # the anchor term ran (the decoder moved)
    redone = json.loads((out / "training_report.json").read_text())
    assert redone["vae"]["ceiling"] == report["ceiling"]
    assert redone["before_decoder_finetune"]["vae_ceiling"] is not None
    assert redone["evaluation"]["images_per_prompt"] == 1 and (out / "samples.png").is_file()
    vb, va = before.vae.state_dict(), after.vae.state_dict()
    for k in vb:
        same = torch.equal(vb[k], va[k])
        if k.startswith(("encoder.", "quant_conv.")):
            assert same, f"{k} changed: the UNet's latents would no longer match"
    assert not all(torch.equal(vb[k], va[k]) for k in vb if k.startswith("decoder."))
    for a, b in ((before.unet, after.unet), (before.text_encoders[0], after.text_encoders[0])):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                       b.state_dict().values()))
    assert (out / f"{tm.MODEL_NAME}.safetensors").is_file()
    assert fd.main(["--model", str(trained), "--out", str(out), "--steps", "1"]) == 2  # kept


def test_reevaluation_redoes_scores_and_writes_only_when_asked(trained, tmp_path, capsys):
    import hashlib
    import shutil

    from tsuika.reference import scores
    from tsuika.reference.quality import EVALUATOR

    if not EVALUATOR.is_file():
        pytest.skip("reference/evaluator.safetensors not built")
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    report = model / "training_report.json"
    before = report.read_bytes()
    assert scores.main(["--model", str(model), "--images", "1"]) == 0
    assert report.read_bytes() == before  # printed only
    assert "retention_subject_fidelity" in capsys.readouterr().out
    assert scores.main(["--model", str(model), "--images", "1", "--write"]) == 0
    redone = json.loads(report.read_text())
    assert redone["evaluation"]["images_per_prompt"] == 1
    assert redone["evaluation"]["evaluator_sha256"] == hashlib.sha256(
        EVALUATOR.read_bytes()).hexdigest()
    assert set(redone["vae"]["ceiling"]) == {"heart", "checkered", "zorbit"}
    assert redone["seed"] == json.loads(before)["seed"]  # the rest of the report is kept
    assert scores.main(["--model", str(tmp_path / "missing")]) == 2
    assert "training_report.json" in capsys.readouterr().err
