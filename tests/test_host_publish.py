"""Publishing a run's file into a ComfyUI models folder (nodes/_host.py: publish_file,
publish_partial): the method's folder kind, never over an existing file, one copy on disk
where a hard link can be made. Without ComfyUI: ``folder_paths`` is a stand-in."""

import os
import sys
import types

import pytest


@pytest.fixture
def models(tmp_path, monkeypatch):
    root = tmp_path / "models"
    fp = types.ModuleType("folder_paths")
    fp.get_folder_paths = lambda kind: [str(root / kind), str(tmp_path / "second" / kind)]
    fp.get_output_directory = lambda: str(tmp_path / "output")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return root


def test_a_published_checkpoint_takes_a_free_name_in_its_own_folder(models, tmp_path):
    from tsuika.nodes import _host

    run_file = tmp_path / "run" / "dream.safetensors"
    run_file.parent.mkdir()
    run_file.write_bytes(b"trained")
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "dream.safetensors").write_bytes(b"the user's own")
    name = _host.publish_file(run_file, "dream", "checkpoints", link=True)
    assert name == "dream-2.safetensors"
    assert (models / "checkpoints" / "dream.safetensors").read_bytes() == b"the user's own"
    assert os.path.samefile(run_file, models / "checkpoints" / name)  # one copy on disk
    assert sorted(p.name for p in (models / "checkpoints").iterdir()) == [
        "dream-2.safetensors", "dream.safetensors"]  # no temporary file left
    # A copy when asked (or across file systems): a later change to one is not the other's.
    copied = _host.publish_file(run_file, "dream", "checkpoints")
    assert copied == "dream-3.safetensors"
    assert not os.path.samefile(run_file, models / "checkpoints" / copied)
    assert (models / "checkpoints" / copied).read_bytes() == b"trained"


def test_a_cancelled_runs_partial_file_goes_where_its_loader_lists_it(models, tmp_path):
    from tsuika.nodes import _host

    src = tmp_path / "emb.safetensors"
    src.write_bytes(b"partial")
    assert _host.publish_partial(src, "cat", 7, "embeddings") == "cat-partial-step7.safetensors"
    assert _host.publish_partial(src, "cat", 7, "embeddings") == "cat-partial-step7-2.safetensors"
    assert (models / "embeddings" / "cat-partial-step7.safetensors").read_bytes() == b"partial"
    assert _host.publish_partial(src, "cat", 7) == "cat-partial-step7.safetensors"  # loras
    assert (models / "loras" / "cat-partial-step7.safetensors").is_file()


def test_drawn_class_images_have_a_folder_per_prompt_resolution_and_base_model(models,
                                                                               tmp_path):
    import torch

    from tsuika.nodes import _host

    def comfy_model(seed: int):
        torch.manual_seed(seed)
        unet = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 4, 3))
        return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))

    a, b = comfy_model(0), comfy_model(1)
    folder = _host.class_images_dir("a photo of a dog", 512, a)
    assert folder.parent == tmp_path / "output" / "tsuika" / "class_images"
    assert folder.name.startswith("a_photo_of_a_dog-")
    assert _host.class_images_dir("a photo of a dog", 512, a) == folder  # reused next run
    others = {_host.class_images_dir("a photo of a cat", 512, a),
              _host.class_images_dir("a photo of a dog", 768, a),
              _host.class_images_dir("a photo of a dog", 512, b)}
    assert folder not in others and len(others) == 3
    assert _host.class_images_dir("../../etc", None, a).parent == folder.parent  # no escape


def test_a_hypernetwork_is_published_as_the_pt_its_loader_reads(models, tmp_path):
    from tsuika.nodes import _host

    run_file = tmp_path / "run" / "hn-step00000004.pt"
    run_file.parent.mkdir()
    run_file.write_bytes(b"plain data")
    (models / "hypernetworks").mkdir(parents=True)
    (models / "hypernetworks" / "hn-partial-step4.pt").write_bytes(b"the user's own")
    name = _host.publish_partial(run_file, "hn", 4, "hypernetworks", ".pt")
    assert name == "hn-partial-step4-2.pt"
    assert (models / "hypernetworks" / "hn-partial-step4.pt").read_bytes() == b"the user's own"
    assert _host.publish_file(run_file, "hn", "hypernetworks", suffix=".pt") == "hn.pt"
    assert not list((models / "hypernetworks").glob("*.safetensors"))
