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
from clip_jax import cli, host_memory, models, optim, sharding, tokenizers, workdir_lock
from clip_jax import data as data_lib
from clip_jax import losses as losses_lib
from clip_jax import metrics as metrics_lib
from clip_jax import step as step_lib
from clip_jax.models import attention, patch_dropout, resize, transformer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/clip.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")

_DTYPES = ("float32", "bfloat16", "float16")


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
    """Raises ConfigError naming the offending key for any impossible value."""

    def check(ok, key, value, why):
        if not ok:
            raise ConfigError(f"config.{key}={value!r}: {why}")

    check(config.batch_size > 0, "batch_size", config.batch_size, "must be positive")
    check(config.total_steps > 0, "total_steps", config.total_steps, "must be positive")
    check(config.log_every > 0, "log_every", config.log_every, "must be positive")
    check(
        config.checkpoint_every >= 0,
        "checkpoint_every",
        config.checkpoint_every,
        "must be >= 0 (0: only at the end)",
    )
    check(config.keep_checkpoints >= 1, "keep_checkpoints", config.keep_checkpoints, "must be >= 1")
    check(config.dtype in _DTYPES, "dtype", config.dtype, f"must be one of {_DTYPES}")
    check(
        config.nan_policy in ("stop", "skip"),
        "nan_policy",
        config.nan_policy,
        "must be 'stop' or 'skip'",
    )
    try:
        optim.validate(config.optim)  # every optim.* key: lr, warmup_steps, b1, b2, eps, ...
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check(
        config.accumulation_steps >= 1,
        "accumulation_steps",
        config.accumulation_steps,
        "must be >= 1 (1: no accumulation)",
    )
    check(
        config.batch_size % config.accumulation_steps == 0,
        "batch_size",
        config.batch_size,
        f"must be divisible by accumulation_steps={config.accumulation_steps}",
    )
    check(
        config.loss in losses_lib.LOSSES, "loss", config.loss, f"must be one of {losses_lib.LOSSES}"
    )
    try:
        transformer.remat_policy(config.model.remat)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        attention.parse_implementation(config.model.attention_impl)
    except ValueError as e:
        raise ConfigError(f"config.model.{e}") from None
    check(
        isinstance(config.model.scan_layers, bool),
        "model.scan_layers",
        config.model.scan_layers,
        "must be True or False",
    )
    try:  # FLIP patch dropout: a rate in [0, 1), for ViT towers
        patch_dropout.check_rate(config.model.patch_dropout)
    except ValueError as e:
        raise ConfigError(f"config.model.{e}") from None
    _model_overrides(config)
    check(
        config.distributed.heartbeat_timeout_s > 0,
        "distributed.heartbeat_timeout_s",
        config.distributed.heartbeat_timeout_s,
        "must be positive",
    )
    check(config.eval_every >= 0, "eval_every", config.eval_every, "must be >= 0 (0: never)")
    if config.eval_every:
        from clip_jax.evaluation import config as eval_config

        try:
            eval_config.validate(config.eval)
        except ValueError as e:
            raise ConfigError(f"config.eval: {e}") from None
    if config.init_from:
        from clip_jax import hub  # a Hub reference is resolved (downloaded) by _load_model

        check(
            hub.is_reference(config.init_from) or os.path.isdir(config.init_from),
            "init_from",
            config.init_from,
            "directory does not exist",
        )
    else:
        try:
            vision = models.get_model_config(config.model.name).vision
        except ValueError as e:
            raise ConfigError(f"config.model.name={config.model.name!r}: {e}") from None
        check(
            vision.type == "vit" or not config.model.patch_dropout,
            "model.patch_dropout",
            config.model.patch_dropout,
            f"needs a ViT image tower ({config.model.name} has a {vision.type})",
        )
    try:
        data_lib.validate(config.data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if mesh is None:
        _check_data_files(config.data)
    else:
        shards = sharding.num_batch_shards(mesh)
        check(
            config.batch_size % shards == 0,
            "batch_size",
            config.batch_size,
            f"must be divisible by the {shards} data-parallel devices of mesh {dict(mesh.shape)}",
        )
        k = config.accumulation_steps
        check(
            config.batch_size % (shards * k) == 0,
            "batch_size",
            config.batch_size,
            f"must be divisible by accumulation_steps x data-parallel devices = {k} x "
            f"{shards} (each micro-batch is split over all devices)",
        )
        check(
            config.batch_size % jax.process_count() == 0,
            "batch_size",
            config.batch_size,
            f"must be divisible by the {jax.process_count()} processes",
        )


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


def _model_overrides(config) -> dict:
    """`config.model.overrides` (a JSON object string) parsed, e.g.
    '{"vision": {"layers": 1}, "text": {"width": 64}, "embed_dim": 64}'."""
    text = config.model.overrides
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config.model.overrides={text!r}: not valid JSON ({e})") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"config.model.overrides={text!r}: must be a JSON object")
    if config.init_from:
        raise ConfigError(
            "config.model.overrides must be empty with init_from (the "
            "architecture comes from the converted weights)"
        )
    try:
        models.get_model_config(config.model.name, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model.overrides={text!r}: {e}") from None
    return overrides


def _load_model(config) -> tuple[models.CLIPConfig, dict | None, str]:
    """Model architecture (+ converted variables when init_from is set) and tokenizer name.

    With `loss="siglip"` a from-scratch model gets SigLIP's initial temperature log(10) and a
    logit bias initialised at -10; converted weights without a bias get a fresh one (-10).
    """
    siglip = config.loss == "siglip"
    if not config.init_from:
        model_config = models.get_model_config(config.model.name, **_model_overrides(config))
        if siglip:
            model_config = model_config.replace(
                init_logit_scale=losses_lib.SIGLIP_INIT_LOGIT_SCALE,
                init_logit_bias=losses_lib.SIGLIP_INIT_LOGIT_BIAS,
            )
        return model_config, None, config.data.tokenizer
    from clip_jax import convert, hub  # torch-free; only needs orbax

    tokenizer = config.data.tokenizer
    if hub.is_reference(config.init_from):  # hf-hub:ORG/NAME[@REV] or pretrained:ARCH/TAG
        try:
            model_config, variables, _ = hub.load(config.init_from)
        except hub.HubError as e:
            raise ConfigError(f"config.init_from: {e}") from None
        tokenizer = hub.TOKENIZER
    else:
        model_config, variables = convert.load_converted(config.init_from)
        meta_path = os.path.join(config.init_from, "model.json")
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                tokenizer = json.load(f).get("tokenizer", tokenizer)
    if siglip and model_config.init_logit_bias is None:
        model_config = model_config.replace(init_logit_bias=losses_lib.SIGLIP_INIT_LOGIT_BIAS)
    return model_config, variables, tokenizer


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


def train(config, workdir: str, devices: list | None = None) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics plus `step`.

    `devices` restricts the mesh to a subset of this process's devices (tests compare 1 and 8
    devices in one process); default: every device of every process.
    """
    maybe_initialize_distributed(config)
    validate_config(config)

    # Mesh: every device of every process; batch split over (data, fsdp).
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    validate_config(config, mesh)
    local_batch = config.batch_size // jax.process_count()

    # Model, tokenizer, optimizer.
    model_config, init_variables, tokenizer_name = _load_model(config)
    try:  # model.image_size / model.context_length: positional embeddings follow
        model_config, init_variables = resize.adapt_to_config(
            config.model, model_config, init_variables
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = models.CLIP(
        model_config,
        dtype=jnp.dtype(config.dtype),
        attention_impl=config.model.attention_impl or None,
        remat=config.model.remat,
        scan_layers=config.model.scan_layers,
        patch_dropout=config.model.patch_dropout,
    )
    tokenizer = tokenizers.get(tokenizer_name)
    if tokenizer.vocab_size > model_config.text.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer_name!r} has {tokenizer.vocab_size} tokens but "
            f"the text tower's vocabulary is {model_config.text.vocab_size}"
        )
    abstract_params = jax.eval_shape(model.init_variables, jax.random.key(0))["params"]
    tx, schedule = optim.create_optimizer(
        config.optim, config.total_steps, abstract_params, freeze=config.freeze
    )
    image_frozen = bool(config.freeze) and all(
        jax.tree.leaves(optim.frozen_mask(abstract_params, config.freeze)["image"])
    )

    # Everything above only reads; from here on the workdir is written, by one run at a time.
    _prepare_workdir(workdir)
    lock = _lock_workdir(workdir)
    try:
        return _train_locked(
            config,
            workdir,
            _Setup(
                mesh,
                model,
                model_config,
                init_variables,
                tokenizer,
                tokenizer_name,
                tx,
                schedule,
                image_frozen,
                local_batch,
            ),
        )
    finally:
        if lock is not None:
            lock.release()


class _Setup(NamedTuple):
    """What `train` built before touching the workdir."""

    mesh: Any
    model: models.CLIP
    model_config: models.CLIPConfig
    init_variables: dict | None
    tokenizer: Any
    tokenizer_name: str
    tx: Any
    schedule: Any
    image_frozen: bool
    local_batch: int


def _train_locked(config, workdir: str, setup: _Setup) -> dict[str, Any]:
    """The part of `train` that writes to the workdir (called with the workdir lock held)."""
    (
        mesh,
        model,
        model_config,
        init_variables,
        tokenizer,
        tokenizer_name,
        tx,
        schedule,
        image_frozen,
        local_batch,
    ) = setup
    is_primary = jax.process_index() == 0
    if is_primary:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))

    # Shardings: parameters and optimizer state split over `fsdp` (default: largest divisible
    # dimension; config.sharding_rules override by path), batch split over (data, fsdp).
    init_fn = functools.partial(step_lib.init_train_state, model, tx, config.seed)
    abstract_state = jax.eval_shape(init_fn)
    try:
        state_shardings = sharding.state_shardings(
            mesh, abstract_state, rules=tuple(config.sharding_rules)
        )
    except ValueError as e:
        raise ConfigError(f"config.sharding_rules: {e}") from None
    batch_shard = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    # State: restore the latest checkpoint of this workdir, else initialise directly sharded.
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    data_position, samples_delivered = None, 0
    if checkpointer.latest_step() is not None:
        # Damaged checkpoints are skipped (a warning each) and moved to damaged_checkpoints/,
        # so that this run can write their steps again.
        state, meta, skipped = checkpointer.restore_latest_intact(
            ckpt_lib.abstract_with_shardings(abstract_state, state_shardings)
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
    else:
        state = jax.jit(init_fn, out_shardings=state_shardings)()
        if init_variables is not None:
            if config.loss == "siglip" and "logit_bias" not in init_variables["params"]:
                # SigLIP fine-tuning of CLIP weights: a fresh bias (-10) joins them.
                init_variables = dict(
                    init_variables,
                    params=dict(
                        init_variables["params"],
                        logit_bias=np.asarray(jax.device_get(state.params["logit_bias"])),
                    ),
                )
            if config.model.scan_layers:
                # Converted weights are unrolled (resblocks_{i}); the scanned model stacks them.
                init_variables = jax.tree.map(np.asarray, transformer.stack_layers(init_variables))
            state = _with_converted_weights(state, init_variables, state_shardings)
    start_step = int(state.step)
    # Memory per device of the sharded state (the FSDP saving), logged with the first metrics.
    memory_metrics = {
        "param_bytes_per_device": sharding.per_device_bytes(state.params),
        "state_bytes_per_device": sharding.per_device_bytes(state),
    }
    logging.info(
        "per-device bytes: params %d, train state %d (mesh %s)",
        memory_metrics["param_bytes_per_device"],
        memory_metrics["state_bytes_per_device"],
        dict(mesh.shape),
    )

    # Input pipeline: this process's rows of each global batch, one batch ahead on devices.
    # Per-shard record counts are cached in the workdir, so a restart resumes in constant time.
    watch = data_lib.InputWatch()
    dataset = data_lib.build_train_dataset(
        config.data,
        image_size=model_config.image_size,
        tokenizer=tokenizer,
        context_length=model_config.context_length,
        local_batch_size=local_batch,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_position=data_position,
        watch=watch,
        index_dir=os.path.join(workdir, "data_index"),
    )
    preemption = _Preemption()

    def while_waiting_for_data():
        # Runs every second the loop waits for a batch: SIGTERM and dead pipelines end the wait.
        if preemption.requested:
            raise _PreemptedWhileWaiting()
        watch.check(samples_delivered)

    batches = data_lib.prefetch_to_device(
        dataset.as_numpy_iterator(),
        config.data.device_prefetch,
        batch_shard,
        poll=while_waiting_for_data,
    )
    logging.info("input pipeline ready; waiting for the first batch")

    # The jitted step: explicit shardings, the old state's buffers donated to the new one.
    train_step = step_lib.make_train_step(
        model,
        tx,
        schedule,
        mesh,
        train_image_tower=not image_frozen,
        loss=config.loss,
        accumulation_steps=config.accumulation_steps,
        param_shardings=state_shardings.params,
    )
    batch_shardings = {"image": batch_shard, "text": batch_shard}
    jit_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    writer = metrics_lib.MetricWriter(workdir, enabled=is_primary, resume_step=start_step)
    history: dict[str, Any] = {"step": start_step}
    compiled = None
    flops_per_step = None
    peak = metrics_lib.peak_flops(mesh.devices.flat[0])
    progress = metrics_lib.Progress(config.total_steps, start_step, config.batch_size)
    window: list[dict] = []
    pending_check = None  # (step, metrics) awaiting the non-finite check, one step behind
    skipped_logged = (
        data_lib.num_skipped(data_position, samples_delivered) if data_position is not None else 0
    )
    step = start_step
    position = data_position  # the last consumed batch's; set by every batch below
    try:
        while step < config.total_steps:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except _PreemptedWhileWaiting:
                logging.warning("SIGTERM received while waiting for data at step %d", step)
                if step > start_step:
                    checkpointer.save(
                        step,
                        state,
                        _checkpoint_meta(
                            position, samples_delivered, model_config, tokenizer_name, config
                        ),
                    )
                history["preempted"] = True
                break
            except StopIteration:
                watch.check(samples_delivered)
                raise data_lib.NoUsableData(
                    "the input pipeline ended; training data is endless, so no shard could be read"
                ) from None
            progress.add_data_wait(time.perf_counter() - t0)
            position = batch.pop("position")
            if compiled is None:
                compiled = jit_step.lower(state, batch).compile()
                flops_per_step = metrics_lib.model_flops(
                    step_lib.make_train_step(
                        model,
                        tx,
                        schedule,
                        mesh=None,
                        train_image_tower=not image_frozen,
                        loss=config.loss,
                        accumulation_steps=config.accumulation_steps,
                    ),
                    *jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch)),
                )
            state, step_metrics = compiled(state, batch)
            step += 1
            samples_delivered += local_batch
            window.append(step_metrics)
            if config.nan_policy == "stop":
                # Checked one step behind, so the host never waits for the step just queued.
                if pending_check is not None:
                    _stop_if_nonfinite(*pending_check)
                pending_check = (step, step_metrics)

            last = step == config.total_steps
            eval_metrics = {}
            if config.eval_every and (step % config.eval_every == 0 or last):
                eval_metrics = _evaluate(config, model, state, tokenizer, mesh, step)
            log_step = step % config.log_every == 0 or last
            if eval_metrics and not log_step:
                writer.write(step, eval_metrics)
            if log_step:
                if pending_check is not None:
                    _stop_if_nonfinite(*pending_check)
                    pending_check = None
                scalars = _summarize(window)
                if scalars["nonfinite"]:
                    logging.warning(
                        "%d of the last %d steps (to step %d) had a non-finite loss "
                        "or gradient and were skipped",
                        scalars["nonfinite"],
                        len(window),
                        step,
                    )
                window = []
                scalars.update(progress.measure(step))
                scalars.update(eval_metrics)
                scalars.update(memory_metrics)
                scalars["skipped_samples"] = data_lib.num_skipped(position, samples_delivered)
                if scalars["skipped_samples"] > skipped_logged:
                    # One line per log step, not one per bad sample.
                    logging.warning(
                        "%d samples skipped so far (no image or caption, or an undecodable image)",
                        scalars["skipped_samples"],
                    )
                    skipped_logged = scalars["skipped_samples"]
                if flops_per_step:
                    scalars["flops_per_sec"] = flops_per_step * scalars["steps_per_sec"]
                    if peak:
                        scalars["mfu"] = scalars["flops_per_sec"] / (peak * mesh.size)
                writer.write(step, scalars)
                if is_primary:
                    logging.info(metrics_lib.format_progress(step, config.total_steps, scalars))
                history = dict(scalars, step=step)

            # Several processes must agree to stop together; that vote is a blocking collective,
            # so it is taken at log steps only (a single process checks its flag every step).
            preempted = (
                _any_process(preemption.requested)
                if log_step or jax.process_count() == 1
                else False
            )
            if (
                (config.checkpoint_every and step % config.checkpoint_every == 0)
                or last
                or preempted
            ):
                meta = _checkpoint_meta(
                    position, samples_delivered, model_config, tokenizer_name, config
                )
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
    return state.replace(params=params, batch_stats=batch_stats)


def _evaluate(config, model, state, tokenizer, mesh, step: int) -> dict[str, float]:
    """Runs the configured evaluators (`config.eval`) on the current weights; every process
    takes part (the embedder is sharded over the mesh), only process 0 writes."""
    from clip_jax import evaluation  # imported lazily: only runs that evaluate need it

    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return evaluation.run_evaluators(config.eval, model, variables, tokenizer, mesh, step)


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
    # scan_layers: the params are stacked (`resblocks` [L, ...]); readers that build an
    # unrolled model convert them with clip_jax.models.transformer.unstack_layers.
    return {
        "data_position": positions,
        "samples_delivered": int(samples_delivered),
        "model_config": model_config.to_dict(),
        "tokenizer": tokenizer_name,
        "dtype": config.dtype,
        "scan_layers": bool(config.model.scan_layers),
        "loss": config.loss,
    }


def main(argv) -> None:
    metrics_lib.quiet_library_logs()
    host_memory.tune_for_xla_cpu()  # before the first JAX computation starts XLA's threads
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    from clip_jax import stages  # a schedule of stages runs train() once per stage

    try:
        if _CONFIG.value.get("stages"):  # a schedule of stages (clip_jax/stages.py)
            # This module's `train` (run as __main__, re-importing it would redefine the flags).
            stages.run(_CONFIG.value, _WORKDIR.value, train)
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
    app.run(_main_exiting_hard_on_error, flags_parser=cli.flags_parser("clip_jax.train"))
