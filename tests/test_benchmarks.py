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

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, result.stdout[-2000:]
    return rows


@pytest.mark.slow
def test_compare_open_clip_prints_both_frameworks_and_their_ratio():
    rows = _run(
        "compare_open_clip.py",
        "--model",
        "tiny-vit",
        "--batch",
        "8",
        "--steps",
        "1",
        "--repeats",
        "2",
        "--warmup-rounds",
        "1",
    )
    jax_row, torch_row, ratio_row = rows
    assert (jax_row["framework"], torch_row["framework"]) == ("clip_jax", "open_clip")
    for row in (jax_row, torch_row):
        assert len(row["round_step_s"]) == 2 and all(t > 0 for t in row["round_step_s"])
        assert min(row["round_step_s"]) <= row["step_s"] <= max(row["round_step_s"])
        assert row["model"] == "tiny-vit" and row["batch"] == 8 and row["cpu"]
    assert (
        abs(ratio_row["ratio_clip_jax_over_open_clip"] - jax_row["step_s"] / torch_row["step_s"])
        < 1e-9
    )


@pytest.mark.slow
def test_train_step_reports_throughput_and_model_flops():
    (row,) = _run(
        "train_step.py", "--model", "tiny-vit", "--batch", "8", "--steps", "1", "--warmup", "1"
    )
    assert row["benchmark"] == "train_step" and row["batch"] == 8
    assert row["step_s"] > 0 and row["samples_per_s"] == 8 / row["step_s"]
    # Forward + backward of both towers: a few GFLOP for tiny-vit at batch 8, not zero/None.
    assert 1e8 < row["flops_per_step"] < 1e11


@pytest.mark.slow
def test_efficient_training_prints_a_row_per_config_and_a_summary():
    rows = _run(
        "efficient_training.py",
        *("--model", "tiny-vit", "--batch", "4", "--rounds", "1", "--steps", "1"),
        *("--configs", "base,patch_dropout_0.75"),
    )
    timed = [r for r in rows if "step_s_median" in r]
    assert [r["config"] for r in timed] == ["base", "patch_dropout_0.75"]
    assert timed[0]["time_ratio"] == 1.0 and timed[1]["patch_dropout"] == 0.75
    assert timed[1]["flops_ratio"] < 0.9  # a quarter of the patches: fewer FLOPs (XLA's count)
    assert set(rows[-1]["ratios"]) == {"base", "patch_dropout_0.75"}


@pytest.mark.slow
def test_input_pipeline_quick_prints_throughput_and_resume_rows():
    # Two cases (the non-decode 16 px one and one resize case) keep this under a minute on a
    # busy 2-core machine; --threads 1 exercises the pinning path.
    rows = _run("input_pipeline.py", "--quick", "--cases", "16px,256px,resume", "--threads", "1")
    kinds = [row["kind"] for row in rows]
    assert kinds == ["setup"] + ["throughput"] * 12 + ["resume"] * 15, kinds
    setup = rows[0]
    assert setup["cores"] == 1 and setup["threads"] == 1
    assert set(setup["datasets"]) == {"16px", "256px"}
    throughput = rows[1:13]
    assert {(r["case"], r["pipeline"]) for r in throughput} == {
        (case, pipe)
        for case in ("16px", "256px")
        for pipe in (
            "reference",
            "reference_notok",
            "clip_jax_tar",
            "clip_jax_tfrecord",
            "clip_jax_tfds",
            "clip_jax_mix",
        )
    }
    for row in throughput:
        assert row["image_size"] == {"16px": 16, "256px": 224}[row["case"]]
        rounds = row["round_samples_per_s"]
        assert len(rounds) == row["rounds"] == 3 and all(v > 0 for v in rounds)
        assert row["samples_per_s_min"] <= row["samples_per_s"] <= row["samples_per_s_max"]
        assert row["samples_per_s_per_core"] == row["samples_per_s"]  # one core
        assert row["ratio_to_reference"] > 0 and row["first_batch_s"] > 0
        assert row["peak_rss_mb"] > 0 and row["cores"] == 1
        assert row["cpu_ms_per_sample"] > 0 and row["cpu_ratio_to_reference"] > 0
        if row["pipeline"] == "reference":
            assert row["ratio_to_reference"] == 1.0
    resume = rows[13:]
    assert [(r["source"], r["start_position"], r["count_cache"]) for r in resume] == [
        (s, p, c)
        for s in ("tar", "tfrecord", "tfds")
        for p in (0, 512, 1536)
        for c in ("cold", "warm")
        if p or c == "cold"
    ]
    for row in resume:
        # The first batch after resuming at p ends at raw position p + batch size.
        assert row["first_batch_position"] == row["start_position"] + row["batch_size"]
        assert row["first_batch_s"] > 0 and row["ratio_to_p0"] > 0
        assert isinstance(row["within_goal"], bool)
    assert [r["ratio_to_p0"] for r in resume if r["start_position"] == 0] == [1.0] * 3
