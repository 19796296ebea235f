"""Metric logging: TensorBoard event files, `metrics.jsonl` and a console progress line."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import numpy as np
from absl import logging

from clip_jax import accelerators


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` (one JSON object per logged step) and to
    TensorBoard event files under `workdir/tensorboard`. Only the primary process writes.

    `resume_step`: the step training (re)starts from. Rows of a previous attempt for later
    steps are dropped first (those steps run again and are logged again), so the file keeps
    one row per logged step across preemptions and restarts.
    """

    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        filename: str = "metrics.jsonl",
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, filename)
        if resume_step is not None:
            drop_rows_after(path, resume_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        import tensorflow as tf  # tf.summary writes the event files; already a dependency

        self._tf = tf
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=int(step)):
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tf.summary.scalar(k, v)
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites the JSONL file `path` without rows whose "step" is > `step` and without
    unparsable lines (a row torn by a crash mid-write); atomic (temporary file + rename).
    Returns how many lines were dropped; a missing file is left missing."""
    if not os.path.exists(path):
        return 0
    kept, dropped, torn = [], 0, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row_step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                torn += 1
                continue
            if isinstance(row_step, (int, float)) and row_step > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped or torn:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        logging.info(
            "%s: dropped %d rows after step %d (they are logged again on resume)",
            path,
            dropped,
            step,
        )
        if torn:
            logging.warning(
                "%s: dropped %d unreadable lines (torn by a crash mid-write?)", path, torn
            )
    return dropped + torn


def _to_python(value: Any) -> Any:
    value = np.asarray(value)
    if value.ndim == 0:
        return value.item()
    return value.tolist()


class Progress:
    """Throughput and ETA between log points; the time spent waiting for data is reported
    as `data_wait_fraction` of the wall time."""

    def __init__(self, total_steps: int, start_step: int, global_batch: int):
        self.total_steps = total_steps
        self.global_batch = global_batch
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._data_wait = 0.0

    def add_data_wait(self, seconds: float) -> None:
        self._data_wait += seconds

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps = step - self._last_step
        out = {
            "steps_per_sec": steps / elapsed,
            "samples_per_sec": steps * self.global_batch / elapsed,
            "data_wait_fraction": min(self._data_wait / elapsed, 1.0),
            "eta_sec": (self.total_steps - step) * elapsed / max(steps, 1),
        }
        self._last_step, self._last_time, self._data_wait = step, now, 0.0
        return out


def format_progress(step: int, total: int, scalars: Mapping[str, Any]) -> str:
    eta = scalars.get("eta_sec", 0.0)
    hours, rem = divmod(int(eta), 3600)
    return (
        f"step {step}/{total} ({100.0 * step / total:.1f}%) "
        f"loss {scalars.get('loss', float('nan')):.4f} "
        f"lr {scalars.get('lr', 0.0):.2e} "
        f"{scalars.get('steps_per_sec', 0.0):.2f} steps/s "
        f"{scalars.get('samples_per_sec', 0.0):.1f} samples/s "
        f"data-wait {100 * scalars.get('data_wait_fraction', 0.0):.0f}% "
        f"ETA {hours:d}:{rem // 60:02d}:{rem % 60:02d}"
    )


def peak_flops(device) -> float | None:
    """The dense bf16 peak of `device` in FLOP/s (None for CPUs and unknown chips), from the
    accelerator table in `clip_jax.accelerators`."""
    acc = accelerators.for_device(device)
    return acc.peak_bf16_flops if acc is not None else None


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a lowered or compiled program from XLA's cost analysis (None if
    absent). Prefer `model_flops`: see why there."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError) as e:
        logging.warning("no XLA cost analysis: %s", e)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = cost.get("flops") if cost else None
    return float(flops) if flops else None


def model_flops(fn, *abstract_args) -> float | None:
    """Model FLOPs of one call of `fn` (unsharded, un-jitted) on `abstract_args`
    (ShapeDtypeStructs): XLA's cost analysis of `fn` lowered for the CPU backend.

    Lowering needs no memory and the CPU backend exists on every host. The count is that of
    the computation as written, which is what MFU needs: after GPU compilation matmuls become
    cuBLAS custom calls that the compiled cost analysis does not count (it under-reports a
    ViT-B/16 step ~20x on an H100).
    """
    import jax

    try:
        lowered = jax.jit(fn).trace(*abstract_args).lower(lowering_platforms=("cpu",))
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        logging.warning("could not lower the step for a FLOP count: %s", e)
        return None
    return compiled_flops(lowered)


class _QuietLibraries:
    """absl log filter: drops INFO records from orbax (dozens per checkpoint save/restore)."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in record.pathname


def quiet_library_logs() -> None:
    """Keeps command-line output readable: our INFO logs stay, orbax's INFO chatter goes."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
