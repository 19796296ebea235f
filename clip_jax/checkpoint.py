"""Orbax checkpoints of the train state plus run metadata (data position, config).

Layout: `workdir/checkpoints/<step>/{state,meta}`. Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save never leaves a checkpoint that
restores wrongly: the half-written one is simply not listed. Saves are asynchronous.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or does not match the model being restored."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run; saves asynchronously."""

    def __init__(self, workdir: str, keep: int = 3, save_interval: int | None = None,
                 read_only: bool = False):
        directory = checkpoint_dir(workdir)
        if read_only and not os.path.isdir(directory):
            raise CheckpointError(f"no checkpoints directory at {directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=not read_only)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add("state", args, ocp.StandardCheckpointHandler)
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("meta", args, ocp.JsonCheckpointHandler)
        self._manager = ocp.CheckpointManager(directory, options=options,
                                              handler_registry=registry)
        self.directory = directory

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = True) -> None:
        """Starts an async save of `state` (a pytree of jax.Arrays) and `meta` (JSON)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with sharding), so
        a checkpoint written on 8 devices restores on 1 and the reverse.

        Raises CheckpointError naming the problem when the step does not exist or the saved tree
        does not match the model (missing/unexpected parameters, other shapes).
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises plain Exception for damaged files; re-raised
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this model/config "
                f"or is damaged: {e}") from e
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def saved_state_tree(self, step: int) -> Any:
        """The saved train-state tree as ArrayMetadata leaves (shapes, dtypes), read without
        loading any array."""
        metadata = self._manager.item_metadata(step)["state"]
        if metadata is None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has no state")
        return metadata

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (abstract or concrete) carrying the target shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def load_model_variables(workdir: str, step: int | None = None,
                         sharding: Any = None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Model variables of a training run, without knowing its optimizer or config.

    Restores `params` and `batch_stats` of checkpoint `step` (default: the latest) of
    `workdir` onto `sharding` (default: replicated over all devices), whatever the device count
    that wrote it.
    Returns (step, variables {"params", "batch_stats"?}, meta) where meta holds
    `model_config` (a CLIPConfig dict), `tokenizer` and `dtype`.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        steps = checkpointer.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint in {checkpointer.directory}")
            step = max(steps)
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                                  f"available steps: {steps}")
        if sharding is None:
            import numpy as np
            sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("devices",)),
                                     PartitionSpec())
        saved = checkpointer.saved_state_tree(step)
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
            dict(saved))
        state, meta = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    if "model_config" not in meta:
        raise CheckpointError(f"checkpoint step {step} of {workdir} has no model_config in its "
                              f"metadata; it was not written by clip_jax.train")
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    if meta.get("scan_layers"):
        # Trained with nn.scan over layers: back to the unrolled `resblocks_{i}` layout that
        # `clip_jax.models.create_model` builds by default (and that conversion writes).
        from clip_jax.models.transformer import unstack_layers
        variables = unstack_layers(variables)
    return step, variables, meta
