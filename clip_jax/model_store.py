"""A model on disk: where each kind of source keeps it, and the one way to read it back.

Wherever clip_jax takes a model (`clip_jax.load`, `python -m clip_jax.evaluate --init_from`,
`python -m clip_jax.export --from`, `--config.init_from`) it takes any of

    converted directory   DIR/model.json   {"model_config", "tokenizer", "source"}
      (clip_jax.convert)  DIR/variables/   orbax StandardCheckpointer item, float32 variables
    training workdir      DIR/checkpoints/<step>/{state,meta}   (clip_jax.checkpoint): state
      (clip_jax.train)      holds params, batch_stats and the optimizer state; meta the
                            model_config, tokenizer, dtype and scan_layers of the run
                          DIR/config.json  the training config (not needed to read the model)
    WORKDIR@STEP          checkpoint STEP of a workdir, e.g. runs/x@1200 (default: the latest)
    Hub reference         hf-hub:ORG/NAME[@REVISION] or pretrained:ARCH/TAG (clip_jax.hub)

`load_model(path)` reads any of them into a `LoadedModel` (config, variables, tokenizer name);
`save_converted` writes a converted directory. This module is the only code that knows these
layouts; `clip_jax.convert` and `clip_jax.hub` only translate PyTorch names and layouts.
Every problem is a `CheckpointError` with a one-line message naming the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax

from clip_jax import checkpoint as ckpt_lib
from clip_jax import models
from clip_jax.checkpoint import CheckpointError
from clip_jax.cli import one_line

MODEL_JSON = "model.json"  # converted directory: model config and provenance
VARIABLES_ITEM = "variables"  # converted directory: the orbax item holding the variables
DEFAULT_TOKENIZER = "clip-bpe"  # what a model.json or checkpoint without "tokenizer" means
KINDS = ("converted", "workdir", "hub")
_STEP_SUFFIX = re.compile(r"^(?P<path>.+)@(?P<step>\d+)$")


@dataclasses.dataclass
class LoadedModel:
    """What `load_model` read.

    variables: {"params", "batch_stats"?} in the unrolled layer layout (`resblocks_{i}`) that
      `clip_jax.models.create_model` builds, float32 (None from `describe`).
    tokenizer: a `clip_jax.tokenizers.get` name.
    dtype: the training run's compute dtype (float32 for converted and Hub weights).
    step: the checkpoint step of a workdir; None otherwise.
    source: the path read (absolute), or the pinned Hub reference `hf-hub:ORG/NAME@COMMIT`.
    meta: the checkpoint metadata of a workdir step, model.json of a converted directory, {}
      for the Hub.
    """

    config: models.CLIPConfig
    variables: dict[str, Any] | None
    tokenizer: str
    dtype: str
    step: int | None
    kind: str  # one of KINDS
    source: str
    meta: dict[str, Any]

    @property
    def origin(self) -> str | None:
        """Where converted weights came from (model.json "source"; the Hub reference)."""
        if self.kind == "hub":
            return self.source
        return self.meta.get("source") if self.kind == "converted" else None


def is_converted_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_JSON)) and os.path.isdir(
        os.path.join(path, VARIABLES_ITEM)
    )


def is_workdir(path: str | os.PathLike) -> bool:
    return os.path.isdir(ckpt_lib.checkpoint_dir(os.fspath(path)))


def locate(path: str | os.PathLike, step: int | None = None) -> tuple[str, str, int | None]:
    """(kind, path without any @STEP, step) of a model source, without reading its arrays.

    `path@STEP` names a workdir checkpoint (an existing directory whose name contains `@` is
    taken as it is). Raises CheckpointError (one line) for a path that does not exist, is no
    model, or a step given for weights that have none.
    """
    from clip_jax import hub

    path = os.fspath(path)
    if hub.is_reference(path):
        if step is not None:
            raise CheckpointError(
                f"{path} names pretrained weights, which have no steps; drop step={step}"
            )
        return "hub", path, None
    match = _STEP_SUFFIX.match(path)
    if match and not os.path.isdir(path):
        named = int(match["step"])
        if step is not None and step != named:
            raise CheckpointError(f"{path} names step {named} but step={step} was asked for")
        path, step = match["path"], named
    if is_converted_dir(path):
        if step is not None:
            raise CheckpointError(
                f"{path} holds converted weights, which have no steps; drop step {step}"
            )
        return "converted", path, None
    if is_workdir(path):
        return "workdir", path, step
    if not os.path.isdir(path):
        hint = "" if match or "@" not in path else " (a workdir step is written WORKDIR@STEP)"
        hint = hint or hub.name_hint(path)
        raise CheckpointError(f"{path} does not exist{hint}")
    raise CheckpointError(
        f"{path} is neither a training workdir (no checkpoints/ in it) nor a converted "
        f"checkpoint ({MODEL_JSON} + {VARIABLES_ITEM}/)"
    )


def load_model(
    path: str | os.PathLike, step: int | None = None, sharding: jax.sharding.Sharding | None = None
) -> LoadedModel:
    """Reads the model of a converted directory, a training workdir (checkpoint `step` or
    `path@STEP`, default the latest; its checksums verified) or a Hub reference.

    Arrays are placed on `sharding` (default: replicated over every device of every process;
    per device that is the one full copy a single-device load would make). Raises
    CheckpointError (one line; DamagedCheckpointError for damaged files) naming the problem.
    """
    if sharding is None:
        from clip_jax import sharding as sharding_lib

        sharding = sharding_lib.replicated(sharding_lib.create_mesh())
    kind, path, step = locate(path, step)
    if kind == "hub":
        from clip_jax import hub

        try:
            config, variables, pinned = hub.load(path)
        except (ValueError, ImportError) as e:  # HubError is a ValueError
            raise CheckpointError(str(e)) from e
        variables = jax.device_put(variables, sharding)
        return LoadedModel(config, variables, hub.TOKENIZER, "float32", None, kind, pinned, {})
    if kind == "converted":
        loaded = _converted_model(path)
        variables = _restore_converted(path, loaded.config, sharding)
        return dataclasses.replace(loaded, variables=variables)
    step, variables, meta = _restore_workdir(path, step, sharding)
    loaded = _workdir_model(path, step, meta)
    check_variables(loaded.config, variables, f"checkpoint step {step} of {path}")
    return dataclasses.replace(loaded, variables=variables)


def describe(path: str | os.PathLike, step: int | None = None) -> LoadedModel:
    """`load_model` without the arrays (`variables` None): the config, tokenizer and step,
    read from model.json or a checkpoint's metadata. A Hub reference is read whole (its
    config sits beside the weights it is checked against)."""
    kind, path, step = locate(path, step)
    if kind == "hub":
        return dataclasses.replace(load_model(path), variables=None)
    if kind == "converted":
        return _converted_model(path)
    checkpointer = ckpt_lib.Checkpointer(path, read_only=True)
    try:
        step = checkpointer.resolve_step(step)
        meta = checkpointer.restore_meta(step)
    finally:
        checkpointer.close()
    return _workdir_model(path, step, meta)


def check_variables(config: models.CLIPConfig, variables: dict[str, Any], where: str) -> None:
    """Raises CheckpointError when `variables` do not have exactly the leaves and shapes of
    the model `config` builds."""
    model = models.create_model(config)
    expected = jax.eval_shape(model.init_variables, jax.random.key(0))
    difference = ckpt_lib.tree_difference(variables, expected)
    if difference:
        raise CheckpointError(f"{where} does not match its model config: {difference}")


def save_converted(
    directory: str | os.PathLike,
    config: models.CLIPConfig,
    variables: dict[str, Any],
    source: str | None = None,
    overwrite: bool = False,
    tokenizer: str = DEFAULT_TOKENIZER,
) -> Path:
    """Writes a converted directory: `DIR/variables` (orbax StandardCheckpointer) and
    `DIR/model.json` = {"model_config": config.to_dict(), "tokenizer", "source"}.

    Returns the absolute directory. Refuses to replace existing files unless `overwrite`
    (FileExistsError).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()  # orbax needs absolute paths
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{str(directory)!r} exists and is not empty (pass overwrite=True "
            f"/ --overwrite to replace it)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / VARIABLES_ITEM, variables, force=overwrite)
    checkpointer.wait_until_finished()  # saves are asynchronous
    meta = {"model_config": config.to_dict(), "tokenizer": tokenizer, "source": source}
    (directory / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _restore_converted(
    directory: str, config: models.CLIPConfig, sharding: jax.sharding.Sharding
) -> dict[str, Any]:
    """The variables of a converted directory, restored against the shapes and dtypes of the
    model `config` builds (so a model.json that does not fit the arrays is an error)."""
    import orbax.checkpoint as ocp

    item = os.path.join(os.path.abspath(directory), VARIABLES_ITEM)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        jax.eval_shape(models.create_model(config).init_variables, jax.random.key(0)),
    )
    try:
        return ocp.StandardCheckpointer().restore(item, abstract)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise CheckpointError(
            f"cannot restore the variables in {item} for the model in its {MODEL_JSON}: "
            f"{one_line(e, 400)}"
        ) from e


def _restore_workdir(
    workdir: str, step: int | None, sharding: jax.sharding.Sharding
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, variables, meta) of a checkpoint: the whole train state is restored (its
    checksums cover every array) and params (their moving average when the run kept one)
    and batch_stats kept, unrolled when the run scanned its layers."""
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
        steps = checkpointer.all_steps()
        step = checkpointer.resolve_step(step)
        try:
            saved = checkpointer.saved_state_tree(step)
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                dict(saved),
            )
            state, meta = checkpointer.restore(step, abstract)
        except ckpt_lib.DamagedCheckpointError as e:
            others = [s for s in steps if s != step]
            if not others:
                raise
            raise ckpt_lib.DamagedCheckpointError(
                checkpointer.directory, step, f"{e.reason}; other steps: {others}"
            ) from None
    finally:
        checkpointer.close()
    # A run with config.ema_decay saved a moving average of its params: those are its weights.
    variables = {"params": state.get("ema_params") or state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    if meta.get("scan_layers"):
        # Trained with nn.scan over layers: back to the unrolled `resblocks_{i}` layout that
        # `clip_jax.models.create_model` builds by default (and that conversion writes).
        from clip_jax.models.transformer import unstack_layers

        variables = unstack_layers(variables)
    return step, variables, meta


def _converted_model(directory: str) -> LoadedModel:
    """What model.json of a converted directory says (no variables)."""
    path = os.path.join(os.path.abspath(directory), MODEL_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        config = models.CLIPConfig.from_dict(meta["model_config"])
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"corrupt {path}: {type(e).__name__}: {e}") from e
    tokenizer = meta.get("tokenizer") or DEFAULT_TOKENIZER
    return LoadedModel(
        config, None, tokenizer, "float32", None, "converted", os.path.dirname(path), meta
    )


def _workdir_model(workdir: str, step: int, meta: dict[str, Any]) -> LoadedModel:
    """What the metadata of checkpoint `step` says about its model (no variables)."""
    if "model_config" not in meta:
        raise CheckpointError(
            f"checkpoint step {step} of {workdir} has no model_config in its "
            f"metadata; it was not written by clip_jax.train"
        )
    try:
        config = models.CLIPConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint step {step} of {workdir} has an invalid model_config: {e}"
        ) from e
    return LoadedModel(
        config,
        None,
        meta.get("tokenizer") or DEFAULT_TOKENIZER,
        meta.get("dtype", "float32"),
        step,
        "workdir",
        os.path.abspath(workdir),
        meta,
    )
