"""safetensors reading/writing (atomic, no overwrite, no unpickling) and training metadata."""

from __future__ import annotations

import json

import pytest
import torch

from tsuika.trainers.formats import metadata as md
from tsuika.trainers.formats.safetensors_io import load_safetensors, save_safetensors


def _tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {"t": base.t(), "row": base[1], "whole": base, "half": torch.ones(2).half()}


def test_round_trip_keeps_values_and_metadata(tmp_path):
    tensors = _tensors()  # a transposed view and slices sharing storage with "whole"
    path = save_safetensors(tmp_path / "sub" / "a.safetensors", tensors, {"k": "v"})
    loaded, meta = load_safetensors(path)
    assert meta == {"k": "v"}
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no temp files left


def test_existing_file_is_never_overwritten_unless_asked(tmp_path):
    path = save_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(FileExistsError) as err:
        save_safetensors(path, {"x": torch.ones(2)})
    assert str(path) in str(err.value) and "overwrite=True" in str(err.value)
    assert torch.equal(load_safetensors(path)[0]["x"], torch.zeros(2))
    save_safetensors(path, {"x": torch.ones(2)}, overwrite=True)
    assert torch.equal(load_safetensors(path)[0]["x"], torch.ones(2))


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    from tsuika.trainers.formats import safetensors_io

    path = save_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})

    def broken(fh, *args, **kwargs):
        fh.write(b"half a header")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "_write_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(path, {"x": torch.ones(2)}, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(load_safetensors(path)[0]["x"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_metadata_values_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="'ss_steps'"):
        save_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(1)}, {"ss_steps": 10})
    assert not (tmp_path / "a.safetensors").exists()


def test_missing_pickle_and_junk_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_safetensors(tmp_path / "nope.safetensors")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(ValueError, match="unpickle") as err:
        load_safetensors(ckpt)
    assert "convert it to .safetensors" in str(err.value) and str(ckpt) in str(err.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a tensor file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_safetensors(junk)
    truncated = tmp_path / "cut.safetensors"
    good = save_safetensors(tmp_path / "good.safetensors", {"x": torch.zeros(64)})
    truncated.write_bytes(good.read_bytes()[:-16])
    with pytest.raises(ValueError, match="damaged"):
        load_safetensors(truncated)
    # the converting reader (dtype=...) refuses the same files, and a malformed header entry
    with pytest.raises(ValueError, match="damaged"):
        load_safetensors(truncated, dtype=torch.bfloat16)
    header = b'{"x": {"dtype": "F32", "shape": [4]}}'  # no data_offsets
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ValueError, match="damaged.*malformed"):
        load_safetensors(odd, dtype=torch.bfloat16)
    values, _ = load_safetensors(good, dtype=torch.bfloat16)
    assert values["x"].dtype == torch.bfloat16 and values["x"].shape == (64,)


# -- metadata --------------------------------------------------------------------------------
def _fields(tmp_path):
    data = tmp_path / "datasets" / "10_mychar"
    return dict(step=30, learning_rate=1e-4, seed=7,
                resolution=512, output_name="mychar", started_at=1700000000.5,
                base_model_name=str(tmp_path / "models" / "base.safetensors"),
                dataset_dirs={str(data): {"n_repeats": 10, "img_count": 3}},
                tag_frequency={str(data): {"1girl": 3, "smile": 1}}, num_train_images=30,
                extra={"ssmd_notes": str(tmp_path / "notes.txt")})


def test_training_metadata_is_all_strings_without_local_paths(tmp_path):
    meta = md.network_metadata(md.training_metadata(**_fields(tmp_path)), network_dim=4,
                               network_alpha=2.0)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert str(tmp_path) not in json.dumps(meta)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert meta["ss_steps"] == "30" and meta["ss_resolution"] == "(512, 512)"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "mychar" and meta["modelspec.resolution"] == "512x512"
    assert meta["ssmd_notes"] == "notes.txt"
    parsed = md.read_metadata(meta)
    assert parsed["ss_dataset_dirs"] == {"10_mychar": {"n_repeats": 10, "img_count": 3}}
    assert parsed["ss_tag_frequency"] == {"10_mychar": {"1girl": 3, "smile": 1}}


def test_metadata_is_method_neutral_and_a_lora_adds_its_own(tmp_path):
    neutral = md.training_metadata(**_fields(tmp_path))
    assert not [k for k in neutral if k.startswith(("ss_network_", "ss_conv_"))], neutral
    assert neutral["modelspec.architecture"] == "stable-diffusion-v1"
    with pytest.raises(TypeError, match="network_dim"):
        md.training_metadata(network_dim=4)  # a network's field is the LoRA's to add
    lora = md.network_metadata(neutral, network_dim=8, network_alpha=4, conv_dim=2,
                               conv_alpha=1, network_args={"file": str(tmp_path / "a.txt")})
    assert {k: lora[k] for k in set(lora) - set(neutral)} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
        "ss_conv_dim": "2", "ss_conv_alpha": "1", "ss_network_args": '{"file": "a.txt"}'}
    assert lora["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md.network_metadata(lora, network_dim=8)["modelspec.architecture"].count("/lora") == 1
    with pytest.raises(TypeError, match="network_dimm"):
        md.network_metadata(neutral, network_dimm=4)


def test_paths_are_kept_only_when_asked(tmp_path):
    meta = md.training_metadata(include_paths=True, **_fields(tmp_path))
    assert str(tmp_path / "datasets" / "10_mychar") in md.read_metadata(meta)["ss_dataset_dirs"]
    assert meta["ss_sd_model_name"] == str(tmp_path / "models" / "base.safetensors")


def test_v_prediction_and_unknown_fields(tmp_path):
    meta = md.training_metadata(prediction_type="v_prediction")
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"
    with pytest.raises(TypeError, match="network_dimm"):
        md.training_metadata(network_dimm=4)
    with pytest.raises(ValueError, match="base_model_version"):
        md.training_metadata(base_model_version="sd9")


def test_windows_and_home_paths_are_scrubbed_too():
    meta = md.training_metadata(base_model_name="C:\\models\\sd\\base.safetensors",
                                dataset_dirs=["~/data/5_cat", "D:\\train\\img\\10_dog"])
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert set(json.loads(meta["ss_dataset_dirs"])) == {"5_cat", "10_dog"}


def test_config_metadata_scrubs_the_config_copy(tmp_path):
    from tsuika.trainers.config import build_config

    cfg = build_config(overrides=[f"data.dir={tmp_path / 'imgs'}",
                                  f"model.path={tmp_path / 'm.safetensors'}",
                                  f"output.dir={tmp_path / 'out'}", "network.alpha=2"])
    meta = md.network_metadata(md.training_metadata(
        config=cfg, step=5, base_model_version="sd15", base_model_name="m.safetensors",
        started_at=1.0), cfg)
    assert str(tmp_path) not in json.dumps(meta)
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_steps"] == "5"
    saved = md.read_metadata(meta)["tsuika.config"]
    assert saved["data"]["dir"] == "imgs" and saved["model"]["path"] == "m.safetensors"


def test_read_metadata_keeps_bad_json_as_text(caplog):
    parsed = md.read_metadata({"ss_tag_frequency": "{not json", "ss_seed": "3"})
    assert parsed == {"ss_tag_frequency": "{not json", "ss_seed": "3"}
    assert "not valid JSON" in caplog.text


def test_files_written_converting_as_they_go_read_back_everywhere(tmp_path):
    """Our writer against the safetensors library's reader: every dtype, empty and 0-d
    tensors, shared memory, conversion on the way out, metadata."""
    import safetensors.torch

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"w": base, "view": base[1], "half": torch.randn(5).half(),
               "bf": torch.randn(3).bfloat16(), "step": torch.tensor(7),
               "flags": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5), "bytes": torch.arange(5, dtype=torch.uint8)}
    path = save_safetensors(tmp_path / "a.safetensors", tensors, {"k": "v"})
    back = safetensors.torch.load_file(path)
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype
               for k in tensors)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        assert n % 8 == 0 and json.loads(fh.read(n))["__metadata__"] == {"k": "v"}
    fp16 = save_safetensors(tmp_path / "b.safetensors", tensors, dtype=torch.float16)
    back = safetensors.torch.load_file(fp16)
    assert back["w"].dtype == torch.float16 and torch.equal(back["w"], base.half())
    assert back["bf"].dtype == torch.float16 and back["step"].dtype == torch.int64
    assert back["scalar"].dtype == torch.float32  # scalars such as a LoRA's alpha stay exact


@pytest.mark.parametrize("header_len", [0x0280, 0x0380, 0x0480, 0x0580])
def test_a_header_length_that_looks_like_a_pickle_mark_still_reads(tmp_path, header_len):
    """A header of 640 bytes starts the file with 0x80 0x02, a pickle protocol mark: still a
    valid safetensors file (found by `tsuika resize`, whose output had such a header)."""
    path = save_safetensors(tmp_path / "a.safetensors", {"x": torch.arange(3.0)})
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + size].rstrip(b" ") + b" " * (header_len - len(raw[8:8 + size].rstrip()))
    path.write_bytes(header_len.to_bytes(8, "little") + header + raw[8 + size:])
    assert path.read_bytes()[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    tensors, _ = load_safetensors(path)
    assert tensors["x"].tolist() == [0.0, 1.0, 2.0]
