"""The XLA:CPU allocator settings (clip_jax.host_memory): when they apply and what they do."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys

import pytest

from clip_jax import host_memory

# Run in a fresh interpreter (mallopt is process-wide and must precede other threads' arenas):
# allocate and free a 256 MiB buffer twice from a worker thread, the way XLA's threads take a
# step's scratch buffer, and count the page faults of the second allocation.
_PROBE = r"""
import json, resource, sys, threading
import numpy as np
from clip_jax import host_memory
tuned = host_memory.tune_for_xla_cpu()
def touch():
    buffer = np.ones(2**25)  # 256 MiB, written in full
    del buffer
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker = threading.Thread(target=touch)
    worker.start(); worker.join()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _probe(**env_overrides) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k != "CLIP_JAX_TUNE_MALLOC"
    }
    env.update(JAX_PLATFORMS="cpu", **env_overrides)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)
def test_tuned_allocator_reuses_freed_pages():
    default = _probe()  # off unless asked for: the tuned heap costs peak memory
    tuned = _probe(CLIP_JAX_TUNE_MALLOC="1")
    assert default["tuned"] is False and tuned["tuned"] is True
    # Faults are counted per page touched: 65,536 pages of 4 KiB, or 128 where numpy gets
    # transparent huge pages (2 MiB) for its large buffers, as on Linux's madvise default.
    least_faults = 2**28 // 2**21
    # Defaults: each buffer is a fresh mmap, so the second one faults all its pages again.
    assert default["faults"][1] >= least_faults
    # Tuned: the second buffer reuses the heap pages the first one left behind.
    assert tuned["faults"][1] < least_faults // 10, tuned


def test_off_by_default_and_respects_user_choices(monkeypatch, caplog):
    # Decisions that return before mallopt is called, so this process's allocator is untouched.
    monkeypatch.delenv("CLIP_JAX_TUNE_MALLOC", raising=False)
    assert host_memory.tune_for_xla_cpu() is False
    monkeypatch.setenv("CLIP_JAX_TUNE_MALLOC", "0")
    assert host_memory.tune_for_xla_cpu(default=True) is False
    monkeypatch.setenv("CLIP_JAX_TUNE_MALLOC", "yes")
    with caplog.at_level(logging.WARNING):
        assert host_memory.tune_for_xla_cpu(default=True) is False
    assert "CLIP_JAX_TUNE_MALLOC='yes': expected 1" in caplog.text
    monkeypatch.setenv("CLIP_JAX_TUNE_MALLOC", "1")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own glibc tuning wins
    assert host_memory.tune_for_xla_cpu() is False


def test_runs_on_cpu_reads_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu()
    monkeypatch.delenv("JAX_PLATFORMS")
    for installed in (True, False):  # without JAX_PLATFORMS, an accelerator plugin decides
        monkeypatch.setattr(host_memory, "_accelerator_plugin_installed", lambda: installed)
        assert host_memory.runs_on_cpu() is not installed
