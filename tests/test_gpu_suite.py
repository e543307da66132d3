"""The GPU benchmark suite's dry run: the same code as on a GPU, at tiny sizes on this CPU."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.py")


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on a GPU
    proc = subprocess.run([sys.executable, SUITE, "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    assert table.splitlines()[2] == (
        "| benchmark | setting | JAX | baseline | baseline / JAX | MFU |")
    for label in ("UNet forward", "Sampling (Leffa)", "Leffa loss + grad", "Training step"):
        assert f"| {label}" in table, label
    assert (tmp_path / "gpu_suite.md").read_text().strip() == table.strip()

    # Every ratio in the table is the stage's own raw timings divided (baseline / JAX).
    unet = json.loads((tmp_path / "unet_forward.json").read_text())
    assert f"| {unet['torch_s'] / unet['jax_s']:.2f}x |" in table
    sample = json.loads((tmp_path / "sample.json").read_text())
    js, ts = sample["jax"]["runs"][0]["s_per_image"], sample["torch"]["runs"][0]["s_per_image"]
    assert f"| {ts / js:.2f}x |" in table
    train = json.loads((tmp_path / "train_step.json").read_text())["sizes"]["64x48"]
    jt = statistics.median(train["jax_leffa"]["times_s"])
    tt = statistics.median(train["torch_leffa"]["times_s"])
    assert f"| {tt / jt:.2f}x |" in table
