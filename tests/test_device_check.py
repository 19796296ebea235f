"""benchmarks/device_check.sh works before a GPU machine is available: its --dry-run runs every
part on CPU at toy sizes. Plus the profile parser on a GPU-shaped trace and the wheel filter."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import device_check  # noqa: E402
import profile_summary  # noqa: E402


@pytest.mark.slow
def test_dry_run_produces_every_part(tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DEVICE_CHECK_WHEELS=str(tmp_path / "none"),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "device_check.sh"), "--dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_part = {}
    for row in rows:
        by_part.setdefault(row["part"], []).append(row)
    failed = [
        r
        for r in rows
        if r.get("status") in ("failed", "timeout", "oom") and r["part"] != "attention"
    ]
    assert not failed, failed

    (env_row,) = by_part["env"]
    assert env_row["backend"] == "cpu" and env_row["matmul_tflop_per_s"] > 0

    attention = {r["variant"]: r for r in by_part["attention"]}
    assert attention["xla"]["status"] == "ok" and attention["xla"]["nonfinite"] == 0
    assert attention["xla_pad2"]["length"] == 66  # tiny-vit: 64 patches + class token
    assert attention["xla_pad2"]["max_abs_grad_vs_xla"] < 1e-2  # same math, bf16
    assert attention["cudnn"]["status"] == "failed" and "cuDNN" in attention["cudnn"]["error"]
    assert attention["model_cudnn"]["plan"].startswith("xla")  # the model's fallback

    (step,) = by_part["train_step"]
    assert step["samples_per_s"] > 0 and step["attention_impl"] == "cudnn"
    assert step["flops_per_step"] > 0

    profile = by_part["profile"]
    assert profile[0]["kind"] == "profile_info" and profile[0]["steps"] == 2
    assert sum(r["kind"] == "profile_op" for r in profile) >= 5

    assert {r["part_name"] for r in by_part["breakdown"]} == {
        "image_fwd_bwd",
        "text_fwd_bwd",
        "matmul_reference",
    }

    pipeline = by_part["pipeline"]
    try:
        import tensorflow  # noqa: F401

        throughput = [r for r in pipeline if r.get("kind") == "throughput"]
        assert {r["threads"] for r in throughput} == {1} and len(throughput) == 6  # 6 pipelines
    except ImportError:
        assert pipeline[0]["status"] == "skipped"

    summary = (out / "summary.md").read_text()
    for heading in (
        "## Train step",
        "## Attention variants",
        "## Profile",
        "## Where the step goes",
    ):
        assert heading in summary, summary
    assert (out / "runs.log").stat().st_size > 0
    assert profile_summary.summarize(str(out / "trace.json.gz"))[0]["steps"] == 2
    assert len(list(out.iterdir())) <= 8  # what `run` brings back from $OUT


def _gpu_trace(path: pathlib.Path) -> None:
    """A trace shaped like an XLA:GPU profile: a host process and /device:GPU:0 with an
    'XLA Ops' line, an 'XLA Modules' line and a CUDA stream line, two steps."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {
            "ph": "M",
            "pid": 7,
            "tid": 3,
            "name": "thread_name",
            "args": {"name": "Stream #13(Compute)"},
        },
    ]
    events = []
    for step in range(2):
        t = step * 1000.0
        events += [
            {
                "ph": "X",
                "pid": 1,
                "tid": 1,
                "ts": t,
                "dur": 900,
                "name": "train",
                "args": {"step_num": str(step)},
            },
            {"ph": "X", "pid": 7, "tid": 1, "ts": t, "dur": 800, "name": "jit_train_step"},
            {"ph": "X", "pid": 7, "tid": 2, "ts": t, "dur": 300, "name": "cublas-gemm.3"},
            {"ph": "X", "pid": 7, "tid": 2, "ts": t + 300, "dur": 100, "name": "fusion.12"},
            {"ph": "X", "pid": 7, "tid": 2, "ts": t + 400, "dur": 100, "name": "custom-call.4"},
            {
                "ph": "X",
                "pid": 7,
                "tid": 3,
                "ts": t,
                "dur": 300,
                "name": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64",
            },
            {
                "ph": "X",
                "pid": 7,
                "tid": 3,
                "ts": t + 300,
                "dur": 100,
                "name": "loop_multiply_fusion",
            },
            {
                "ph": "X",
                "pid": 7,
                "tid": 3,
                "ts": t + 400,
                "dur": 100,
                "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16",
            },
        ]
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": meta + events}, f)


def test_profile_summary_reads_device_ops_and_kernels(tmp_path):
    run_dir = tmp_path / "plugins" / "profile" / "2026_12_01"
    run_dir.mkdir(parents=True)
    _gpu_trace(run_dir / "perfetto_trace.json.gz")
    rows = profile_summary.summarize(str(tmp_path), top=10)
    info = rows[0]
    assert info["platform"] == "device" and info["steps"] == 2
    assert info["busy_ms_per_step"] == {"op": 0.5, "kernel": 0.5}  # XLA Modules left out
    ops = {r["name"]: r for r in rows if r["kind"] == "profile_op" and r["level"] == "op"}
    assert list(ops)[0] == "cublas-gemm.3" and ops["cublas-gemm.3"]["share"] == 0.6
    assert ops["cublas-gemm.3"]["per_step_ms"] == 0.3 and ops["fusion.12"]["category"] == "other"
    kernels = {
        r["category"]: r["per_step_ms"]
        for r in rows
        if r["kind"] == "profile_category" and r["level"] == "kernel"
    }
    assert kernels == {"gemm": 0.3, "attention": 0.1, "other": 0.1}
    assert "python" not in {r["name"] for r in rows if r["kind"] == "profile_op"}


def test_missing_wheels_lists_only_packages_not_installed(tmp_path, capsys):
    for name in (
        "numpy-1.0-py3-none-any.whl",
        "surely_not_installed_pkg-1.0-py3-none-any.whl",
        "README.txt",
    ):
        (tmp_path / name).write_text("")
    device_check.missing_wheels(str(tmp_path))
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "surely_not_installed_pkg-1.0-py3-none-any.whl")
    ]
