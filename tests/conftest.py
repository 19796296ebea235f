"""Test-session setup shared by every test.

Everything here must happen before jax or tensorflow start a backend, which is why it runs at
import time of the conftest (pytest imports it before any test module, and before pytest-xdist
starts its workers, which inherit these environment variables; so do the tests' subprocesses).
"""

import os
import shutil
import sys
import tempfile

# torch (a test-only peer) imports triton when it is installed; triton's native libraries crash
# the process (segfault) when TensorFlow was imported first, as it is in a whole-suite run.
# The tests run torch on CPU only, so torch is told triton is absent.
sys.modules.setdefault("triton", None)

# Quiet TensorFlow (both variables are needed) and keep it off any GPU.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests run on CPU with 8 virtual devices so that every sharding path is exercised; single-device
# references simply use jax.devices()[:1].
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _add_xla_flag(name: str, value: str) -> None:
    """Appends --name=value to XLA_FLAGS unless the caller's XLA_FLAGS already sets `name`."""
    flags = os.environ.get("XLA_FLAGS", "")
    if name not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


_add_xla_flag("xla_force_host_platform_device_count", "8")
# The suite's time is mostly XLA:CPU compiling tiny programs that then run a few steps. LLVM at
# -O0 compiles them 1.4-3.5x faster (tiny ResNet init 14.8 -> 4.2 s CPU, its gradient 5.6 ->
# 3.3 s) and runs them ~30% slower: test_models 71 -> 31 CPU s, test_scale 212 -> 151.
# Set xla_backend_optimization_level in XLA_FLAGS to test at another level.
_add_xla_flag("xla_backend_optimization_level", "0")

# One JAX persistent compilation cache per test run, shared by the xdist workers and the tests'
# subprocesses: the tests compile the same programs more than once (a resumed or relaunched
# run, the NaN policy's second run): test_train 244 -> 223 CPU s. Entries are keyed by the
# program, devices and flags, so a hit runs what a fresh compile would. A size limit makes JAX
# lock the folder (concurrent writers). Set JAX_COMPILATION_CACHE_DIR (empty: no cache) to
# choose; the folder created here is removed when the run ends.
_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="clip_jax_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))


def pytest_sessionfinish(session):
    # Only the process that created the folder (the xdist controller, or a plain run) removes it.
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
