"""The same CLI command under ``accelerate launch`` with 2 processes (CPU, gloo)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

from tsuika.trainers.formats.safetensors_io import load_safetensors


def test_two_process_run_ends_with_identical_weights(tiny_model, image_folder, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate's launcher must be installed with the package"
    out = tmp_path / "out"
    sets = [a for o in tiny_overrides(tiny_model["single_file"], image_folder, out, steps=3)
            for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                        "no", "-m", "tsuika.trainers.cli", "train", "--quiet", *sets],
                       capture_output=True, text=True, env=env, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    # The loop all-gathers a checksum of every trainable weight and fails if ranks differ.
    m = re.search(r"ranks in sync: (\d+) processes", log)
    assert m and m.group(1) == "2", log[-4000:]
    tensors, meta = load_safetensors(out / "tsuika_lora.safetensors")
    assert meta["ss_steps"] == "3" and any(k.endswith(".alpha") for k in tensors)
