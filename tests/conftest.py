"""Test-session setup shared by every test.

Everything here must happen before jax or tensorflow start a backend, which is why it runs at
import time of the conftest (pytest imports it before any test module).
"""

import os
import sys

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
