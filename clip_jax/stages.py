"""A training schedule of stages run in sequence, each continuing from the previous one.

`config.stages` is a tuple of dicts of dotted config overrides, e.g. CLIPA's low-resolution,
short-text pre-training followed by a short full-size phase:

    c.stages = (
        {"total_steps": 9000, "model.vision.image_size": 112, "data.context_length": 16},
        {"total_steps": 1000, "optim.lr": 1e-4},
    )

Stage k trains the base config with its own overrides (not those of earlier stages) in
`<workdir>/stage_<k>`: a normal training workdir, so an interrupted stage resumes from its own
checkpoints. Stage k > 0 starts from stage k-1's final weights (`init_from=<workdir>/
stage_<k-1>`; fresh optimizer state and learning-rate schedule); the architecture then comes
from those weights, and the input sizes `model.vision.image_size` / `model.text.context_length`,
when a stage leaves them unset, are the base architecture's (model.name with the base config's
fields), so a later stage returns to full size without saying so. (A base config that starts
from init_from weights keeps its own input sizes; unset, a later stage stays at the previous
stage's.) A stage that finished writes `<stage dir>/stage_complete.json`; rerunning the same
command skips finished stages and resumes the first unfinished one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
from absl import logging

from clip_jax.models import overrides as overrides_lib

COMPLETE_FILE = "stage_complete.json"


class StageError(ValueError):
    """A stage entry cannot be applied to the config; the message names the stage and key."""


def stage_dir(workdir: str, k: int) -> str:
    return os.path.join(workdir, f"stage_{k}")


def _entries(config) -> list[dict[str, Any]]:
    entries = []
    for i, entry in enumerate(tuple(config.stages)):
        entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
        if not isinstance(entry, dict):
            raise StageError(f"config.stages[{i}]={entry!r}: must be a dict of dotted overrides")
        entries.append(dict(entry))
    return entries


def _set(config, dotted: str, value: Any, where: str) -> None:
    *parents, leaf = dotted.split(".")
    target = config
    try:
        for p in parents:
            target = target[p]
        if leaf not in target:
            raise KeyError(leaf)
        target[leaf] = value
    except (KeyError, AttributeError):
        hint = overrides_lib.renamed_hint(dotted)
        raise StageError(f"{where}: unknown config key {dotted!r}{hint}") from None
    except (TypeError, ValueError) as e:
        raise StageError(f"{where}: {dotted}={value!r}: {e}") from None


def _base_sizes(config) -> dict[str, int]:
    """{"vision.image_size": ..., "text.context_length": ...} of the base architecture
    (model.name with the base config's fields); {} when the base starts from init_from
    weights, whose sizes only the loaded weights know."""
    if config.init_from:
        return {}
    from clip_jax import models, train_setup

    arch = models.get_model_config(config.model.name, **train_setup.model_overrides(config))
    return {"vision.image_size": arch.image_size, "text.context_length": arch.context_length}


def stage_configs(config, workdir: str) -> list[tuple[str, Any]]:
    """[(stage workdir, stage config)] for `config.stages` (each config without `stages`)."""
    entries = _entries(config)
    if not entries:
        raise StageError("config.stages is empty: nothing to run in stages")
    base_sizes = _base_sizes(config)
    out = []
    for k, entry in enumerate(entries):
        where = f"config.stages[{k}]"
        stage = config.copy_and_resolve_references()
        stage.unlock()
        stage.stages = ()
        if k > 0:
            if "init_from" in entry:
                raise StageError(
                    f"{where}: sets init_from, but stage {k} starts from stage {k - 1}'s weights"
                )
            # The architecture now comes from the previous stage's weights: unset its fields,
            # except the input sizes, which return to the base architecture's.
            for dotted in overrides_lib.set_fields(stage.model):
                if dotted not in overrides_lib.INPUT_SIZES:
                    _set(stage, f"model.{dotted}", None, where)
            for dotted, size in base_sizes.items():
                _set(stage, f"model.{dotted}", size, where)
            stage.init_from = stage_dir(workdir, k - 1)
        for key, value in entry.items():
            _set(stage, key, value, where)
        stage.lock()
        out.append((stage_dir(workdir, k), stage))
    return out


def is_complete(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, COMPLETE_FILE))


def stand_in(stages: list[tuple[str, Any]], k: int):
    """Stage `k`'s config (k > 0) as it can be built before stage k-1's weights exist: stage 0's
    architecture (its fields other than the input sizes, or its init_from weights) at stage
    k's own input sizes. It has the parameter shapes, inputs and positional-embedding resize
    stage k will train with; used to check and to plan later stages up front."""
    first = stages[0][1]
    where = f"config.stages[{k}]"
    config = stages[k][1].copy_and_resolve_references()
    config.unlock()
    config.init_from = first.init_from
    for dotted, value in overrides_lib.set_fields(first.model).items():
        if dotted not in overrides_lib.INPUT_SIZES:
            _set(config, f"model.{dotted}", value, where)
    return config


def check(stages: list[tuple[str, Any]], validate_fn: Callable[[Any], None]) -> None:
    """Runs `validate_fn` (`clip_jax.train.validate_config`) on every unfinished stage of
    `stage_configs(...)` before the first one trains, so that a bad later stage (e.g. CLIPA's
    data.context_length) stops the schedule at once, not after stage 0. A stage whose starting
    weights do not exist yet is checked as a stand-in: stage 0's architecture at the stage's
    input sizes (or, when stage 0 starts from init_from weights, those weights at them); its
    text context may not exceed the previous stage's. Raises StageError naming the stage."""
    from clip_jax import train_setup

    first = stages[0][1]
    previous_context = None
    for k, (directory, stage) in enumerate(stages):
        where = f"config.stages[{k}]"
        built = stage
        if k > 0 and not is_complete(stages[k - 1][0]):
            built = stand_in(stages, k)
        try:
            if k > 0:  # only the input sizes may be set over the previous stage's weights
                train_setup.model_overrides(stage)
            if not first.init_from:  # the architecture is known without reading weights
                context = train_setup.load_model(built, with_weights=False)[0].context_length
                if previous_context is not None and context > previous_context:
                    raise train_setup.ConfigError(
                        f"config.model.text.context_length={context} is longer than stage "
                        f"{k - 1}'s {previous_context}; a context can only be shortened"
                    )
                previous_context = context
            if not is_complete(directory):
                validate_fn(built)
        except train_setup.ConfigError as e:
            raise StageError(f"{where}: {e}") from None


def run(
    config,
    workdir: str,
    train_fn: Callable[..., dict] | None = None,
    validate_fn: Callable[[Any], None] | None = None,
    **kwargs,
) -> dict:
    """Runs the stages in order, skipping finished ones; returns the last stage's history (with
    `stage`). Stops after a stage that was preempted (history["preempted"]): rerun to resume.
    `train_fn(config, workdir, **kwargs)` defaults to `clip_jax.train.train`; `validate_fn`
    (see `check`) to `clip_jax.train.validate_config` when train_fn is the default, else no
    check before the first stage."""
    if train_fn is None:
        from clip_jax import train

        train_fn = train.train
        validate_fn = validate_fn or train.validate_config
    history: dict = {}
    stages = stage_configs(config, workdir)
    if validate_fn is not None:
        check(stages, validate_fn)
    for k, (directory, stage) in enumerate(stages):
        if is_complete(directory):
            logging.info("stage %d of %d already finished (%s)", k, len(stages), directory)
            continue
        logging.info("stage %d of %d in %s", k, len(stages), directory)
        history = dict(train_fn(stage, directory, **kwargs), stage=k)
        if history.get("preempted"):
            logging.warning("stage %d was preempted; rerun the same command to resume", k)
            return history
        if jax.process_index() == 0:
            with open(os.path.join(directory, COMPLETE_FILE), "w", encoding="utf-8") as f:
                json.dump({"stage": k, "step": history.get("step")}, f)
    return history
