"""scan_folder on a deliberately messy dataset folder."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tsuika.trainers.data.folder import (
    DatasetError,
    DatasetScan,
    file_sha256,
    normalize_caption,
    scan_folder,
)


def _png(path: Path, size=(24, 16), color=(10, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "my dataset"
    _png(root / "a.png")
    bom_crlf = "\ufefftag one, tag two\r\n\r\n  second line ,\r\n"
    (root / "a.txt").write_bytes(bom_crlf.encode("utf-8"))
    _png(root / "猫 cat.png", size=(16, 32))
    (root / "猫 cat.txt").write_text("猫, 可愛い", encoding="utf-8")
    _png(root / "no caption.png")
    _png(root / "upper.png")
    (root / "upper.TXT").write_text("upper case extension", encoding="utf-8")
    _png(root / "bad caption.png")
    (root / "bad caption.txt").write_bytes(b"caf\xe9 latin-1")
    _png(root / "notepad.png")
    (root / "notepad.txt").write_bytes("utf16 caption".encode("utf-16"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (9, 9, 9)).save(root / "rotated.jpg", exif=exif)
    _png(root / ".hidden.png")
    (root / "notes.md").write_text("not an image")
    (root / "orphan.txt").write_text("caption without an image")
    (root / "empty.png").write_bytes(b"")
    (root / "fake.png").write_text("I am text")
    _truncated_jpeg(root / "cut.jpg")
    (root / "scan.tiff").write_bytes(b"II*\x00")
    _png(root / "3_mychar" / "m1.png")
    (root / "3_mychar" / "m1.txt").write_text("mychar, smiling", encoding="utf-8")
    _png(root / "3_mychar" / "m2.png")
    _png(root / "3_mychar" / "deeper" / "lost.png")
    _png(root / "plain" / "p.png")
    _png(root / "0_off" / "z.png")
    _png(root / ".git" / "x.png")
    _png(root / "__MACOSX" / "y.png")
    return root


def _rel(scan: DatasetScan) -> list[str]:
    return [item.path.relative_to(scan.root).as_posix() for item in scan.items]


def test_items_are_the_readable_images_in_sorted_order(messy):
    scan = scan_folder(messy)
    assert _rel(scan) == sorted(_rel(scan))
    assert set(_rel(scan)) == {"a.png", "猫 cat.png", "no caption.png", "upper.png",
                               "bad caption.png", "notepad.png", "rotated.jpg",
                               "3_mychar/m1.png", "3_mychar/m2.png", "plain/p.png"}
    by_name = {p: item for p, item in zip(_rel(scan), scan.items)}
    assert by_name["3_mychar/m1.png"].repeats == 3 and by_name["3_mychar/m1.png"].subset == "mychar"
    assert by_name["plain/p.png"].repeats == 1 and by_name["plain/p.png"].subset == "plain"
    assert by_name["a.png"].repeats == 1 and by_name["a.png"].subset == ""
    assert (by_name["rotated.jpg"].width, by_name["rotated.jpg"].height) == (20, 40)
    assert (by_name["猫 cat.png"].width, by_name["猫 cat.png"].height) == (16, 32)
    for item in scan.items:
        assert item.sha256 == hashlib.sha256(item.path.read_bytes()).hexdigest()
    assert scan.total_repeats == 8 + 2 * 3
    assert scan.subsets == {"": 7, "mychar": 2, "plain": 1}


def test_captions_are_normalised(messy):
    scan = scan_folder(messy)
    captions = {p: item.caption for p, item in zip(_rel(scan), scan.items)}
    assert captions["a.png"] == "tag one, tag two, second line"
    assert captions["猫 cat.png"] == "猫, 可愛い"
    assert captions["upper.png"] == "upper case extension"
    assert captions["notepad.png"] == "utf16 caption"
    assert captions["3_mychar/m1.png"] == "mychar, smiling"
    assert captions["no caption.png"] == "" and captions["3_mychar/m2.png"] == ""
    assert captions["bad caption.png"] == ""
    assert scan.captions_missing == 5 and scan.captions_without_file == 4
    assert any("bad caption.txt" in w and "UTF-8" in w for w in scan.warnings)


def test_skipped_files_have_reasons_and_ignored_files_are_absent(messy):
    scan = scan_folder(messy)
    reasons = {s.path.relative_to(messy).as_posix(): s.reason for s in scan.skipped}
    assert reasons["empty.png"] == "empty file"
    assert reasons["fake.png"] == "not an image (cannot identify format)"
    assert reasons["cut.jpg"] == "truncated or corrupt image data"
    assert "unsupported format .tiff" in reasons["scan.tiff"]
    assert "0 repeats" in reasons["0_off/z.png"]
    assert len(scan.skipped) == 5
    seen = set(reasons) | set(_rel(scan))
    for ignored in (".hidden.png", "notes.md", "orphan.txt", ".git/x.png", "__MACOSX/y.png",
                    "3_mychar/deeper/lost.png"):
        assert ignored not in seen
    assert any("3_mychar/deeper" in w for w in scan.warnings)


def test_summary_reports_counts_reasons_and_subsets(messy):
    text = scan_folder(messy).summary()
    assert "10 images used" in text and "14 per epoch" in text
    assert "mychar: 2 images x 3 repeats" in text and "(root): 7 images" in text
    assert "captions: 5 present, 4 missing, 1 empty or unreadable" in text
    assert "5 skipped" in text and "cut.jpg: truncated or corrupt image data" in text
    # Most common first; the EXIF-rotated 40x20 JPEG counts as it is seen, upright.
    assert "image sizes: 24x16: 8, 16x32: 1, 20x40: 1" in text


def test_scan_is_deterministic_and_independent_of_threads(messy):
    one, many = scan_folder(messy, workers=1), scan_folder(messy, workers=6)
    assert one.items == many.items and one.skipped == many.skipped
    assert one.fingerprint() == many.fingerprint()


def test_fingerprint_follows_content(messy, tmp_path):
    before = scan_folder(messy).fingerprint()
    assert len(before) == 64 and scan_folder(messy).fingerprint() == before
    copy = tmp_path / "elsewhere"
    shutil.copytree(messy, copy)
    assert scan_folder(copy).fingerprint() == before  # relative paths: moving is not a change

    (messy / "a.txt").write_text("a new caption", encoding="utf-8")
    after_caption = scan_folder(messy).fingerprint()
    assert after_caption != before

    _png(messy / "a.png", color=(11, 120, 200))
    after_image = scan_folder(messy).fingerprint()
    assert after_image != after_caption

    (messy / "3_mychar").rename(messy / "5_mychar")
    assert scan_folder(messy).fingerprint() != after_image


def test_caption_extension_option(messy):
    (messy / "a.caption").write_text("from the other file", encoding="utf-8")
    scan = scan_folder(messy, caption_extension=".caption")
    assert {i.path.name: i.caption for i in scan.items}["a.png"] == "from the other file"
    assert all(i.caption == "" for i in scan_folder(messy, caption_extension="").items)
    with pytest.raises(DatasetError, match="must start with a dot"):
        scan_folder(messy, caption_extension="txt")


def test_missing_root_and_file_root_are_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="does not exist") as info:
        scan_folder(missing)
    assert str(missing) in str(info.value) and "data.dir" in str(info.value)
    a_file = _png(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="not a folder") as info:
        scan_folder(a_file)
    assert str(a_file) in str(info.value)


def test_folder_without_usable_images_names_the_skipped_files(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "empty.png").write_bytes(b"")
    (root / "fake.jpg").write_text("text")
    (root / "readme.txt").write_text("hello")
    with pytest.raises(DatasetError) as info:
        scan_folder(root)
    message = str(info.value)
    assert str(root) in message and "2 file(s) were skipped" in message
    assert "empty.png: empty file" in message and "fake.jpg: not an image" in message
    assert isinstance(info.value, ValueError)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        scan_folder(empty)


def test_shared_fixture_folder_scans(image_folder):
    scan = scan_folder(image_folder)
    assert len(scan.items) == 4 and not scan.skipped and not scan.warnings
    assert all(item.caption.startswith("a red circle, number ") for item in scan.items)


def test_file_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 9000)  # > one 1 MiB chunk
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_normalize_caption():
    assert normalize_caption("  a, b,\r\nc\rd\n\n") == "a, b, c, d"
    assert normalize_caption("\n \n") == ""


def test_quick_fingerprint_changes_with_a_caption_edit(tmp_path):
    import os

    from tsuika.trainers.data.folder import quick_fingerprint

    (tmp_path / "a.txt").write_text("a red circle")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("x")
    before = quick_fingerprint(tmp_path)
    assert quick_fingerprint(tmp_path) == before
    (tmp_path / "a.txt").write_text("a blue circle")
    st = os.stat(tmp_path / "a.txt")
    os.utime(tmp_path / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert quick_fingerprint(tmp_path) != before


def test_quick_problem_finds_empty_datasets_without_decoding(messy, tmp_path):
    from tsuika.trainers.data.folder import quick_problem

    assert quick_problem(messy) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no usable images in dataset folder" in quick_problem(empty)
    (empty / "notes.txt").write_text("a caption without an image")
    (empty / "0_off").mkdir()
    (empty / "0_off" / "a.png").write_bytes(b"not even decoded")
    assert "no usable images" in quick_problem(empty)  # 0 repeats count for nothing
    (empty / "1_on").mkdir()
    (empty / "1_on" / "b.PNG").write_bytes(b"names only: scan_folder checks the bytes")
    assert quick_problem(empty) is None
    assert "does not exist" in quick_problem(tmp_path / "missing")
