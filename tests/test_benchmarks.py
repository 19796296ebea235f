"""The benchmark scripts still run and print the JSON lines RESULTS.md is built from.

Smoke runs at toy sizes (tiny-vit, batch 8, one step): they check the scripts' output, never
their timings.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, result.stdout[-2000:]
    return rows


def test_compare_open_clip_prints_both_frameworks_and_their_ratio():
    rows = _run("compare_open_clip.py", "--model", "tiny-vit", "--batch", "8", "--steps", "1",
                "--repeats", "2", "--warmup-rounds", "1")
    jax_row, torch_row, ratio_row = rows
    assert (jax_row["framework"], torch_row["framework"]) == ("clip_jax", "open_clip")
    for row in (jax_row, torch_row):
        assert len(row["round_step_s"]) == 2 and all(t > 0 for t in row["round_step_s"])
        assert min(row["round_step_s"]) <= row["step_s"] <= max(row["round_step_s"])
        assert row["model"] == "tiny-vit" and row["batch"] == 8 and row["cpu"]
    assert abs(ratio_row["ratio_clip_jax_over_open_clip"]
               - jax_row["step_s"] / torch_row["step_s"]) < 1e-9


def test_train_step_reports_throughput_and_model_flops():
    (row,) = _run("train_step.py", "--model", "tiny-vit", "--batch", "8", "--steps", "1",
                  "--warmup", "1")
    assert row["benchmark"] == "train_step" and row["batch"] == 8
    assert row["step_s"] > 0 and row["samples_per_s"] == 8 / row["step_s"]
    # Forward + backward of both towers: a few GFLOP for tiny-vit at batch 8, not zero/None.
    assert 1e8 < row["flops_per_step"] < 1e11
