"""`python -m clip_jax.train --config configs/clip.py:tiny --workdir runs/tiny`.

Reads top to bottom. `train`: distributed init -> config checks -> mesh -> model, optimizer,
shardings and step (`clip_jax.train_setup`) -> workdir lock. `_train_locked`: restore or
initialise the state -> compile the step, count its FLOPs -> input pipeline -> the loop: next
batch -> step -> maybe evaluate -> maybe log -> maybe checkpoint -> maybe stop. The helpers
follow in that order: state and compilation, input and preemption, the metric log,
evaluation and checkpoint metadata.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any, NamedTuple

# TensorFlow (tf.data) is loud by default; keep its C++ logs to warnings and up.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from clip_jax import checkpoint as ckpt_lib
from clip_jax import (
    cli,
    host_memory,
    platforms,
    sharding,
    tokenizers,
    train_setup,
    workdir_lock,
)
from clip_jax import data as data_lib
from clip_jax import metrics as metrics_lib
from clip_jax import step as step_lib
from clip_jax.models import overrides as overrides_lib
from clip_jax.models import transformer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/clip.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")

ConfigError = train_setup.ConfigError  # the config asks for something impossible


def maybe_initialize_distributed(config) -> None:
    d = config.distributed
    if not d.initialize:
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes >= 0:
        kwargs["num_processes"] = d.num_processes
    if d.process_id >= 0:
        kwargs["process_id"] = d.process_id
    # A process whose peer died must not wait forever: the coordination service declares a
    # process dead after `heartbeat_timeout_s` without a heartbeat and terminates the others.
    jax.distributed.initialize(
        **kwargs,
        heartbeat_timeout_seconds=int(d.heartbeat_timeout_s),
        initialization_timeout=int(d.initialization_timeout_s),
    )
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def validate_config(config, mesh=None) -> None:
    """Raises ConfigError naming the offending key for any impossible value: the model and step
    checks of `train_setup.validate_step_config`, then the run's own (schedule, logging,
    checkpoints, distributed, evaluation, init_from, data)."""
    train_setup.validate_step_config(config, mesh, jax.process_count())
    check = train_setup.require
    check(config.total_steps > 0, "total_steps", config.total_steps, "must be positive")
    check(config.log_every > 0, "log_every", config.log_every, "must be positive")
    check(
        config.checkpoint_every >= 0,
        "checkpoint_every",
        config.checkpoint_every,
        "must be >= 0 (0: only at the end)",
    )
    check(config.keep_checkpoints >= 1, "keep_checkpoints", config.keep_checkpoints, "must be >= 1")
    check(
        config.nan_policy in ("stop", "skip"),
        "nan_policy",
        config.nan_policy,
        "must be 'stop' or 'skip'",
    )
    check(
        config.distributed.heartbeat_timeout_s > 0,
        "distributed.heartbeat_timeout_s",
        config.distributed.heartbeat_timeout_s,
        "must be positive",
    )
    check(
        0 <= config.get("ema_decay", 0.0) < 1,
        "ema_decay",
        config.get("ema_decay", 0.0),
        "must be in [0, 1) (0: no moving average)",
    )
    check(config.eval_every >= 0, "eval_every", config.eval_every, "must be >= 0 (0: never)")
    if config.eval_every:
        from clip_jax.evaluation import config as eval_config

        try:
            eval_config.validate(config.eval)
        except ValueError as e:
            raise ConfigError(f"config.eval: {e}") from None
    if config.init_from:
        # A Hub reference is only located here; train_setup.load_model downloads it.
        from clip_jax import model_store

        try:
            kind, _, _ = model_store.locate(config.init_from)
        except ckpt_lib.CheckpointError as e:
            raise ConfigError(f"config.init_from: {e}") from None
        if kind != "hub" and mesh is None:
            # The weights' description (model.json / checkpoint metadata, no arrays): options
            # that do not fit their architecture fail here, before anything is read or built.
            train_setup.load_model(config, with_weights=False)
    try:
        data_lib.validate(config.data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if mesh is None:
        _check_data_files(config.data)


def _check_data_files(data_config) -> None:
    """Resolves the tar/tfrecord shard patterns now, before the workdir is created, so a
    missing, unmatched or unreadable shard is a ConfigError naming it (the pipeline resolves
    them again when it is built: for remote shard lists this doubles the listing cost)."""
    from clip_jax.data import config as data_config_lib
    from clip_jax.data import shards as shards_lib

    for spec in data_config_lib.source_specs(data_config):
        if spec.source not in ("tar", "tfrecord"):
            continue
        try:
            files = shards_lib.resolve_files(spec.shards, what=f"{spec.source} shards")
        except (ValueError, OSError) as e:
            raise ConfigError(f"config.data: {e}") from None
        for path in files:
            if "://" not in path and os.path.isdir(path):
                raise ConfigError(
                    f"config.data: {spec.source} shard {path!r} is a directory, "
                    f"not a shard file (use a pattern like {path}/*.tar)"
                )


def _prepare_workdir(workdir: str) -> None:
    """Creates `workdir` (and parents); a path that cannot be a directory is a ConfigError."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--workdir {workdir}: exists and is not a directory") from None
    except NotADirectoryError:
        parent = os.path.dirname(os.path.abspath(workdir))
        while parent != os.path.dirname(parent) and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        raise ConfigError(
            f"--workdir {workdir}: cannot create it, {parent} is a file, not a directory"
        ) from None
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot create it: {e.strerror}") from None


def _lock_workdir(workdir: str) -> workdir_lock.WorkdirLock | None:
    """Process 0 locks the workdir; every process raises WorkdirLockedError if that failed."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = workdir_lock.WorkdirLock(workdir)
        try:
            lock.acquire()
        except workdir_lock.WorkdirLockedError as e:
            lock, error = None, e
    if _any_process(error is not None):
        raise error or workdir_lock.WorkdirLockedError(
            f"workdir {os.path.abspath(workdir)} is in use by another run (see process 0)"
        )
    return lock


def train(config, workdir: str, devices: list | None = None) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics plus `step` (and
    `preempted: True` when SIGTERM ended the run).

    `devices` restricts the mesh to a subset of this process's devices (tests compare 1 and 8
    devices in one process); default: every device of every process.
    """
    maybe_initialize_distributed(config)
    validate_config(config)

    # Mesh: every device of every process; batch split over (data, fsdp).
    try:
        mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    validate_config(config, mesh)

    # Model, optimizer, shardings and the jitted step (no parameter values yet).
    setup = train_setup.build(config, mesh)
    tokenizer = tokenizers.get(setup.tokenizer_name)
    if tokenizer.vocab_size > setup.model_config.text.vocab_size:
        raise ConfigError(
            f"tokenizer {setup.tokenizer_name!r} has {tokenizer.vocab_size} tokens but "
            f"the text tower's vocabulary is {setup.model_config.text.vocab_size}"
        )

    # Everything above only reads; from here on the workdir is written, by one run at a time.
    _prepare_workdir(workdir)
    lock = _lock_workdir(workdir)
    try:
        return _train_locked(config, workdir, setup, tokenizer)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config, workdir: str, setup: train_setup.TrainSetup, tokenizer) -> dict[str, Any]:
    """The run proper, with the workdir lock held: state, compiled step, input, then the loop
    next batch -> step -> maybe evaluate -> maybe log -> maybe checkpoint -> maybe stop."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
    with contextlib.ExitStack() as cleanup:
        checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
        cleanup.callback(checkpointer.close)  # waits for the last asynchronous save
        start = _restore_or_initialise(config, setup, checkpointer)
        step_fn = _compile_step(setup)
        log = _MetricLog(config, setup, workdir, start, _flops_per_step(setup))
        cleanup.callback(log.close)
        preemption = _Preemption()
        cleanup.callback(preemption.restore)
        data = _Input(config, setup, tokenizer, workdir, start, preemption, log.progress)

        state, step = start.state, start.step
        history: dict[str, Any] = {"step": step}
        while step < config.total_steps:
            batch = data.next()
            if batch is None:  # SIGTERM while waiting for the input pipeline
                logging.warning("SIGTERM received while waiting for data at step %d", step)
                if step > start.step:
                    checkpointer.save(step, state, _checkpoint_meta(config, setup, data))
                history["preempted"] = True
                break
            state, step_metrics = step_fn(state, batch)
            step += 1
            log.add(step, step_metrics)

            last = step == config.total_steps
            eval_metrics = {}
            if config.eval_every and (step % config.eval_every == 0 or last):
                eval_metrics = _evaluate(config, setup, state, tokenizer, step, final=last)
            log_step = step % config.log_every == 0 or last
            if log_step:
                history = dict(log.write(step, eval_metrics, data), step=step)
            elif eval_metrics:
                log.write_eval(step, eval_metrics)

            # Several processes must agree to stop together; that vote is a blocking collective,
            # so it is taken at log steps only (a single process checks its flag every step).
            vote = log_step or jax.process_count() == 1
            preempted = _any_process(preemption.requested) if vote else False
            every = config.checkpoint_every
            if last or preempted or (every and step % every == 0):
                checkpointer.save(step, state, _checkpoint_meta(config, setup, data))
            if preempted:
                logging.warning("preempted at step %d: checkpoint saved, exiting", step)
                history["preempted"] = True
                break
    return history


# ---------------------------------------------------------------------------------------------
# Before the loop: the state to start from, the compiled step, its FLOPs


class _Start(NamedTuple):
    """Where the run starts: the state and this process's input position (None: the start)."""

    state: step_lib.TrainState
    step: int
    data_position: np.ndarray | None
    samples_delivered: int  # by this process in the steps before `step`


def _restore_or_initialise(
    config, setup: train_setup.TrainSetup, checkpointer: ckpt_lib.Checkpointer
) -> _Start:
    """The latest intact checkpoint of the workdir, else a fresh state (with `init_from`'s
    weights), created directly sharded. Logs the state's bytes per device (the FSDP saving)."""
    if checkpointer.latest_step() is None:
        state, data_position, samples_delivered = _initial_state(config, setup), None, 0
    else:
        # Damaged checkpoints are skipped (a warning each) and moved to damaged_checkpoints/,
        # so that this run can write their steps again.
        state, meta, skipped = checkpointer.restore_latest_intact(
            ckpt_lib.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
        )
        for damaged in skipped:
            moved = checkpointer.quarantine(damaged.step)
            logging.warning(
                "resuming from step %d instead of damaged step %d (moved to %s)",
                int(state.step),
                damaged.step,
                moved,
            )
        positions = meta["data_position"]
        if len(positions) != jax.process_count():
            raise ckpt_lib.CheckpointError(
                f"checkpoint was written by {len(positions)} processes, this run has "
                f"{jax.process_count()}: the input pipeline position cannot be mapped"
            )
        data_position = np.asarray(positions[jax.process_index()], np.int64)
        samples_delivered = int(meta["samples_delivered"])
        logging.info("resuming from step %d", int(state.step))
    logging.info(
        "per-device bytes: params %d, train state %d (mesh %s)",
        sharding.per_device_bytes(state.params),
        sharding.per_device_bytes(state),
        dict(setup.mesh.shape),
    )
    return _Start(state, int(state.step), data_position, samples_delivered)


def _initial_state(config, setup: train_setup.TrainSetup) -> step_lib.TrainState:
    """`init_fn` under jit with the state's shardings; `init_from`'s converted weights (a fresh
    SigLIP bias joined, stacked for a scanned model) replace the initial params."""
    state = setup.jit_init()()
    variables = setup.init_variables
    if variables is None:
        return state
    if config.loss == "siglip" and "logit_bias" not in variables["params"]:
        # SigLIP fine-tuning of CLIP weights: a fresh bias (-10) joins them.
        bias = np.asarray(jax.device_get(state.params["logit_bias"]))
        variables = dict(variables, params=dict(variables["params"], logit_bias=bias))
    if config.model.scan_layers:
        # Converted weights are unrolled (resblocks_{i}); the scanned model stacks them.
        variables = jax.tree.map(np.asarray, transformer.stack_layers(variables))
    return _with_converted_weights(state, variables, setup.state_shardings)


def _with_converted_weights(state, variables: dict, state_shardings) -> step_lib.TrainState:
    """Replaces the freshly initialised params/batch_stats with converted ones (same tree)."""

    def place(new_tree, target, target_shardings, what):
        if jax.tree.structure(new_tree) != jax.tree.structure(target):
            raise ConfigError(f"config.init_from: converted {what} do not match the model")
        return jax.tree.map(
            lambda x, t, s: jax.device_put(jnp.asarray(x, t.dtype), s),
            new_tree,
            target,
            target_shardings,
        )

    params = place(variables["params"], state.params, state_shardings.params, "params")
    batch_stats = state.batch_stats
    if variables.get("batch_stats"):
        batch_stats = place(
            variables["batch_stats"], state.batch_stats, state_shardings.batch_stats, "batch_stats"
        )
    # A moving average starts at the weights the run starts from.
    ema_params = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema_params)


def _compile_step(setup: train_setup.TrainSetup):
    """The jitted step (explicit shardings, the old state's buffers donated to the new one),
    compiled ahead of time from the abstract state and global batch."""
    t0 = time.perf_counter()
    lowered = setup.jit_step().lower(setup.sharded_abstract_state(), setup.abstract_batch())
    compiled = lowered.compile()
    logging.info("train step compiled in %.1f s", time.perf_counter() - t0)
    return compiled


def _flops_per_step(setup: train_setup.TrainSetup) -> float | None:
    """Model FLOPs of one step: counted without remat, layer scan or accumulation, whose loops
    and recomputation XLA's cost analysis would miscount (`clip_jax.plan.FlopCounter`)."""
    from clip_jax import plan

    loaded = (setup.model_config, None, setup.tokenizer_name)
    try:
        return plan.FlopCounter(setup.config, loaded=loaded).model()
    except plan.PlanError as e:
        logging.warning("no model FLOP count (flops_per_sec and mfu are not logged): %s", e)
        return None


# ---------------------------------------------------------------------------------------------
# Input: batches one ahead on the devices, SIGTERM while waiting


class _PreemptedWhileWaiting(Exception):
    """SIGTERM arrived while the loop was waiting for the input pipeline."""


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class _Input:
    """This process's rows of each global batch, one batch ahead on the devices, and how far it
    has read: `position` of the last batch taken and `samples_delivered` so far (both go into
    checkpoints). Per-shard record counts are cached in the workdir, so a restart resumes in
    constant time."""

    def __init__(self, config, setup, tokenizer, workdir, start: _Start, preemption, progress):
        self.position = start.data_position
        self.samples_delivered = start.samples_delivered
        self._local_batch = config.batch_size // jax.process_count()
        self._progress = progress
        self._watch = data_lib.InputWatch()
        dataset = data_lib.build_train_dataset(
            config.data,
            image_size=setup.model_config.image_size,
            tokenizer=tokenizer,
            context_length=setup.model_config.context_length,
            local_batch_size=self._local_batch,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start_position=start.data_position,
            watch=self._watch,
            index_dir=os.path.join(workdir, "data_index"),
        )

        def while_waiting_for_data():
            # Runs every second the loop waits for a batch: SIGTERM and dead pipelines end it.
            if preemption.requested:
                raise _PreemptedWhileWaiting()
            self._watch.check(self.samples_delivered)

        self._batches = data_lib.prefetch_to_device(
            dataset.as_numpy_iterator(),
            config.data.device_prefetch,
            setup.batch_sharding,
            poll=while_waiting_for_data,
        )
        logging.info("input pipeline ready; waiting for the first batch")

    def next(self) -> dict | None:
        """The next global batch {image, text}, or None if SIGTERM came while waiting."""
        t0 = time.perf_counter()
        try:
            batch = next(self._batches)
        except _PreemptedWhileWaiting:
            return None
        except StopIteration:
            self._watch.check(self.samples_delivered)
            raise data_lib.NoUsableData(
                "the input pipeline ended; training data is endless, so no shard could be read"
            ) from None
        # A shard that failed to read mid-run ends the run (resumable from its checkpoint)
        # instead of training on batches that are not the planned ones.
        self._watch.raise_noted_error()
        self._progress.add_data_wait(time.perf_counter() - t0)
        self.position = batch.pop("position")
        self.samples_delivered += self._local_batch
        return batch

    def skipped_samples(self) -> int:
        """Samples dropped so far on this process (no image or caption, undecodable image)."""
        if self.position is None:
            return 0
        return data_lib.num_skipped(self.position, self.samples_delivered)


# ---------------------------------------------------------------------------------------------
# Metrics: one row every log_every steps; the non-finite check


class _MetricLog:
    """Collects each step's metrics and writes a row every `log_every` steps to metrics.jsonl,
    TensorBoard and (process 0) the console: means since the last row, throughput, MFU, bytes
    per device, skipped samples. With nan_policy='stop' a non-finite step raises, checked one
    step behind so the host never waits for the step just queued."""

    def __init__(self, config, setup, workdir: str, start: _Start, flops_per_step: float | None):
        self.progress = metrics_lib.Progress(config.total_steps, start.step, config.batch_size)
        self._total_steps = config.total_steps
        self._stop_on_nonfinite = config.nan_policy == "stop"
        self._writer = metrics_lib.MetricWriter(
            workdir, enabled=jax.process_index() == 0, resume_step=start.step
        )
        self._flops_per_step = flops_per_step
        peak = metrics_lib.peak_flops(setup.mesh.devices.flat[0])
        self._peak_flops = peak * setup.mesh.size if peak else None
        self._memory = {
            "param_bytes_per_device": sharding.per_device_bytes(start.state.params),
            "state_bytes_per_device": sharding.per_device_bytes(start.state),
        }
        self._window: list[dict] = []
        self._pending_check = None  # (step, metrics) awaiting the non-finite check
        self._skipped_logged = (
            0
            if start.data_position is None
            else data_lib.num_skipped(start.data_position, start.samples_delivered)
        )

    def add(self, step: int, step_metrics: dict) -> None:
        """Keeps `step_metrics` (device arrays) for the next row; checks the previous step."""
        self._window.append(step_metrics)
        if self._stop_on_nonfinite:
            if self._pending_check is not None:
                _stop_if_nonfinite(*self._pending_check)
            self._pending_check = (step, step_metrics)

    def write_eval(self, step: int, eval_metrics: dict) -> None:
        self._writer.write(step, eval_metrics)

    def write(self, step: int, eval_metrics: dict, data: _Input) -> dict[str, Any]:
        """The row for `step` (with `eval_metrics`), written and returned."""
        if self._pending_check is not None:
            _stop_if_nonfinite(*self._pending_check)
            self._pending_check = None
        scalars = _summarize(self._window)
        if scalars["nonfinite"]:
            logging.warning(
                "%d of the last %d steps (to step %d) had a non-finite loss "
                "or gradient and were skipped",
                scalars["nonfinite"],
                len(self._window),
                step,
            )
        self._window = []
        scalars.update(self.progress.measure(step))
        scalars.update(eval_metrics)
        scalars.update(self._memory)
        scalars["skipped_samples"] = data.skipped_samples()
        if scalars["skipped_samples"] > self._skipped_logged:
            # One line per log step, not one per bad sample.
            logging.warning(
                "%d samples skipped so far (no image or caption, or an undecodable image)",
                scalars["skipped_samples"],
            )
            self._skipped_logged = scalars["skipped_samples"]
        if self._flops_per_step:
            scalars["flops_per_sec"] = self._flops_per_step * scalars["steps_per_sec"]
            if self._peak_flops:
                scalars["mfu"] = scalars["flops_per_sec"] / self._peak_flops
        self._writer.write(step, scalars)
        if jax.process_index() == 0:
            logging.info(metrics_lib.format_progress(step, self._total_steps, scalars))
        return scalars

    def close(self) -> None:
        self._writer.close()


def _stop_if_nonfinite(step: int, step_metrics: dict) -> None:
    """nan_policy='stop': raise naming the step whose loss or gradient was not finite."""
    if int(step_metrics["nonfinite"]):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step} (loss={float(step_metrics['loss'])}); "
            f"the parameters were not updated. Set config.nan_policy='skip' to skip such steps "
            f"instead."
        )


def _summarize(window: list[dict]) -> dict[str, float]:
    """Means over the steps since the last log (skipped steps summed)."""
    fetched = jax.device_get(window)
    out = {}
    for key in fetched[0]:
        values = np.asarray([m[key] for m in fetched], np.float64)
        out[key] = float(values.sum() if key == "nonfinite" else values.mean())
    out["lr"] = float(fetched[-1]["lr"])
    out["logit_scale"] = float(fetched[-1]["logit_scale"])
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation, checkpoint metadata, cross-process agreement


def _evaluate(
    config, setup: train_setup.TrainSetup, state, tokenizer, step: int, final: bool = False
) -> dict:
    """Runs the configured evaluators (`config.eval`) on the current weights; every process
    takes part (the embedder is sharded over the mesh), only process 0 writes. After the
    `final` evaluation the results are logged against chance and the majority class."""
    from clip_jax import evaluation  # imported lazily: only runs that evaluate need it

    # With config.ema_decay the moving average is what gets evaluated (and exported).
    params = state.params if state.ema_params is None else state.ema_params
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    metrics, details = evaluation.evaluate_all(
        config.eval, setup.model, variables, tokenizer, setup.mesh, step
    )
    if final and jax.process_index() == 0:
        for line in evaluation.summarize(metrics, details):
            logging.info("final evaluation (step %d): %s", step, line)
    return metrics


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _checkpoint_meta(config, setup: train_setup.TrainSetup, data: _Input) -> dict:
    """What a checkpoint stores beside the state: every process's input position, the model
    architecture and tokenizer (for inference and export), dtype, scan layout and loss."""
    position = np.asarray(data.position, np.int64)
    if jax.process_count() > 1:
        positions = multihost_utils.process_allgather(position).tolist()
    else:
        positions = [position.tolist()]
    # scan_layers: the params are stacked (`resblocks` [L, ...]); readers that build an
    # unrolled model convert them with clip_jax.models.transformer.unstack_layers.
    return {
        "data_position": positions,
        "samples_delivered": int(data.samples_delivered),
        "model_config": setup.model_config.to_dict(),
        "tokenizer": setup.tokenizer_name,
        "dtype": config.dtype,
        "scan_layers": bool(config.model.scan_layers),
        "loss": config.loss,
    }


def main(argv) -> None:
    metrics_lib.quiet_library_logs()
    platforms.avoid_absent_tpu()  # libtpu without a TPU: stay on the CPU, no TPU runtime start
    host_memory.tune_for_xla_cpu()  # before the first JAX computation starts XLA's threads
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    from clip_jax import stages  # a schedule of stages runs train() once per stage

    try:
        if _CONFIG.value.get("stages"):  # a schedule of stages (clip_jax/stages.py)
            # This module's `train` (run as __main__, re-importing it would redefine the flags).
            stages.run(_CONFIG.value, _WORKDIR.value, train, validate_config)
        else:
            train(_CONFIG.value, _WORKDIR.value)
    except (
        ConfigError,
        stages.StageError,
        ckpt_lib.CheckpointError,
        FloatingPointError,
        data_lib.NoUsableData,
        workdir_lock.WorkdirLockedError,
    ) as e:
        sys.exit(f"clip_jax.train: error: {e}")
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # In a multi-process run the usual cause is a dead peer (its collectives fail).
        print(
            f"clip_jax.train: error: process {jax.process_index()} of "
            f"{jax.process_count()}: a cross-process operation failed, most likely because "
            f"another process died; restart the job to resume from the last checkpoint. "
            f"({str(e).splitlines()[0][:300]})",
            file=sys.stderr,
            flush=True,
        )
        # Skip atexit: jax.distributed's shutdown barrier would wait for the dead peer and
        # then abort with a C++ stack trace, burying the message above.
        os._exit(1)


def _main_exiting_hard_on_error(argv) -> None:
    """`main`, but a failed run leaves with `os._exit`: after an input-pipeline error, the
    interpreter's normal shutdown can deadlock destroying tf.data iterators whose reader threads
    wait for the GIL (seen in 3 of 6 runs with an unreadable shard)."""
    try:
        main(argv)
    except SystemExit as e:
        if e.code in (None, 0):
            raise
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # an unexpected error: show it, then leave without the shutdown
        import traceback

        traceback.print_exc()
        code = 1
    else:
        return
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    app.run(
        _main_exiting_hard_on_error,
        flags_parser=cli.flags_parser("clip_jax.train", renamed=overrides_lib.RENAMED),
    )
