"""Prior preservation on the adapter train nodes in a real ComfyUI server: Train LoRA
Advanced has the base model draw its class images in the graph, Train Hypernetwork Advanced
trains beside a connected class dataset, and both trained models sample right away.

Runs when COMFYUI_DIR points at a ComfyUI checkout (see tests/test_real_host.py); skipped,
visibly, otherwise.
"""

import json

import pytest
from test_real_host import COMFY, HARNESS, ROOT, _run, host_models  # noqa: F401

pytestmark = pytest.mark.skipif(
    not COMFY or not HARNESS.is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout (and have ../shared/tools/real_host.py)")

HYPERNETWORKS = __import__("pathlib").Path(COMFY or ".") / "models" / "hypernetworks"
HN_NAME = "tsuika_hn_prior_test"


def test_lora_and_hypernetwork_advanced_train_with_class_images(host_models, tmp_path):  # noqa: F811
    before = set(HYPERNETWORKS.glob(f"{HN_NAME}*"))
    assert not before, f"remove {sorted(before)} first: the test's name must be free"
    out, report = tmp_path / "out", tmp_path / "report.json"
    r = _run(["--models", str(host_models), "--output-dir", str(out), "--report", str(report),
              "--strict-lora", "--show-log",
              str(ROOT / "tests/workflows/train_lora_advanced_prior.json"),
              "--expect-nodes", "TsuikaTrainLoRAAdvanced", "TsuikaTrainHypernetworkAdvanced"])
    log = r.stdout + r.stderr
    made = set(HYPERNETWORKS.glob(f"{HN_NAME}*")) - before
    try:
        assert r.returncode == 0 and "RESULT: PASS" in r.stdout, log[-6000:]
        # The LoRA node: the base model drew the 2 class images asked for, under ComfyUI's
        # output (keyed by prompt, resolution and model), and trained beside them.
        drawn = list(out.glob("tsuika/class_images/a_heart-*/class_*.png"))
        assert len(drawn) == 2, log[-3000:]
        assert all(p.with_suffix(".txt").read_text() == "a heart" for p in drawn)
        assert "drawing 2 class images of 'a heart'" in log, log[-4000:]
        assert "prior preservation: 2 class images" in log, log[-4000:]
        # The hypernetwork node: the connected class dataset (the 12 sample images).
        assert "prior preservation: 12 class images" in log, log[-4000:]
        runs = json.loads(report.read_text())["workflows"]
        shown = runs[0]["raw_outputs"]
        lora_text = shown["3"]["tsuika_report"][0]
        hn_text = shown["10"]["tsuika_report"][0]
        assert lora_text.startswith("trained 2 steps, loss "), lora_text
        assert hn_text.startswith("trained 2 steps, loss "), hn_text
        assert made == {HYPERNETWORKS / f"{HN_NAME}.pt"}, made
        # Both trained models sampled in the same graph.
        assert list(out.glob("tsuika_lora_prior*.png")), log[-3000:]
        assert list(out.glob("tsuika_hn_prior*.png")), log[-3000:]
    finally:
        for p in made:
            p.unlink()
