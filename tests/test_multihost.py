"""launch/local.sh: 2 processes x 4 CPU devices == 1 process x 8 devices; a killed process makes
its peer fail fast with a clear message; the restarted job resumes from the checkpoint."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_runs import REPO, SMALL_FLAGS, losses, read_metrics, small_config

from clip_jax import checkpoint, train

LAUNCHER = REPO / "launch" / "local.sh"
pytestmark = pytest.mark.slow  # every test launches processes


def _args(workdir, **overrides):
    args = [
        "--config",
        str(REPO / "configs" / "clip.py") + ":tiny",
        "--workdir",
        str(workdir),
        "--config.data.source=synthetic",
        "--config.batch_size=16",
        *SMALL_FLAGS,
        "--config.log_every=1",
        "--config.optim.warmup_steps=2",
        "--config.data.shuffle_buffer=64",
    ]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def _launch(num, args, **popen):
    env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS="4")
    return subprocess.Popen(
        ["bash", str(LAUNCHER), str(num), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def test_two_processes_match_one_process(tmp_path):
    proc = _launch(2, _args(tmp_path / "multi", total_steps=5, checkpoint_every=0))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "mesh {'data': 8, 'fsdp': 1}" in out
    train.train(small_config(), str(tmp_path / "single"), devices=jax.devices()[:8])
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == [1, 2, 3, 4, 5]
    for step in single:
        np.testing.assert_allclose(multi[step], single[step], rtol=1e-5, err_msg=f"step {step}")
    # Only process 0 writes metrics; both processes wrote their part of the checkpoint.
    assert (tmp_path / "multi" / "metrics.jsonl").read_text().count("\n") == 5
    assert checkpoint.Checkpointer(str(tmp_path / "multi"), read_only=True).all_steps() == [5]


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_killed_process_fails_fast_and_the_job_resumes(tmp_path):
    workdir = tmp_path / "w"
    args = _args(
        workdir, total_steps=100000, checkpoint_every=2, **{"distributed.heartbeat_timeout_s": 10}
    )
    log = open(tmp_path / "first.log", "w+")
    proc = _launch(2, args, start_new_session=True)
    lines = []

    def read_until(pattern, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            log.write(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no {pattern!r} in output:\n{''.join(lines)[-4000:]}")

    pid1 = int(read_until(r"started process 1 pid (\d+)", 30).group(1))
    read_until(r"step 5/", 240)  # checkpoints at 2 and 4 exist or are being written
    # Orbax renames a step's directory into place only once it is complete.
    _wait_for(lambda: os.path.isdir(workdir / "checkpoints" / "4"), 30, "checkpoint 4")
    os.kill(pid1, signal.SIGKILL)
    killed_at = time.time()
    out, _ = proc.communicate(timeout=120)
    elapsed = time.time() - killed_at
    out = "".join(lines) + out
    assert proc.returncode != 0
    # The survivor stops on its own (gloo error or heartbeat timeout), well before local.sh's
    # own 300 s grace period, with a message saying why.
    assert elapsed < 60, elapsed
    assert re.search(r"\[process 0\].*(another process died|heartbeat|another task died)", out), (
        out[-4000:]
    )
    assert "killing the remaining" not in out

    saved = checkpoint.Checkpointer(str(workdir), read_only=True).latest_step()
    assert saved is not None and saved >= 2
    first_run = {row["step"]: row["loss"] for row in read_metrics(workdir)}
    # Restart the same command: it resumes from the checkpoint; SIGTERM then saves and stops.
    proc = _launch(2, args, start_new_session=True)
    lines.clear()
    read_until(rf"resuming from step {saved}", 120)
    read_until(rf"step {saved + 1}/", 120)
    read_until(rf"step {saved + 2}/", 120)
    proc.send_signal(signal.SIGTERM)  # forwarded by local.sh to both processes
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, ("".join(lines) + out)[-4000:]
    # Steps logged by both runs (after the checkpoint, before the kill) have equal losses:
    # the resumed run replays exactly the same batches from the same state. The first run's
    # rows after the checkpoint were dropped on resume: one row per step.
    rows = read_metrics(workdir)
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), steps
    for row in (r for r in rows if saved < r["step"] <= max(first_run)):
        np.testing.assert_allclose(
            row["loss"], first_run[row["step"]], rtol=1e-5, err_msg=f"step {row['step']}"
        )
    assert checkpoint.Checkpointer(str(workdir), read_only=True).latest_step() > saved
