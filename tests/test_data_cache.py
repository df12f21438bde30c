"""ContentCache: stable keys, atomic safetensors entries, corrupt entries are misses."""

from __future__ import annotations

import logging

import pytest
import torch

from tsuika.trainers.data.cache import ContentCache

PARTS = {"image": "ab" * 32, "vae": "cd" * 32, "bucket": (512, 768), "crop": "center",
         "flip": False, "scale": 0.18215, "version": 2}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"latent": torch.randn(4, 8, 6, generator=g),
            "half": torch.randn(3, generator=g).half(),
            "ids": torch.arange(5, dtype=torch.int64),
            "view": torch.arange(12.0).reshape(3, 4)[:, 1:3]}  # non-contiguous view


def test_roundtrip(tmp_path):
    cache = ContentCache(tmp_path / "c")
    key = cache.key(**PARTS)
    assert cache.get(key) is None and key not in cache
    stored = _tensors()
    path = cache.put(key, stored)
    assert path == tmp_path / "c" / key[:2] / f"{key}.safetensors" == cache.path(key)
    assert key in cache
    got = cache.get(key)
    assert set(got) == set(stored)
    for name, value in stored.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_key_is_stable_and_order_independent():
    key = ContentCache.key(**PARTS)
    assert len(key) == 64 and int(key, 16) >= 0
    assert ContentCache.key(**dict(reversed(list(PARTS.items())))) == key
    assert ContentCache.key(**{**PARTS, "bucket": [512, 768]}) == key


@pytest.mark.parametrize("name,value", [("image", "ab" * 31 + "ac"), ("vae", "x"),
                                        ("bucket", (768, 512)), ("crop", "random"),
                                        ("flip", True), ("scale", 0.18216), ("version", 3),
                                        ("extra", 1)])
def test_key_changes_when_any_part_changes(name, value):
    assert ContentCache.key(**{**PARTS, name: value}) != ContentCache.key(**PARTS)


def test_key_keeps_types_apart_and_rejects_others(tmp_path):
    keys = {ContentCache.key(v=value) for value in (1, 1.0, True, "1", None, (1,))}
    assert len(keys) == 6
    with pytest.raises(ValueError, match="path"):
        ContentCache.key(path=tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        ContentCache.key()


def test_corrupt_or_truncated_entries_are_misses_and_removed(tmp_path, caplog):
    cache = ContentCache(tmp_path)
    key = cache.key(image="x")
    path = cache.put(key, _tensors())
    full = path.read_bytes()
    for broken in (b"garbage, not safetensors", full[: len(full) // 2], full[:-3], b""):
        path.write_bytes(broken)
        with caplog.at_level(logging.WARNING, logger="tsuika.trainers.data.cache"):
            assert cache.get(key) is None
        assert not path.exists()
        assert "unreadable" in caplog.text
        caplog.clear()
    cache.put(key, {"a": torch.ones(2)})  # recomputed entry works again
    assert torch.equal(cache.get(key)["a"], torch.ones(2))


def test_entry_under_the_wrong_key_is_a_miss(tmp_path):
    cache = ContentCache(tmp_path)
    key_a, key_b = cache.key(image="a"), cache.key(image="b")
    path_a = cache.put(key_a, {"t": torch.zeros(1)})
    cache.path(key_b).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key_b).write_bytes(path_a.read_bytes())  # e.g. a copied/renamed file
    assert cache.get(key_b) is None and cache.get(key_a) is not None


def test_put_replaces_and_validates(tmp_path):
    cache = ContentCache(tmp_path)
    key = cache.key(image="a")
    cache.put(key, {"t": torch.zeros(2)})
    cache.put(key, {"t": torch.ones(2)})
    assert torch.equal(cache.get(key)["t"], torch.ones(2))
    with pytest.raises(ValueError, match="empty"):
        cache.put(key, {})
    with pytest.raises(ValueError, match="torch.Tensor"):
        cache.put(key, {"t": [1, 2]})
    for bad in ("../../etc", "ABC", key[:-1]):
        with pytest.raises(ValueError, match="not a 64-character"):
            cache.path(bad)
