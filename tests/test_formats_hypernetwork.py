"""Hypernetwork files (trainers/formats/hypernetwork.py): our safetensors file and the .pt
ComfyUI's HypernetworkLoader and A1111 read, both read back; other tools' files read;
anything that is not plain data refused."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import torch

from tsuika.trainers.formats.hypernetwork import (
    HypernetworkFile,
    HypernetworkFormatError,
    detect,
    flat_tensors,
    from_flat,
    read_comfy_pt,
    read_hypernetwork,
    write_comfy_pt,
    write_hypernetwork,
)
from tsuika.trainers.formats.safetensors_io import load_safetensors


def _module(dim: int, seed: int, layer_norm: bool = False) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    sd["linear.0.weight"] = torch.randn(dim * 2, dim, generator=g)
    sd["linear.0.bias"] = torch.randn(dim * 2, generator=g)
    last = 3 if layer_norm else 2
    if layer_norm:
        sd["linear.2.weight"] = torch.randn(dim * 2, generator=g)
        sd["linear.2.bias"] = torch.randn(dim * 2, generator=g)
    sd[f"linear.{last}.weight"] = torch.randn(dim, dim * 2, generator=g)
    sd[f"linear.{last}.bias"] = torch.randn(dim, generator=g)
    return sd


def _hn(**options) -> HypernetworkFile:
    return HypernetworkFile(modules={8: (_module(8, 0), _module(8, 1)),
                                     16: (_module(16, 2), _module(16, 3))},
                            activation_func="relu", **options)


def _same(a: HypernetworkFile, b: HypernetworkFile) -> None:
    ta, tb = flat_tensors(a), flat_tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k].to(ta[k].dtype)) for k in ta)
    assert a.options() == b.options()


def test_safetensors_round_trip_keeps_tensors_options_and_metadata(tmp_path):
    hn = _hn(is_layer_norm=False, use_dropout=True, layer_structure=(1.0, 2.0, 1.0))
    path = write_hypernetwork(tmp_path / "h.safetensors", hn, {"ss_steps": "7"})
    tensors, meta = load_safetensors(path)
    assert "8.0.linear.0.weight" in tensors and "16.1.linear.2.bias" in tensors
    assert detect(tensors, meta)
    back = read_hypernetwork(path)
    _same(hn, back)
    assert back.use_dropout and back.activation_func == "relu"
    assert back.metadata["ss_steps"] == "7"
    with pytest.raises(FileExistsError):
        write_hypernetwork(path, hn)


def test_the_comfy_pt_is_plain_data_in_the_layout_its_loader_indexes(tmp_path):
    hn = _hn(is_layer_norm=False)
    hn.metadata = {"ss_output_name": "mine", "ss_steps": "12"}
    path = write_comfy_pt(tmp_path / "h.pt", hn, dtype=None)
    # What ComfyUI's load_torch_file(safe_load=True) does for a .pt.
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(k for k in sd if isinstance(k, int)) == [8, 16]
    keys, values = sd[8]  # loader: sd[dim][0] keys, sd[dim][1] values
    assert torch.equal(keys["linear.0.weight"], hn.modules[8][0]["linear.0.weight"])
    assert torch.equal(values["linear.2.bias"], hn.modules[8][1]["linear.2.bias"])
    assert sd["activation_func"] == "relu" and sd["is_layer_norm"] is False
    assert sd["use_dropout"] is False and sd["activate_output"] is False
    assert sd["last_layer_dropout"] is False and sd["layer_structure"] == [1.0, 2.0, 1.0]
    assert sd["name"] == "mine" and sd["step"] == 12
    _same(hn, read_comfy_pt(path))
    assert not list(tmp_path.glob(".*tmp")), "temp file left behind"


def test_the_comfy_pt_defaults_to_fp16_tensors(tmp_path):
    sd = torch.load(write_comfy_pt(tmp_path / "h.pt", _hn()), weights_only=True)
    assert sd[8][0]["linear.0.weight"].dtype == torch.float16


def test_an_a1111_file_is_read(tmp_path):
    """A1111's own save: tuples per width, layer norm, options and None-valued fields."""
    sd = {320: (_module(320, 5, True), _module(320, 6, True)),
          "step": 100, "name": "a1111", "layer_structure": [1, 2, 1],
          "activation_func": "swish", "is_layer_norm": True, "weight_initialization": "Normal",
          "use_dropout": False, "sd_checkpoint": None, "sd_checkpoint_name": None,
          "activate_output": False, "last_layer_dropout": False}
    torch.save(sd, tmp_path / "a1111.pt")
    hn = read_hypernetwork(tmp_path / "a1111.pt")
    assert list(hn.modules) == [320] and hn.is_layer_norm and hn.activation_func == "swish"
    assert "linear.2.weight" in hn.modules[320][0]


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pt_holding_objects_is_refused_without_running_them(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({8: ({}, {}), "x": _Evil()}, fh)
    with pytest.raises(HypernetworkFormatError, match="plain-data"):
        read_comfy_pt(path)
    assert "code ran" not in capsys.readouterr().out


def test_names_outside_the_layout_and_half_pairs_are_refused():
    with pytest.raises(HypernetworkFormatError, match="lora_unet"):
        from_flat({"lora_unet_x.lora_down.weight": torch.zeros(1)}, {})
    with pytest.raises(HypernetworkFormatError, match="width 8"):
        from_flat({"8.0.linear.0.weight": torch.zeros(1)}, {})
    with pytest.raises(HypernetworkFormatError, match="is_layer_norm"):
        from_flat(flat_tensors(_hn()), {"hypernetwork.is_layer_norm": '"yes"'})
    assert not detect({"lora_unet_x.alpha": torch.zeros(())})
