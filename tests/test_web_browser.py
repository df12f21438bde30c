"""The live loss chart (web/js/loss_chart.js) in a real browser against a real ComfyUI server.

Starts ComfyUI (CPU, loopback) with the pack linked into custom_nodes, opens the page in
headless Chromium (tests/web/browser_chart.mjs, playwright-core), loads
tests/workflows/train_then_generate.json, queues it from the page so the "tsuika.loss" events
go to that client, and checks the chart drawn on the training node: its points, its
"step N/M  loss" text and pixels of its line colour. tests/web/browser_report.mjs runs a
workflow to its end (or presses Cancel during training) and records, per Tsuika node, the
report web/js/node_report.js laid out and the lines the canvas drew with their colours.
Interrupts and stops everything after.

Needs: COMFYUI_DIR (ComfyUI checkout; COMFYUI_PYTHON its venv's python, default
<COMFYUI_DIR>/../comfy-venv/bin/python), Chromium (CHROMIUM, default chromium on PATH),
Node.js and playwright-core (PLAYWRIGHT_CORE=<dir>/node_modules/playwright-core after
`npm install playwright-core` in a scratch folder outside the repo). Skipped otherwise.
BROWSER_SHOTS=<dir> keeps the screenshots there.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests/web/browser_chart.mjs"
COMFY = os.environ.get("COMFYUI_DIR")
NODE = shutil.which("node")
CHROMIUM = (os.environ.get("CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
PLAYWRIGHT = os.environ.get("PLAYWRIGHT_CORE", "playwright-core")
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _playwright_missing() -> str | None:
    if NODE is None:
        return "needs Node.js"
    r = subprocess.run([NODE, "-e", f"require.resolve({json.dumps(PLAYWRIGHT)})"],
                       cwd=DRIVER.parent, capture_output=True, text=True)
    if r.returncode:
        return ("needs playwright-core: `npm install playwright-core` in a scratch folder and set "
                "PLAYWRIGHT_CORE=<folder>/node_modules/playwright-core")
    return None


def _skip_reason() -> str | None:
    if not COMFY:
        return "set COMFYUI_DIR to a ComfyUI checkout to run the browser test"
    if not CHROMIUM:
        return "needs Chromium (apt-get install chromium, or set CHROMIUM)"
    return _playwright_missing()


REASON = _skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str) -> None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=5)
    except OSError:
        pass


@pytest.fixture
def comfy_server(tmp_path):
    """A ComfyUI server with the pack linked in; yields (url, server log path, lora name)."""
    from tsuika.trainers.fixtures import write_fixture

    comfy = Path(COMFY)
    python = os.environ.get("COMFYUI_PYTHON", str(comfy.parent / "comfy-venv/bin/python"))
    link = comfy / "custom_nodes" / "tsuika"
    if os.path.lexists(link):
        pytest.fail(f"{link} already exists (another server with the pack?); remove it first")
    models = tmp_path / "models"
    paths = write_fixture("sd15-hostable", models / "build", dtype="fp16")
    (models / "checkpoints").mkdir()
    os.symlink(paths["single_file"], models / "checkpoints" / "sd15-hostable.safetensors")
    from test_captioning_tagger import _tagger
    from test_real_host import HOST_TAGS, TAGGER_NAME, _tag_example_input

    _tagger(models / "captioners" / TAGGER_NAME, tags=HOST_TAGS)  # the tag example's tagger
    extra = tmp_path / "extra_model_paths.yaml"
    extra.write_text(f"tsuika_browser_test:\n  base_path: {models}\n  checkpoints: checkpoints\n"
                     "  captioners: captioners\n")
    dirs = {d: tmp_path / d for d in ("output", "input", "temp", "user")}
    for d in dirs.values():
        d.mkdir()
    _tag_example_input(dirs["input"])  # the tag example's dataset, uncaptioned
    lora_name = f"tsuika_browser_test_{os.getpid()}"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    proc = None
    os.symlink(ROOT, link)
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [python, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1",
                 "--port", str(port), "--extra-model-paths-config", str(extra),
                 "--output-directory", str(dirs["output"]),
                 "--input-directory", str(dirs["input"]), "--temp-directory", str(dirs["temp"]),
                 "--user-directory", str(dirs["user"])],
                cwd=comfy, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **THREADS})
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if "TsuikaTrainLoRA" in _get(f"{url}/object_info/TsuikaTrainLoRA"):
                    break
            except (OSError, ValueError):
                pass
            if time.time() > deadline:
                pytest.fail("ComfyUI did not serve TsuikaTrainLoRA:\n"
                            f"{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url, log_path, lora_name
    finally:
        if proc is not None:
            _post(f"{url}/interrupt")
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        os.unlink(link)
        (comfy / "models" / "loras" / f"{lora_name}.safetensors").unlink(missing_ok=True)
        # Train Checkpoint publishes there (a cancel too: the drivers interrupt the run)
        for p in (comfy / "models" / "checkpoints").glob(f"{lora_name}*.safetensors"):
            p.unlink()


def _run_driver(driver: Path, args: list[str], url: str, server_log: Path, workflow: dict,
                tmp_path: Path, stem: str, env: dict, timeout: int) -> tuple[dict, str]:
    """Run a browser driver (node) on ``workflow``: ``node DRIVER URL WORKFLOW SHOTS *args``;
    returns (its RESULT, a log excerpt for errors)."""
    wf_path = tmp_path / f"{stem}.json"
    wf_path.write_text(json.dumps(workflow))
    shots = Path(os.environ.get("BROWSER_SHOTS") or tempfile.mkdtemp(dir=tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **THREADS, "PLAYWRIGHT_CORE": PLAYWRIGHT, "CHROMIUM": CHROMIUM, **env}
    # the driver closes its browser itself; on a timeout its whole process group is killed
    proc = subprocess.Popen([NODE, str(driver), url, str(wf_path), str(shots), *args],
                            cwd=driver.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    _post(f"{url}/interrupt")
    where = f"\ndriver log:\n{err[-3000:]}\nserver log:\n{server_log.read_text()[-3000:]}"
    assert "RESULT " in out, out[-2000:] + where
    res = json.loads(out.split("RESULT ", 1)[1])
    res["shots"] = str(shots)
    print("screenshots:", shots, "\nbrowser console:", *res["console"], sep="\n  ")
    return res, where


def _drive(url: str, server_log: Path, workflow: dict, tmp_path: Path) -> tuple[dict, str]:
    """Run the loss-chart driver on ``workflow``; returns (its RESULT, a log excerpt)."""
    return _run_driver(DRIVER, ["3"], url, server_log, workflow, tmp_path, "workflow",
                       {"EVENT_TIMEOUT_MS": "180000"}, timeout=270)


def test_loss_chart_draws_live_in_the_browser(comfy_server, tmp_path):
    url, server_log, lora_name = comfy_server
    workflow = json.loads((ROOT / "tests/workflows/train_then_generate.json").read_text())
    train = next(k for k, v in workflow.items() if v["class_type"] == "TsuikaTrainLoRA")
    for node in workflow.values():
        if node["class_type"] == "TsuikaSaveLoRA":
            node["inputs"]["filename"] = lora_name  # removed again by the fixture
    res, where = _drive(url, server_log, workflow, tmp_path)
    assert "error" not in res, res["error"] + where
    assert res["extensionLoaded"], "tsuika.losschart was not registered in the page" + where
    ours = [e for e in res["pageErrors"] if "tsuika" in e.lower() or "loss_chart" in e]
    assert not ours and not res["tsuikaConsole"], (ours, res["tsuikaConsole"])

    before, after, events = res["before"], res["after"], res["events"]
    assert before["hasChartWidget"] and before["points"] == 0
    assert before["texts"] == ["loss chart: waiting for training"], before
    assert before["blue"] == 0, before  # nothing of the line colour in the empty chart
    assert len(events) >= 3 and all(str(e["node"]) == train for e in events), events
    assert [e["step"] for e in events[:3]] == [1, 2, 3], events
    assert after["points"] >= 3, after  # node.tsuikaLoss collected the events
    assert any(t.startswith("step ") and f"/{events[0]['total']}  loss " in t
               for t in after["texts"]), after
    assert after["blue"] >= 30, after  # the #6aa9ff line is on the canvas, inside the chart box
    assert (Path(res["shots"]) / "chart_node.png").stat().st_size > 1000


@pytest.mark.parametrize("example", ["tsuika_train_lora_then_generate.json",
                                     "tsuika_dataset_from_generated_images.json",
                                     "dreambooth.json",
                                     "tsuika_train_lora_step_strength_grid.json",
                                     "tsuika_tag_check_train.json"])
def test_the_example_workflows_load_and_queue_in_the_real_frontend(comfy_server, tmp_path,
                                                                   example):
    """The UI-format example as shipped, loaded by the page itself (not converted by a
    harness): its widget values must line up with the widgets the frontend builds (a
    misaligned value is refused at /prompt), and it must start training, with the loss chart
    on its train node (every train node has one, whatever its method)."""
    url, server_log, lora_name = comfy_server
    workflow = json.loads((ROOT / "example_workflows" / example).read_text())
    train = next(str(n["id"]) for n in workflow["nodes"] if n["type"].startswith("TsuikaTrain"))
    for node in workflow["nodes"]:
        if node["type"] == "TsuikaSaveLoRA":
            node["widgets_values"][0] = lora_name  # removed again by the fixture
        if node["type"] == "TsuikaTrainCheckpoint":
            node["widgets_values"][6] = lora_name  # the checkpoint's name, removed below
    res, where = _drive(url, server_log, workflow, tmp_path)
    assert "promptError" not in res, res["promptError"] + where
    assert "error" not in res, res["error"] + where
    assert len(res["events"]) >= 3 and all(str(e["node"]) == train for e in res["events"])
    assert res["after"]["hasChartWidget"] and res["after"]["points"] >= 3, res["after"]


REPORT_DRIVER = ROOT / "tests/web/browser_report.mjs"
HEADLINE, WARNING, CANCELLED = "#f0f0f0", "#f2b84b", "#8cc8e8"  # web/js/common/report_text.js


def _drive_report(url: str, server_log: Path, workflow: dict, tmp_path: Path, mode: str,
                  settings: dict) -> tuple[dict, str]:
    """Run tests/web/browser_report.mjs; returns (its RESULT, a log excerpt for errors)."""
    res, where = _run_driver(REPORT_DRIVER, [mode, json.dumps(settings)], url, server_log,
                             workflow, tmp_path, f"{mode}_workflow",
                             {"END_TIMEOUT_MS": "300000"}, timeout=420)
    assert "promptError" not in res, res["promptError"] + where
    assert "error" not in res, res["error"] + where
    assert res["extensionLoaded"], "tsuika.nodereport was not registered in the page" + where
    ours = [e for e in res["pageErrors"] if "tsuika" in e.lower() or "report" in e]
    assert not ours and not res["tsuikaConsole"], (ours, res["tsuikaConsole"])
    return res, where


def _fills(node: dict, text: str) -> list[str]:
    """The colours the canvas drew ``text`` in (once per time it was drawn)."""
    return [d["fill"].lower() for d in node["drawn"] if d["text"] == text]


def _assert_drawn(node: dict) -> None:
    """Every line the extension laid out was drawn on the canvas, in its kind's colour."""
    assert node["hasWidget"] and node["report"], node
    # the frontend's sample preview paints to the node's bottom: the report must come first
    if "$$canvas-image-preview" in node["widgets"]:
        names = node["widgets"]
        assert names.index("tsuika_report") < names.index("$$canvas-image-preview"), names
    for line in node["report"]["lines"]:
        assert _fills(node, line["text"]), (line, node["drawn"][:50])


def test_reports_are_drawn_on_the_nodes(comfy_server, tmp_path):
    """The example as a user runs it, on a folder with one broken file: the dataset report
    (with the skipped file, in the warning colour), the training summary and Save LoRA's file
    name are drawn on their nodes; the saved workflow's widget values are unchanged."""
    url, server_log, lora_name = comfy_server
    folder = tmp_path / "input" / "heart_plus_broken"
    shutil.copytree(ROOT / "examples/sample_data/heart", folder)
    (folder / "broken.png").write_text("not an image")
    workflow = json.loads((ROOT / "example_workflows/tsuika_train_lora_then_generate.json")
                          .read_text())
    res, where = _drive_report(url, server_log, workflow, tmp_path, "run", {
        "TsuikaLoadDataset": {"folder": folder.name},
        "TsuikaSaveLoRA": {"filename": lora_name}})
    assert res["end"]["end"] == "execution_success", res["end"] + where
    assert res["savedAfter"] == res["savedBefore"], (res["savedBefore"], res["savedAfter"])
    assert not res["dialogs"], res["dialogs"]

    data = res["nodes"]["TsuikaLoadDataset"]
    _assert_drawn(data)
    text = data["report"]["text"]
    assert text.startswith("12 images used from "), text
    assert "1 skipped" in text and "broken.png" in text, text
    # a skipped file makes the report a warning: its headline is drawn in the warning colour
    assert data["report"]["level"] == "warning", data["report"]
    headline = data["report"]["lines"][0]["text"]
    assert _fills(data, headline) == [WARNING], data["drawn"]
    broken = [ln["text"] for ln in data["report"]["lines"] if "broken.png" in ln["text"]]
    assert broken and all(_fills(data, t) == [WARNING] for t in broken), data["drawn"]

    train = res["nodes"]["TsuikaTrainLoRA"]
    _assert_drawn(train)
    assert train["report"]["text"].startswith("trained 20 steps, loss "), train["report"]
    assert _fills(train, train["report"]["lines"][0]["text"]) == [HEADLINE], train["drawn"]
    assert "LoRA: " in train["report"]["text"], train["report"]
    save = res["nodes"]["TsuikaSaveLoRA"]
    _assert_drawn(save)
    assert save["report"]["text"].startswith(f"saved {lora_name}.safetensors"), save["report"]
    for node in ("TsuikaLoadDataset", "TsuikaTrainLoRA", "TsuikaSaveLoRA"):
        assert (Path(res["shots"]) / f"run_{node}.png").stat().st_size > 1000


def test_cancel_is_an_interruption_and_the_node_says_what_was_kept(comfy_server, tmp_path):
    url, server_log, lora_name = comfy_server
    workflow = json.loads((ROOT / "tests/workflows_negative/train_until_cancelled.json")
                          .read_text())
    res, where = _drive_report(url, server_log, workflow, tmp_path, "cancel",
                               {"TsuikaSaveLoRA": {"filename": lora_name}})
    assert res["end"]["end"] == "execution_interrupted", json.dumps(res["end"])[:2000] + where
    assert res["lossEvents"] >= 3
    assert not [d for d in res["dialogs"] if re.search(r"error|help fix|find issues|traceback",
                                                         d, re.IGNORECASE)], res["dialogs"]
    train = res["nodes"]["TsuikaTrainLoRA"]
    _assert_drawn(train)
    report = train["report"]
    assert report["level"] == "cancelled", report
    assert "resume" in report["text"].lower(), report  # how to continue
    assert _fills(train, report["lines"][0]["text"]) == [CANCELLED], train["drawn"]
    # what was kept: a file that exists, named on the node (whatever the node's wording)
    files = [*(tmp_path / "output").rglob("*.safetensors"),
             *(Path(COMFY) / "models" / "loras").glob("*.safetensors")]
    assert [f for f in files if f.name in report["text"]], report["text"]
    assert (Path(res["shots"]) / "cancel_TsuikaTrainLoRA.png").stat().st_size > 1000
