"""The README's main command: the demo trains on the bundled data with the bundled model."""

import json

from PIL import Image

from tsuika.reference.demo import GRID_SEEDS, run_demo


def test_demo_writes_the_lora_the_grid_and_scores(tmp_path):
    summary = run_demo(tmp_path, steps=20, images_per_prompt=2)
    assert summary["pretrained_reference_model"], "the demo fell back to the random fixture"
    assert summary["steps"] == 20
    saved = json.loads((tmp_path / "demo_summary.json").read_text())
    assert saved["scores"]["before"].keys() == saved["scores"]["after"].keys()
    grid = Image.open(summary["files"]["before_after"])
    # Rows: the concept prompt, its two new contexts, two retention prompts; before | after.
    assert grid.size == (2 * GRID_SEEDS * 128, 5 * 128)  # 64 px samples shown at 2x
    assert (tmp_path / "demo_heart_lora.safetensors").is_file()
