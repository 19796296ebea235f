"""Host allocator settings that can make XLA:CPU steps faster (glibc malloc); opt-in.

XLA:CPU takes one large scratch buffer per executed step (6.6 GiB for a ViT-B-32 train step at
batch 64) and frees it at the end. With glibc's defaults that buffer comes from a fresh `mmap`
(allocations above the mmap threshold, and all large allocations of a thread's non-main arena)
and is unmapped on free, so every step the kernel zeroes and faults in gigabytes again: ~30% of
the step's wall time on a 2-core machine. Keeping every thread on the main arena, never serving
allocations by `mmap` and never trimming the heap lets the next step reuse the same pages
(ViT-B-32 batch 64 step 19.4-22.4 s -> 16.0-16.6 s).

Off unless asked for (`CLIP_JAX_TUNE_MALLOC=1`): the single arena fragments and never shrinks.
The default `tiny` training run (batch 256, 60 steps, measured with /usr/bin/time -v) peaked
at 2.33-2.34 GB RSS with glibc's defaults and 4.0-4.9 GB tuned (6.6 GB by step ~500), at the
same speed on an idle 2-core machine (200 vs 193 samples/s; on one shared by ~8 busy
processes tuned ran faster, 66-75 vs 43-48 samples/s). Keeping `mmap` off and the heap
untrimmed but the arenas at their default does not help: a non-main arena serves a large
request by `mmap` whatever M_MMAP_MAX says (the page faults stayed those of the defaults).

The settings only take effect when applied before XLA's CPU client starts its threads, i.e.
before the first JAX computation or `jax.devices()` call; `python -m clip_jax.train` and
`python -m clip_jax.evaluate` call `tune_for_xla_cpu` first thing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

TUNE_VARIABLE = "CLIP_JAX_TUNE_MALLOC"


def _accelerator_plugin_installed() -> bool:
    """True when JAX would use an accelerator plugin: a GPU plugin is installed, or libtpu is
    and a TPU is attached (libtpu alone, as the `test` extra installs it, leaves JAX on the
    CPU: `clip_jax.platforms`)."""
    from clip_jax import platforms

    return platforms.accelerator_runtime_present()


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the host CPU, decided without starting a JAX backend:
    `JAX_PLATFORMS` when set, otherwise the absence of a usable accelerator plugin."""
    requested = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if requested:
        return requested.split(",")[0] == "cpu"
    return not _accelerator_plugin_installed()


def tune_for_xla_cpu(default: bool = False) -> bool:
    """Apply the allocator settings when asked for: `CLIP_JAX_TUNE_MALLOC=1` (or `default=True`
    with the variable unset; `CLIP_JAX_TUNE_MALLOC=0` always wins).

    Returns True when applied. Also skipped (with a warning) for any other value of the
    variable, and skipped (False) when any `MALLOC_*` environment variable is
    set (the user's own glibc tuning wins), on non-glibc systems, and when JAX will use an
    accelerator (a single malloc arena could slow a many-threaded input pipeline there, and the
    host allocator does not hold the step's buffers). Must run before the first JAX computation
    to have an effect (see the module docstring).
    """
    value = os.environ.get(TUNE_VARIABLE, "")
    if value not in ("", "0", "1"):
        # A warning, not an exception: this runs before the entry points' error handling.
        logging.warning(
            "%s=%r: expected 1 (tune glibc malloc for XLA:CPU) or 0; keeping glibc's defaults",
            TUNE_VARIABLE,
            value,
        )
        return False
    if not (value == "1" or (value == "" and default)):
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if not runs_on_cpu():
        return False
    libc = ctypes.CDLL("libc.so.6")
    # -1 as the trim threshold is SIZE_MAX inside glibc: never give the heap top back (an
    # int-sized threshold, at most 2 GiB, would still trim a multi-GiB scratch buffer).
    applied = (
        libc.mallopt(_M_ARENA_MAX, 1) == 1
        and libc.mallopt(_M_MMAP_MAX, 0) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    )
    if applied:
        logging.info(
            "glibc malloc tuned for XLA:CPU (one arena, no mmap, no trim): faster "
            "large steps, higher peak memory"
        )
    else:
        logging.warning("mallopt refused the XLA:CPU allocator settings; keeping defaults")
    return applied
