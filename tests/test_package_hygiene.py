"""The backend never imports the host, and importing the pack has no side effects."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes",
                "comfy_execution", "execution"}


def test_trainers_never_import_comfyui():
    offenders = []
    for path in (ROOT / "trainers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in HOST_MODULES]
    assert offenders == []


def test_importing_the_pack_is_light():
    code = ("import sys, tsuika; heavy = [m for m in ('torch', 'diffusers', 'comfy') "
            "if m in sys.modules]; print(heavy); assert heavy == [], heavy; "
            "assert tsuika.WEB_DIRECTORY == './web/js'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_requirements_never_pin_torch():
    req = (ROOT / "requirements.txt").read_text().splitlines()
    names = [line.split("=")[0].split(">")[0].split("<")[0].strip().lower() for line in req
             if line.strip() and not line.startswith("#")]
    assert names and not {"torch", "torchvision", "torchaudio"} & set(names)


def test_registry_metadata_is_complete_and_the_icon_ships():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy, repo = meta["tool"]["comfy"], meta["project"]["urls"]["Repository"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    owner_repo = repo.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    icon = ROOT / comfy["Icon"].removeprefix(prefix)
    assert icon.is_file() and icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
