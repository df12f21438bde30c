#!/usr/bin/env python3
"""Set up a local environment and run Tsuika's demo or its tests, on a machine with only Python.

    python3 run.py demo     # train a LoRA on the bundled sample data, write results to outputs/demo
    python3 run.py test     # check the code with ruff, then run the test suite

The first call creates ``.venv`` next to this file. torch is installed only when the venv has
none (``TSUIKA_TORCH`` chooses the requirement, default ``torch==2.13.0``); an installed torch
is always kept, whatever its version or CUDA flavour.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def has(module: str) -> bool:
    return subprocess.run([str(PY), "-c", f"import {module}"], capture_output=True).returncode == 0


def setup() -> None:
    if not PY.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not has("torch"):
        sh(PY, "-m", "pip", "install", "-q", os.environ.get("TSUIKA_TORCH", "torch==2.13.0"))
    # Checked module by module: a .venv made before an extra joined [test] gets it too.
    if not all(has(m) for m in ("tsuika.trainers.loop", "pytest", "ruff", "onnx",
                                "onnxruntime")):
        sh(PY, "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]")


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("demo", "test"):
        print(__doc__)
        return 2
    setup()
    if what == "demo":
        # The module, not the tsuika-demo script: a .venv made before the script existed has
        # no script, but its editable install already sees the module.
        sh(PY, "-m", "tsuika.reference.demo", "outputs/demo", *sys.argv[2:])
    else:
        # The house rules first (pyproject.toml [tool.ruff]): seconds, and a clear list.
        sh(PY, "-m", "ruff", "check", ".")
        sh(PY, "-m", "pytest", "-q", *sys.argv[2:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
