"""Orbax checkpoints of the train state plus run metadata (data position, config).

Layout: `workdir/checkpoints/<step>/{state,meta}`. Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save never leaves a checkpoint that
restores wrongly: the half-written one is simply not listed. Saves are asynchronous.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from clip_jax import checksum


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or does not match the model being restored."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files are missing, unreadable or fail the integrity check."""

    def __init__(self, directory: str, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"damaged checkpoint: step {step} in {directory}: {reason}")


# Version of the integrity record in the metadata ("checksums", "meta_checksum"); checkpoints
# without it (written before clip_jax verified checkpoints) restore unverified, with a warning.
_CHECKSUM_VERSION = 1


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def damaged_dir(workdir: str) -> str:
    """Where `Checkpointer.quarantine` moves damaged checkpoints (outside orbax's directory)."""
    return os.path.join(os.path.abspath(workdir), "damaged_checkpoints")


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run; saves asynchronously; verifies restores.

    Every save stores a checksum of each array of the state (clip_jax.checksum, computed on the
    devices) and of the metadata in the metadata; every restore recomputes and compares them,
    so a damaged checkpoint raises DamagedCheckpointError instead of restoring changed values.
    When to save is the caller's decision (the trainer saves every `checkpoint_every` steps).
    """

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        directory = checkpoint_dir(workdir)
        if read_only and not os.path.isdir(directory):
            raise CheckpointError(f"no checkpoints directory at {directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=not read_only,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add("state", args, ocp.StandardCheckpointHandler)
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("meta", args, ocp.JsonCheckpointHandler)
        self._manager = ocp.CheckpointManager(directory, options=options, handler_registry=registry)
        self.directory = directory
        self.workdir = os.path.dirname(directory)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = True) -> None:
        """Starts an async save of `state` (a pytree of jax.Arrays) and `meta` (JSON), with the
        checksums that `restore` verifies added to `meta`. Every process must call it."""
        meta = dict(
            meta, checksums=checksum.tree_checksums(state), checksum_version=_CHECKSUM_VERSION
        )
        meta["meta_checksum"] = meta_checksum(meta)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with sharding), so
        a checkpoint written on 8 devices restores on 1 and the reverse, and verifies it.

        Raises DamagedCheckpointError when its files are missing, unreadable or fail the
        checksums, and CheckpointError naming the problem when the step does not exist or the
        saved tree does not match the model (missing/unexpected parameters, other shapes).
        """
        return self._restore_verified(self.resolve_step(step), abstract_state)

    def resolve_step(self, step: int | None) -> int:
        """`step` when it is a complete checkpoint, the latest one when `step` is None; else
        CheckpointError naming the available steps."""
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            return max(steps)
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}"
            )
        return step

    def restore_latest_intact(
        self, abstract_state: Any
    ) -> tuple[Any, dict[str, Any], list[DamagedCheckpointError]]:
        """Restores the newest checkpoint that is intact, skipping damaged ones with a
        warning; returns (state, meta, the errors of the skipped ones, newest first).

        Raises CheckpointError when there is no checkpoint, when every checkpoint is damaged,
        or when the newest readable one does not match the model (older ones would not either,
        and silently going back in time would hide a config change).
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        skipped: list[DamagedCheckpointError] = []
        for i, step in enumerate(steps):
            try:
                state, meta = self._restore_verified(step, abstract_state)
            except DamagedCheckpointError as e:
                skipped.append(e)
                fallback = (
                    f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
                )
                logging.warning("%s; skipping it, %s", e, fallback)
                continue
            return state, meta, skipped
        raise CheckpointError(
            f"all {len(steps)} checkpoints in {self.directory} are damaged (steps "
            f"{', '.join(str(e.step) for e in skipped)}; newest: {skipped[0].reason}); move "
            f"them aside to start from scratch"
        )

    def quarantine(self, step: int) -> str:
        """Moves checkpoint `step` out of the checkpoints directory, to `damaged_dir`, so the
        run can write that step again; returns the new path. Every process must call it
        (process 0 moves, the others wait for it)."""
        target = os.path.join(damaged_dir(self.workdir), str(step))
        if os.path.exists(target):
            target = f"{target}.{int(time.time())}"
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"clip_jax_quarantine_{step}")
        self._manager.reload()
        return target

    def _saved_tree(self, step: int) -> Any:
        try:
            metadata = self._manager.item_metadata(step)
        except Exception as e:  # orbax raises varied types for unreadable metadata
            raise DamagedCheckpointError(
                self.directory, step, f"unreadable metadata ({root_cause(e)})"
            ) from e
        state = metadata.get("state") if metadata is not None else None
        if state is None:
            raise DamagedCheckpointError(
                self.directory, step, "state/_METADATA is missing or unreadable"
            )
        return state

    def _restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Structure check, restore, then the integrity check (see `save`)."""
        # Outcome on this process: OK, DAMAGED (bad files) or FAILED (a read error that says
        # nothing about the files: out of memory, an unavailable filesystem). The processes
        # agree on the worst before going on: the checksum is a collective, and one process
        # may fail alone.
        outcome, reason, restored = _OK, "", None
        try:
            saved = self._saved_tree(step)
        except DamagedCheckpointError as e:
            outcome, reason = _DAMAGED, e.reason
        if outcome == _OK:
            difference = tree_difference(saved, abstract_state)
            if difference:  # the same on every process: they read the same metadata
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} does not "
                    f"match this model/config: {difference}"
                )
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # orbax/tensorstore raise plain Exception for bad files
                _silence_reads_left_behind()
                cause = root_cause(e)
                outcome = _FAILED if _is_transient(e, cause) else _DAMAGED
                reason = f"unreadable ({cause})"
        worst = _worst_over_processes(outcome)
        if worst == _FAILED:
            raise CheckpointError(
                f"could not read checkpoint step {step} in {self.directory}: "
                f"{reason or 'failed on another process'} (not a sign of "
                f"damage; retry)"
            )
        if worst == _DAMAGED:
            raise DamagedCheckpointError(
                self.directory, step, reason or "unreadable on another process"
            )
        start = time.perf_counter()
        failure = _verify(restored["state"], restored["meta"])
        if failure:
            raise DamagedCheckpointError(self.directory, step, failure)
        logging.info(
            "restored checkpoint step %d from %s (integrity verified in %.2f s)",
            step,
            self.directory,
            time.perf_counter() - start,
        )
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of checkpoint `step` (default: the latest), its checksum verified."""
        step = self.resolve_step(step)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:  # orbax raises plain Exception for damaged files
            raise DamagedCheckpointError(
                self.directory, step, f"unreadable metadata ({root_cause(e)})"
            ) from e
        if "meta_checksum" in meta and meta_checksum(meta) != meta["meta_checksum"]:
            raise DamagedCheckpointError(self.directory, step, "metadata checksum mismatch")
        return meta

    def saved_state_tree(self, step: int) -> Any:
        """The saved train-state tree as ArrayMetadata leaves (shapes, dtypes), read without
        loading any array. Raises DamagedCheckpointError when it cannot be read."""
        return self._saved_tree(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def root_cause(error: BaseException) -> str:
    """'<type>: <first line>' of the innermost chained exception: orbax wraps the informative
    TensorStore error (e.g. 'OUT_OF_RANGE: Error reading "params.text..." ...') in a message
    followed by ~60 lines of TensorStore spec."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:400]


def meta_checksum(meta: dict[str, Any]) -> str:
    """sha256 of the metadata without its own checksum (key order independent)."""
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _verify(state: Any, meta: dict[str, Any]) -> str | None:
    """None when `state` and `meta` match the checksums written at save time, else why not."""
    if "checksums" not in meta:
        logging.warning(
            "checkpoint written without checksums (by an older clip_jax): restored unverified"
        )
        return None
    if meta.get("meta_checksum") != meta_checksum(meta):
        return "metadata checksum mismatch"
    saved = meta["checksums"]
    actual = checksum.tree_checksums(state)
    if set(saved) != set(actual):
        return f"checksums for {len(saved)} arrays, {len(actual)} restored"
    bad = sorted(name for name in saved if saved[name] != actual[name])
    if bad:
        return (
            f"{len(bad)} of {len(saved)} arrays fail their checksum (e.g. {bad[0]}: saved "
            f"{saved[bad[0]]}, read {actual[bad[0]]})"
        )
    return None


def tree_difference(saved: Any, abstract: Any) -> str:
    """'' when the saved tree (ArrayMetadata or array leaves) has the same array names and
    shapes as `abstract`, else a summary of the differences."""

    def shapes(tree):
        return {
            checksum.path_name(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    got, expected = shapes(dict(saved)), shapes(abstract)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"{k}: saved {got[k]}, model {expected[k]}"
        for k in sorted(set(expected) & set(got))
        if got[k] != expected[k]
    ]
    parts = [
        f"{len(items)} {title} (e.g. {', '.join(items[:3])})"
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        )
        if items
    ]
    return "; ".join(parts)


def _silence_reads_left_behind() -> None:
    """After a failed restore, orbax's other array reads are left behind: later, each reports
    through sys.unraisablehook either `RuntimeError: Event loop is closed` (it finished after
    orbax's event loop closed) or, when garbage-collected, its own read error again with ~60
    lines of TensorStore spec; all after the one-line error that already named the damage.
    Those, and only those, are dropped from then on; anything else goes to the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_clip_jax_filter", False):
        return

    def hook(unraisable):
        error, source = unraisable.exc_value, unraisable.object
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if getattr(source, "__qualname__", "") == "_read_array_index_and_device_put":
            return
        previous(unraisable)

    hook._clip_jax_filter = True
    sys.unraisablehook = hook


_OK, _DAMAGED, _FAILED = 0, 1, 2
# TensorStore/absl status codes of read errors that say nothing about the files' content.
_TRANSIENT_CODES = (
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "ABORTED",
)


def _is_transient(error: BaseException, cause: str) -> bool:
    """Whether a failed restore is no evidence of damage (memory, network, timeouts)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    if isinstance(error, (MemoryError, TimeoutError, ConnectionError)):
        return True
    return any(code in cause for code in _TRANSIENT_CODES)


def _worst_over_processes(outcome: int) -> int:
    if jax.process_count() == 1:
        return outcome
    return int(np.max(multihost_utils.process_allgather(np.asarray(outcome, np.int32))))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (abstract or concrete) carrying the target shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
