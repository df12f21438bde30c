"""Datasets that cost more than they weigh or are shaped oddly: extreme aspect ratios, link
loops, dangling links, folders linked to themselves, file names and captions that are not
UTF-8. Nothing raises; everything odd is named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import make_images, tiny_overrides
from PIL import Image

from tsuika.trainers import cli
from tsuika.trainers.data.folder import quick_fingerprint, scan_folder


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (30000, 3)])
def test_an_extreme_strip_is_fitted_in_bounded_memory_and_time(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 30, 30)).save(path, optimize=True)
    assert path.stat().st_size < 2000  # a few hundred bytes on disk
    # A fresh process, so the growth of its peak resident memory is this work's (a full-strip
    # resize at 512 px was 5 GB and 26 s).
    code = textwrap.dedent(f"""
        import resource, time
        from tsuika.trainers.data.buckets import assign_bucket, make_buckets, resize_and_crop
        from tsuika.trainers.data.images import load_image_rgb
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the imports
        t = time.perf_counter()
        image = load_image_rgb({str(path)!r})
        bucket = assign_bucket(*image.size, make_buckets(512))
        out, info = resize_and_crop(image, bucket)
        assert out.size == bucket, (out.size, bucket)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(time.perf_counter() - t, peak - before)
    """)
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    seconds, grew_kib = r.stdout.split()
    assert float(seconds) < 2.0
    assert int(grew_kib) < 100 * 1024, f"peak memory grew by {int(grew_kib) // 1024} MiB"


def test_crop_before_resize_gives_the_same_pixels_as_resize_then_crop():
    import numpy as np

    from tsuika.trainers.data.buckets import resize_and_crop

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8))
    out, info = resize_and_crop(image, (256, 192))
    scale = max(256 / 500, 192 / 300)
    w, h = max(256, round(500 * scale)), max(192, round(300 * scale))
    full = image.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (w - 256) // 2, (h - 192) // 2
    assert info.crop_top_left == (top, left)
    diff = np.abs(np.asarray(out, int) - np.asarray(full.crop((left, top, left + 256,
                                                                top + 192)), int))
    assert diff.max() <= 2, diff.max()


@pytest.fixture
def odd_folder(tmp_path):
    """A dataset with a link loop, a dangling link, a folder linked to itself and to a
    sibling, and file and folder names that are not UTF-8."""
    root = tmp_path / "odd"
    make_images(root, n=2)
    make_images(root / "2_char", n=1, seed=3)
    os.symlink("loop_a", root / "loop_b")
    os.symlink("loop_b", root / "loop_a")
    os.symlink("self_loop", root / "self_loop")
    os.symlink("missing.png", root / "dangling.png")
    os.symlink(".", root / "again")  # the root, linked to itself
    os.symlink("2_char", root / "3_char_twice")  # a sibling under another repeat count
    good = (root / "img_00.png").read_bytes()
    bad_name = os.fsencode(str(root)) + b"/caf\xe9 latin1.png"
    with open(bad_name, "wb") as fh:
        fh.write(good)
    with open(os.fsencode(str(root)) + b"/caf\xe9 latin1.txt", "wb") as fh:
        fh.write("caption in latin-1: caf\xe9".encode("latin-1"))
    os.mkdir(os.fsencode(str(root)) + b"/1_\xff\xfe")
    with open(os.fsencode(str(root)) + b"/1_\xff\xfe/x.png", "wb") as fh:
        fh.write(good)
    return root


def test_links_loops_and_odd_names_never_raise_and_nothing_is_read_twice(odd_folder):
    scan = scan_folder(odd_folder)
    names = sorted(scan._relative(i.path) for i in scan.items)
    # root: 2 images + the latin-1 one; 2_char: 1; the non-UTF-8 sub-folder: 1.
    assert len(scan.items) == 5, names
    assert not any(n.startswith(("again/", "3_char_twice/")) for n in names)
    warnings = "\n".join(scan.warnings)
    assert "'again'" in warnings and "'3_char_twice'" in warnings
    assert "not UTF-8" in warnings and "latin1.txt" in warnings
    assert len(scan.fingerprint()) == 64
    first = quick_fingerprint(odd_folder)
    assert first == quick_fingerprint(odd_folder)
    (odd_folder / "img_00.txt").write_text("changed")
    assert quick_fingerprint(odd_folder) != first


def test_a_run_on_an_odd_folder_trains_and_names_the_bad_caption_on_the_cli(tiny_model,
                                                                           odd_folder, tmp_path,
                                                                           capsys):
    overrides = tiny_overrides(tiny_model["single_file"], odd_folder, tmp_path / "out", 1)
    code = cli.main(["train", "--quiet", *[a for o in overrides for a in ("--set", o)]])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert (tmp_path / "out" / "tsuika_lora.safetensors").is_file()
    from tsuika.trainers.formats.safetensors_io import load_safetensors

    _, meta = load_safetensors(tmp_path / "out" / "tsuika_lora.safetensors")
    assert meta  # written and readable, whatever the folder names were


def test_cli_users_see_non_utf8_captions_by_file_name(tiny_model, tmp_path):
    data = tmp_path / "d"
    make_images(data, n=2)
    (data / "img_01.txt").write_bytes("\u00e9t\u00e9 \u00e0 la plage".encode("latin-1"))
    r = subprocess.run([sys.executable, "-m", "tsuika.trainers.cli", "train", "--quiet",
                        *[a for o in tiny_overrides(tiny_model["single_file"], data,
                                                    tmp_path / "out", 1) for a in ("--set", o)]],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "img_01.txt" in r.stderr and "not UTF-8" in r.stderr
