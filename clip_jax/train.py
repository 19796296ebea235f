"""`python -m clip_jax.train --config configs/clip.py:tiny --workdir runs/tiny`.

Reads top to bottom: distributed init -> config checks -> mesh -> model, tokenizer, optimizer
-> shardings -> state (initialised sharded, or restored) -> input pipeline -> jitted step ->
loop with logging, checkpoints and preemption handling.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import Any

# TensorFlow (tf.data) is loud by default; keep its C++ logs to warnings and up.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import config_flags

from clip_jax import checkpoint as ckpt_lib
from clip_jax import metrics as metrics_lib
from clip_jax import models, optim, sharding, step as step_lib, tokenizers
from clip_jax import data as data_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/clip.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")

_DTYPES = ("float32", "bfloat16", "float16")
# Dense peak FLOP/s per chip for MFU (bf16/fp16 tensor units, without sparsity).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
               "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
               "TPU v6 lite": 918e12, "TPU v6e": 918e12}


class ConfigError(ValueError):
    """The config asks for something impossible; the message names the key."""


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
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def validate_config(config, mesh=None) -> None:
    """Raises ConfigError naming the offending key for any impossible value."""
    def check(ok, key, value, why):
        if not ok:
            raise ConfigError(f"config.{key}={value!r}: {why}")

    check(config.batch_size > 0, "batch_size", config.batch_size, "must be positive")
    check(config.total_steps > 0, "total_steps", config.total_steps, "must be positive")
    check(config.log_every > 0, "log_every", config.log_every, "must be positive")
    check(config.checkpoint_every >= 0, "checkpoint_every", config.checkpoint_every,
          "must be >= 0 (0: only at the end)")
    check(config.keep_checkpoints >= 1, "keep_checkpoints", config.keep_checkpoints,
          "must be >= 1")
    check(config.dtype in _DTYPES, "dtype", config.dtype, f"must be one of {_DTYPES}")
    check(config.nan_policy in ("stop", "skip"), "nan_policy", config.nan_policy,
          "must be 'stop' or 'skip'")
    check(config.optim.lr >= 0, "optim.lr", config.optim.lr, "must be >= 0")
    check(config.optim.warmup_steps >= 0, "optim.warmup_steps", config.optim.warmup_steps,
          "must be >= 0")
    if config.init_from:
        check(os.path.isdir(config.init_from), "init_from", config.init_from,
              "directory does not exist")
    else:
        try:
            models.get_model_config(config.model.name)
        except ValueError as e:
            raise ConfigError(f"config.model.name={config.model.name!r}: {e}") from None
    try:
        data_lib.validate(config.data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if mesh is not None:
        shards = sharding.num_batch_shards(mesh)
        check(config.batch_size % shards == 0, "batch_size", config.batch_size,
              f"must be divisible by the {shards} data-parallel devices of mesh "
              f"{dict(mesh.shape)}")
        check(config.batch_size % jax.process_count() == 0, "batch_size", config.batch_size,
              f"must be divisible by the {jax.process_count()} processes")


def _load_model(config) -> tuple[models.CLIPConfig, dict | None, str]:
    """Model architecture (+ converted variables when init_from is set) and tokenizer name."""
    if not config.init_from:
        return models.get_model_config(config.model.name), None, config.data.tokenizer
    from clip_jax import convert  # torch-free; only needs orbax
    model_config, variables = convert.load_converted(config.init_from)
    meta_path = os.path.join(config.init_from, "model.json")
    tokenizer = config.data.tokenizer
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            tokenizer = json.load(f).get("tokenizer", tokenizer)
    return model_config, variables, tokenizer


def _peak_flops(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in _PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def _compiled_flops(compiled) -> float | None:
    """FLOPs of one step of the whole (all-device) program from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError) as e:
        logging.warning("no XLA cost analysis for the train step: %s", e)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = cost.get("flops") if cost else None
    return float(flops) if flops else None


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


def train(config, workdir: str, devices: list | None = None) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics plus `step`.

    `devices` restricts the mesh to a subset of this process's devices (tests compare 1 and 8
    devices in one process); default: every device of every process.
    """
    maybe_initialize_distributed(config)
    validate_config(config)
    is_primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    # Mesh: every device of every process; batch split over (data, fsdp).
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    validate_config(config, mesh)
    local_batch = config.batch_size // jax.process_count()

    # Model, tokenizer, optimizer.
    model_config, init_variables, tokenizer_name = _load_model(config)
    model = models.create_model(model_config, dtype=config.dtype,
                                attention_impl=config.model.attention_impl or None)
    tokenizer = tokenizers.get(tokenizer_name)
    if tokenizer.vocab_size > model_config.text.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_name!r} has {tokenizer.vocab_size} tokens but "
                          f"the text tower's vocabulary is {model_config.text.vocab_size}")
    abstract_params = jax.eval_shape(model.init_variables, jax.random.key(0))["params"]
    tx, schedule = optim.create_optimizer(config.optim, config.total_steps, abstract_params,
                                          freeze=config.freeze)
    image_frozen = bool(config.freeze) and all(jax.tree.leaves(
        optim.frozen_mask(abstract_params, config.freeze)["image"]))

    if is_primary:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))

    # Shardings: parameters replicated (FSDP rules come with mesh.fsdp > 1), batch sharded.
    init_fn = functools.partial(step_lib.init_train_state, model, tx, config.seed)
    abstract_state = jax.eval_shape(init_fn)
    state_shardings = sharding.state_shardings(mesh, abstract_state)
    batch_shard = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    # State: restore the latest checkpoint of this workdir, else initialise directly sharded.
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    data_position, samples_delivered = None, 0
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(
            None, ckpt_lib.abstract_with_shardings(abstract_state, state_shardings))
        positions = meta["data_position"]
        if len(positions) != jax.process_count():
            raise ckpt_lib.CheckpointError(
                f"checkpoint was written by {len(positions)} processes, this run has "
                f"{jax.process_count()}: the input pipeline position cannot be mapped")
        data_position = np.asarray(positions[jax.process_index()], np.int64)
        samples_delivered = int(meta["samples_delivered"])
        logging.info("resuming from step %d", int(state.step))
    else:
        state = jax.jit(init_fn, out_shardings=state_shardings)()
        if init_variables is not None:
            state = _with_converted_weights(state, init_variables, state_shardings)
    start_step = int(state.step)

    # Input pipeline: this process's rows of each global batch, one batch ahead on devices.
    dataset = data_lib.build_train_dataset(
        config.data, image_size=model_config.image_size, tokenizer=tokenizer,
        context_length=model_config.context_length, local_batch_size=local_batch,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), start_position=data_position)
    batches = data_lib.prefetch_to_device(dataset.as_numpy_iterator(),
                                          config.data.device_prefetch, batch_shard)

    # The jitted step: explicit shardings, the old state's buffers donated to the new one.
    train_step = step_lib.make_train_step(model, tx, schedule, mesh,
                                          train_image_tower=not image_frozen)
    batch_shardings = {"image": batch_shard, "text": batch_shard}
    jit_step = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    writer = metrics_lib.MetricWriter(workdir, enabled=is_primary)
    preemption = _Preemption()
    history: dict[str, Any] = {"step": start_step}
    compiled = None
    flops_per_step = None
    peak = _peak_flops(mesh.devices.flat[0])
    progress = metrics_lib.Progress(config.total_steps, start_step, config.batch_size)
    window: list[dict] = []
    pending_check = None  # (step, metrics) awaiting the non-finite check, one step behind
    step = start_step
    try:
        while step < config.total_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            progress.add_data_wait(time.perf_counter() - t0)
            position = batch.pop("position")
            if compiled is None:
                compiled = jit_step.lower(state, batch).compile()
                flops_per_step = _compiled_flops(compiled)
            state, step_metrics = compiled(state, batch)
            step += 1
            samples_delivered += local_batch
            window.append(step_metrics)
            if pending_check is not None:
                _check_finite(*pending_check, config.nan_policy)
            pending_check = (step, step_metrics)

            last = step == config.total_steps
            if step % config.log_every == 0 or last:
                _check_finite(*pending_check, config.nan_policy)
                pending_check = None
                scalars = _summarize(window)
                window = []
                scalars.update(progress.measure(step))
                scalars["skipped_samples"] = data_lib.num_skipped(position, samples_delivered)
                if flops_per_step:
                    scalars["flops_per_sec"] = flops_per_step * scalars["steps_per_sec"]
                    if peak:
                        scalars["mfu"] = scalars["flops_per_sec"] / (peak * mesh.size)
                writer.write(step, scalars)
                if is_primary:
                    logging.info(metrics_lib.format_progress(step, config.total_steps, scalars))
                history = dict(scalars, step=step)

            preempted = _any_process(preemption.requested)
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or last \
                    or preempted:
                meta = _checkpoint_meta(position, samples_delivered, model_config,
                                        tokenizer_name, config)
                checkpointer.save(step, state, meta)
            if preempted:
                logging.warning("preempted at step %d: checkpoint saved, exiting", step)
                history["preempted"] = True
                break
    finally:
        checkpointer.close()
        writer.close()
        preemption.restore()
    return history


def _with_converted_weights(state, variables: dict, state_shardings) -> step_lib.TrainState:
    """Replaces the freshly initialised params/batch_stats with converted ones (same tree)."""
    def place(new_tree, target, target_shardings, what):
        if jax.tree.structure(new_tree) != jax.tree.structure(target):
            raise ConfigError(f"config.init_from: converted {what} do not match the model")
        return jax.tree.map(lambda x, t, s: jax.device_put(jnp.asarray(x, t.dtype), s),
                            new_tree, target, target_shardings)
    params = place(variables["params"], state.params, state_shardings.params, "params")
    batch_stats = state.batch_stats
    if variables.get("batch_stats"):
        batch_stats = place(variables["batch_stats"], state.batch_stats,
                            state_shardings.batch_stats, "batch_stats")
    return state.replace(params=params, batch_stats=batch_stats)


def _check_finite(step: int, step_metrics: dict, policy: str) -> None:
    if int(step_metrics["nonfinite"]):
        if policy == "stop":
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (loss={float(step_metrics['loss'])}"
                f"); the parameters were not updated. Set config.nan_policy='skip' to skip "
                f"such steps instead.")
        logging.warning("non-finite loss or gradient at step %d: step skipped", step)


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


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _checkpoint_meta(position, samples_delivered, model_config, tokenizer_name, config) -> dict:
    position = np.asarray(position, np.int64)
    if jax.process_count() > 1:
        positions = multihost_utils.process_allgather(position).tolist()
    else:
        positions = [position.tolist()]
    return {"data_position": positions, "samples_delivered": int(samples_delivered),
            "model_config": model_config.to_dict(), "tokenizer": tokenizer_name,
            "dtype": config.dtype}


class _QuietLibraries:
    """absl log filter: drops INFO records from orbax (dozens per checkpoint) and keeps ours."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, ckpt_lib.CheckpointError, FloatingPointError) as e:
        sys.exit(f"clip_jax.train: error: {e}")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors for bad config overrides (unknown key, wrong
    type) instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"clip_jax.train: error: {e}\nTry --help.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = (str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
                   .strip("'\""))
        sys.exit(f"clip_jax.train: error: bad config override: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
