"""Which JAX accelerator runtimes would start here, decided without starting one.

libtpu is installed on machines without a TPU too: the `test` and `tpu` extras bring it so that
`clip_jax.plan` and the tests can compile TPU programs on the CPU. With it installed and
`JAX_PLATFORMS` unset, JAX's first backend call loads libtpu and initialises its runtime even when
no TPU chip is attached: measured (jax 0.10.2, libtpu 0.0.42.1, no TPU) ~0.7 s and three
multi-line errors on stderr about the undetermined TPU accelerator type and worker hostnames,
before JAX falls back to the CPU. `avoid_absent_tpu` keeps the entry points
(`python -m clip_jax.train`, `clip_jax.evaluate`, ...) on the CPU then.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re

_TPU_DISTRIBUTIONS = re.compile(r"^(libtpu|libtpu[-_]nightly|jax[-_]tpu)$", re.IGNORECASE)
_GPU_DISTRIBUTIONS = re.compile(r"^(jax[-_]cuda|jax[-_]rocm)", re.IGNORECASE)


def _installed(pattern: re.Pattern) -> bool:
    return any(
        pattern.match(dist.metadata["Name"] or "") for dist in importlib.metadata.distributions()
    )


def tpu_runtime_installed() -> bool:
    """libtpu (or a jax TPU plugin) is installed."""
    return _installed(_TPU_DISTRIBUTIONS)


def gpu_plugin_installed() -> bool:
    """A JAX CUDA or ROCm plugin is installed (JAX tries it when JAX_PLATFORMS is unset)."""
    return _installed(_GPU_DISTRIBUTIONS)


def tpu_chips_attached() -> int:
    """TPU chips on this machine's PCI bus (what JAX's own TPU set-up reads; 0 without one)."""
    from jax._src import hardware_utils  # imports no backend

    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])


def accelerator_runtime_present() -> bool:
    """JAX would compute on an accelerator when JAX_PLATFORMS is unset: a GPU plugin is
    installed, or libtpu is and TPU chips are attached."""
    return gpu_plugin_installed() or (tpu_runtime_installed() and tpu_chips_attached() > 0)


def avoid_absent_tpu() -> bool:
    """Pins JAX to the CPU when its only accelerator runtime is libtpu and no TPU is attached,
    so no TPU runtime is initialised (see the module docstring). Returns True when it did.

    Leaves JAX alone when `JAX_PLATFORMS` is set (the user's choice) or `JAX_FORCE_TPU_INIT` is,
    on TPU machines, and when a GPU plugin is installed (JAX then picks among GPU, TPU and CPU
    itself; libtpu's start-up errors stay). Must run before JAX's first backend call (before
    `jax.devices()` or the first computation); sets `JAX_PLATFORMS` for child processes too.
    """
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    if not tpu_runtime_installed() or gpu_plugin_installed() or tpu_chips_attached() > 0:
        return False
    import jax

    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")  # jax read JAX_PLATFORMS when it was imported
    logging.info("libtpu is installed but no TPU is attached: JAX runs on the CPU")
    return True
