"""The checkpoint x strength grid's host-free parts: rows from a run folder, the run a LoRA
came from, strengths, the change measure and its flags, the labelled grid image."""

from __future__ import annotations

import pytest
import torch

from tsuika.trainers.formats.safetensors_io import save_safetensors
from tsuika.trainers.tools import lora_grid as grid
from tsuika.trainers.tools.lora_grid import GridError, GridRow


def _lora(path, **meta):
    return save_safetensors(path, {"lora_unet_x.lora_down.weight": torch.zeros(1, 2)},
                            {k: str(v) for k, v in meta.items()})


def test_parse_strengths_and_names():
    assert grid.parse_strengths("0.5, 1 1.5") == [0.5, 1.0, 1.5]
    assert grid.parse_strengths("-1,0") == [-1.0, 0.0]
    assert grid.parse_strengths("1, 0.5 0") == [0.0, 0.5, 1.0]  # columns lowest first
    for bad, word in (("", "empty"), ("0.5, x", "'x' is not a number"),
                      ("1, 1", "repeats"), ("20", "outside"), ("nan", "outside")):
        with pytest.raises(GridError, match=word):
            grid.parse_strengths(bad)
    assert grid.parse_names("a.safetensors\n\n sub/b.safetensors , c") == \
        ["a.safetensors", "sub/b.safetensors", "c"]


def test_run_rows_orders_steps_numerically_then_the_final_file(tmp_path):
    run = tmp_path / "run_1"
    run.mkdir()
    for step in (100, 20, 3):
        _lora(run / f"hero-step{step:08d}.safetensors", ss_steps=step)
    _lora(run / "hero.safetensors", ss_steps=120)
    _lora(run / "other-step00000050.safetensors")  # another name in the folder: not a row
    (run / "states").mkdir()
    rows = grid.run_rows(run, "hero")
    assert [r.label for r in rows] == ["step 3", "step 20", "step 100", "final (step 120)"]
    assert {r.run for r in rows} == {"run_1"} and rows[-1].path.name == "hero.safetensors"
    assert [r.step for r in rows] == [3, 20, 100, 120]


def test_find_run_matches_the_lora_it_was_given(tmp_path):
    root = tmp_path / "tsuika"
    for run, started in (("run_20260101-000000", "1.5"), ("run_20260102-000000", "2.5")):
        (root / "hero" / run).mkdir(parents=True)
        _lora(root / "hero" / run / "hero.safetensors", ss_training_started_at=started)
    (root / "hero" / "run_20260103-000000").mkdir()  # a run that saved nothing yet
    assert grid.find_run(root, "hero").name == "run_20260102-000000"  # newest with files
    assert grid.find_run(root, "hero", "1.5").name == "run_20260101-000000"
    assert grid.find_run(root, "hero", "9.9") is None
    assert grid.find_run(root, "nobody") is None


def _cells(values):
    return [[torch.full((8, 8, 3), v) for v in row] for row in values]


def test_changes_flag_cells_that_stop_changing_with_steps_or_strength():
    rows = [GridRow("step 10", None, "r"), GridRow("step 20", None, "r"),
            GridRow("step 30", None, "r"), GridRow("other.safetensors", None, None)]
    strengths = [0.0, 0.5, 1.0]
    cells = _cells([[0.0, 0.2, 0.5],
                    [0.0, 0.4, 0.8],
                    [0.0, 0.405, 0.9],   # the 0.5 column stopped changing with steps
                    [0.0, 0.3, 0.302]])  # another file (no step change); saturated strength
    ch = grid.changes(cells, rows, threshold=0.01)
    assert ch.step[0] == [None, None, None] and ch.step[3] == [None, None, None]
    assert ch.step[1][1] == pytest.approx(0.2, abs=1e-6)
    assert ch.step[2][1] == pytest.approx(0.005, abs=1e-6)
    assert ch.strength[3][2] == pytest.approx(0.002, abs=1e-6) and ch.strength[0][0] is None
    flags = ch.flags(strengths)
    # strength 0 is the base model's image in every row: never flagged
    assert flags == [["", "", ""], ["", "", ""], ["", "s", ""], ["", "", "w"]]
    text = grid.report(rows, strengths, ch)
    assert text.startswith("4 rows x 3 strengths, 2 flagged (change < 0.01)")
    assert "step 30 @ 0.5: step change 0.0050" in text
    assert "other.safetensors @ 1: strength change 0.0020" in text
    assert grid.changes(cells, rows, 0.0).flags(strengths) == [[""] * 3] * 4


def test_assemble_lays_out_labelled_cells_and_frames_flags():
    cells = [[torch.full((32, 40, 3), 0.25), torch.full((32, 40, 3), 0.75)],
             [torch.zeros(32, 40, 3), torch.ones(32, 40, 3)]]
    flags = [["", ""], ["", "s"]]
    out = grid.assemble(cells, ["step 1", "final (step 2)"], ["0.5", "1"], flags,
                        title="seed 0: a heart")
    assert out.shape[0] == 1 and out.shape[-1] == 3 and 0 <= out.min() and out.max() <= 1
    _, h, w, _ = out.shape
    left, top = w - 2 * 40, h - 2 * 32
    assert left > 10 and top > 10  # room for the row labels and the header
    body = out[0, top:, left:]
    assert torch.allclose(body[8:24, 8:32], torch.tensor(0.25), atol=1 / 255)
    assert torch.allclose(body[8:24, 48:72], torch.tensor(0.75), atol=1 / 255)
    assert torch.allclose(body[40:56, 8:32], torch.tensor(0.0), atol=1 / 255)
    frame = body[32:64, 40:80]  # the flagged white cell has a red frame
    assert frame[16, 0].tolist() == pytest.approx([230 / 255, 40 / 255, 40 / 255], abs=0.01)
    assert frame[20, 20].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.01)
    assert out[0, :top, :].min() < 0.5  # the header has text drawn in it
    assert out[0, top:, :left].min() < 0.5  # and so has the label strip
    with pytest.raises(GridError, match="not"):
        grid.assemble([[torch.zeros(8, 8, 3), torch.zeros(4, 8, 3)]], ["a"], ["0", "1"])
