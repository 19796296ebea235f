"""Test-session setup shared by every test.

Everything here must happen before jax or tensorflow start a backend, which is why it runs at
import time of the conftest (pytest imports it before any test module).
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
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# One JAX persistent compilation cache for the whole test run, shared by the xdist workers and by
# every subprocess the tests start (they inherit these variables): the tests compile the same
# tiny train steps and embedders many times (a resumed run, a relaunched job, a CLI beside the
# in-process run). Executables are keyed by their HLO, devices and flags, so a hit runs exactly
# what a fresh compile would. The folder is removed when the run ends.
_CACHE_DIR = os.path.join(
    tempfile.gettempdir(),
    f"clip_jax_tests_jax_cache_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}",
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session):
    # xdist workers share the folder: only the controller (or a plain run) removes it.
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
