"""The backend never imports the host, and importing the pack has no side effects."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes",
                "comfy_execution", "execution"}


# Layers of the pack (top-level folders) and the layers each must never import.
FORBIDDEN = {"trainers": {"nodes", "reference"}, "reference": {"nodes"}}


def _imported(path: Path) -> list[tuple[str, int]]:
    """(absolute dotted module, line) for every import in ``path``; relative imports are
    resolved against the package (``from ..nodes import x`` in trainers/loop.py is
    ``tsuika.nodes``), so that a layer crossing cannot hide behind dots."""
    package = ["tsuika", *path.relative_to(ROOT).with_suffix("").parts[:-1]]
    if path.name == "__init__.py":
        package = ["tsuika", *path.relative_to(ROOT).parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package[:len(package) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            # ``from .. import nodes`` names the layer in the imported names.
            found += [(base, node.lineno)] + [(f"{base}.{a.name}", node.lineno)
                                              for a in node.names]
    return found


def _cross_layer_imports(layer: str) -> list[str]:
    offenders = []
    for path in (ROOT / layer).rglob("*.py"):
        for name, line in _imported(path):
            parts = name.split(".")
            where = f"{path.relative_to(ROOT)}:{line}: {name}"
            if parts[0] in HOST_MODULES and layer == "trainers":
                offenders.append(where)  # the backend never imports ComfyUI
            if parts[0] == "tsuika" and len(parts) > 1 and parts[1] in FORBIDDEN.get(layer, ()):
                offenders.append(where)
    return offenders


def test_trainers_never_import_comfyui_nodes_or_reference():
    assert _cross_layer_imports("trainers") == []


def test_reference_never_imports_the_nodes():
    assert _cross_layer_imports("reference") == []


def test_relative_imports_across_layers_are_caught(tmp_path, monkeypatch):
    """The scan itself: a relative import of nodes/ or reference/ from trainers/ is found."""
    fake = tmp_path / "trainers" / "methods"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from ...nodes import _host\nfrom ...reference.demo import m\n"
                               "from .. import loop\nfrom ... import reference\n"
                               "import comfy.sd\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = _cross_layer_imports("trainers")
    assert [f.split(": ", 1)[1] for f in found] == [
        "tsuika.nodes", "tsuika.nodes._host", "tsuika.reference.demo",
        "tsuika.reference.demo.m", "tsuika.reference", "comfy.sd"], found


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


def test_the_linter_keeps_the_house_rules_and_the_test_command_runs_it():
    """pyproject's ruff rules say what the code practises (no print in the library, no bare
    except, sorted imports, pyflakes), and `run.py test` runs ruff before pytest."""
    import tomllib

    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    lint = ruff["lint"]
    assert {"E", "F", "I", "T20"} <= set(lint["select"]), lint["select"]
    assert not {"E722", "T201", "F", "I001"} & set(lint.get("ignore", ())), lint["ignore"]
    # print stays allowed only in programs, never in the library's trainers/ or nodes/.
    print_ok = [glob for glob, rules in lint.get("per-file-ignores", {}).items()
                if "T20" in rules or "T201" in rules]
    assert [g for g in print_ok if g.startswith(("nodes", "trainers"))] == ["trainers/cli.py"]
    run_py = (ROOT / "run.py").read_text()
    assert run_py.index('"ruff", "check"') < run_py.index('"pytest", "-q"')


def test_every_package_folder_is_installed():
    """pip installs the packages pyproject lists, not the folders on disk: a sub-package left
    out (a module split into a folder) imports here and fails in an installed copy."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    on_disk = {".".join(["tsuika", *p.relative_to(ROOT).parts[:-1]])
               for layer in ("trainers", "nodes", "reference")
               for p in (ROOT / layer).rglob("__init__.py")} | {"tsuika"}
    assert "tsuika.trainers.config" in on_disk
    assert sorted(on_disk - listed) == [], "add these to pyproject's [tool.setuptools] packages"
