"""A process holding a busy input pipeline's iterator exits instead of hanging (exit_guard)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A tokenising map kept busy at exit: the tokenizer sleeps with the GIL released, as the native
# one encodes. Without the exit hook this hung in 3 of 3 runs (the iterator's destructor waits
# for a worker that can no longer take the GIL).
BUSY_AT_EXIT = """
import time
import numpy as np
import tensorflow as tf
from clip_jax.data import pipeline

def slow_tokenizer(texts, context_length):
    time.sleep(0.3)
    return np.zeros((len(texts), context_length), np.int32)

ds = tf.data.Dataset.from_tensor_slices(["a b c"] * 64).batch(8).repeat()
ds = ds.map(lambda t: pipeline._tokenize_batch(t, slow_tokenizer, 77, 8), num_parallel_calls=4)
it = iter(ds.prefetch(4))
next(it)
print("pulled", flush=True)
"""

QUIESCE = """
import threading, time
from clip_jax.data import exit_guard

slow = exit_guard.guarded(lambda: time.sleep(0.5))
thread = threading.Thread(target=slow)
thread.start()
time.sleep(0.05)
t0 = time.monotonic()
assert exit_guard.quiesce(timeout_s=5, idle_s=0.05)
waited = time.monotonic() - t0
assert waited >= 0.4, waited  # waited for the running call
try:
    slow()
except exit_guard.InterpreterExiting:
    pass
else:
    raise AssertionError("a guarded call after quiesce ran")
items = exit_guard.guarded_iter(iter([1, 2]))
try:
    next(items)
except exit_guard.InterpreterExiting:
    print("ok", flush=True)
"""


def _run(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.slow
def test_process_with_busy_pipeline_iterator_exits():
    t0 = time.monotonic()
    proc = _run(BUSY_AT_EXIT, timeout=90)  # a hang raises TimeoutExpired
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pulled" in proc.stdout
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_quiesce_waits_for_running_callbacks_then_refuses_new_ones():
    proc = _run(QUIESCE, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
