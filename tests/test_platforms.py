"""libtpu is installed by the `test` extra (plan compiles TPU programs on the CPU), yet CPU runs
must not start a TPU runtime: `platforms.avoid_absent_tpu` pins JAX to the CPU when no TPU is
attached, and host_memory counts libtpu as an accelerator only with TPU chips."""

import os
import subprocess
import sys

import jax
import pytest

from clip_jax import host_memory, platforms

# JAX's log line when it starts a backend (then libtpu fails on this machine, and JAX goes on
# with the CPU; libtpu's own errors depend on whether another process holds its lock file).
TPU_START = "Initializing backend 'tpu'"


def _machine(monkeypatch, *, libtpu=True, gpu=False, chips=0):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("JAX_FORCE_TPU_INIT", raising=False)
    monkeypatch.setattr(platforms, "tpu_runtime_installed", lambda: libtpu)
    monkeypatch.setattr(platforms, "gpu_plugin_installed", lambda: gpu)
    monkeypatch.setattr(platforms, "tpu_chips_attached", lambda: chips)


def test_cpu_only_when_libtpu_is_the_only_runtime_and_no_tpu_is_attached(monkeypatch):
    _machine(monkeypatch)
    assert host_memory.runs_on_cpu()  # libtpu alone: JAX computes on the CPU
    assert platforms.avoid_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == "cpu" and jax.config.jax_platforms == "cpu"

    for machine in ({"chips": 4}, {"gpu": True}, {"libtpu": False}):
        _machine(monkeypatch, **machine)
        assert not platforms.avoid_absent_tpu(), machine
        assert "JAX_PLATFORMS" not in os.environ
    _machine(monkeypatch, chips=4)
    assert not host_memory.runs_on_cpu()  # a TPU machine
    _machine(monkeypatch)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")  # the user's choice stands
    assert not platforms.avoid_absent_tpu() and os.environ["JAX_PLATFORMS"] == "tpu,cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setenv("JAX_FORCE_TPU_INIT", "1")
    assert not platforms.avoid_absent_tpu()


@pytest.mark.slow
def test_libtpu_installed_but_never_started_without_a_tpu():
    """The test extra brings libtpu; JAX alone would initialise it here (its start-up errors),
    after avoid_absent_tpu it does not, and JAX still gets its CPU devices."""
    assert platforms.tpu_runtime_installed(), "the test extra must install libtpu (jax[tpu])"
    if platforms.tpu_chips_attached():
        pytest.skip("a TPU is attached: JAX is meant to start libtpu here")
    # Without the TPU_* variables topology.get sets for compile-only devices in this process.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    runs = {}
    for avoid in (False, True):
        code = (
            "import logging\n"
            "logging.basicConfig()\n"
            "logging.getLogger('jax._src.xla_bridge').setLevel(logging.DEBUG)\n"
            "from clip_jax import platforms\n"
            f"if {avoid}: platforms.avoid_absent_tpu()\n"
            "import jax\n"
            "print(jax.devices()[0].platform, jax.default_backend())\n"
        )
        runs[avoid] = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert runs[avoid].returncode == 0, runs[avoid].stderr[-2000:]
        assert runs[avoid].stdout.split() == ["cpu", "cpu"]
    assert TPU_START in runs[False].stderr, runs[False].stderr[-2000:]
    assert TPU_START not in runs[True].stderr and "libtpu" not in runs[True].stderr
    assert "Initializing backend 'cpu'" in runs[True].stderr  # the log is on
