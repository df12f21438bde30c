"""The web extension, run by Node against stand-ins of ComfyUI's app/api modules."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="needs Node.js")
def test_loss_chart_collects_events_and_draws(tmp_path):
    # The module imports ComfyUI's scripts by URL; point those imports at the stand-ins.
    src = (ROOT / "web/js/loss_chart.js").read_text()
    stubs = ROOT / "tests/web"
    src = src.replace('"../../scripts/app.js"', f'"{(stubs / "app_stub.mjs").as_uri()}"')
    src = src.replace('"../../scripts/api.js"', f'"{(stubs / "api_stub.mjs").as_uri()}"')
    module = tmp_path / "loss_chart.mjs"
    module.write_text(src)
    r = subprocess.run([NODE, str(stubs / "loss_chart_test.mjs"), module.as_uri()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "step 5/5  loss 0.2000" in r.stdout


@pytest.mark.skipif(NODE is None, reason="needs Node.js")
def test_node_report_layout_and_extension(tmp_path):
    """tests/web/node_report_test.mjs (node's test runner) over the report layout and the
    tsuika.nodereport extension, both copied as ES modules with ComfyUI's imports stubbed."""
    stubs = ROOT / "tests/web"
    layout = (ROOT / "web/js/common/report_text.js").read_text()
    (tmp_path / "report_text.mjs").write_text(layout)
    src = (ROOT / "web/js/node_report.js").read_text()
    for old, new in (('"../../scripts/app.js"', (stubs / "app_stub.mjs").as_uri()),
                     ('"../../scripts/api.js"', (stubs / "api_stub.mjs").as_uri()),
                     ('"./common/report_text.js"', (tmp_path / "report_text.mjs").as_uri())):
        assert old in src, old
        src = src.replace(old, f'"{new}"')
    (tmp_path / "node_report.mjs").write_text(src)
    r = subprocess.run([NODE, str(stubs / "node_report_test.mjs"), tmp_path.as_uri()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "# fail 0" in r.stdout and "# pass 10" in r.stdout, r.stdout[-2000:]
