"""What a training run builds from its config before it touches data or parameter values.

`build(config, mesh)` returns the model, optimizer, train-state shardings and the jitted train
step exactly as `clip_jax.train` builds them (same model flags, freeze mask, sharding rules,
accumulation, loss, donation), plus the abstract train state and batch, so a caller can lower
and compile the real step from shapes alone (`clip_jax.plan` compiles it for TPU pods that are
not there). `clip_jax.train` builds its run with it (tests/test_plan.py checks that a trainer
step and this module's jitted step give the same state).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from clip_jax import losses as losses_lib
from clip_jax import models, optim, sharding
from clip_jax import step as step_lib
from clip_jax.models import attention, patch_dropout, resize, transformer
from clip_jax.models import overrides as overrides_lib

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """The config asks for something impossible; the message names the key."""


def model_overrides(config) -> dict:
    """The architecture fields set in `config.model` (`--config.model.vision.width=64`, see
    `clip_jax.models.overrides`) as `models.get_model_config` overrides; {} when none is.

    With `init_from` the architecture comes from the weights: only the input sizes
    `model.vision.image_size` and `model.text.context_length` may be set (`load_model` adapts
    the weights' positional embeddings to them) and {} is returned."""
    changes = overrides_lib.set_fields(config.model)
    if not changes:
        return {}
    if config.init_from:
        others = {k: v for k, v in changes.items() if k not in overrides_lib.INPUT_SIZES}
        if others:
            key, value = next(iter(others.items()))
            raise ConfigError(
                f"config.model.{key}={value!r}: architecture fields must stay unset with "
                f"init_from (the architecture comes from the weights; only model.vision."
                f"image_size and model.text.context_length may be set, to resize them)"
            )
        return {}
    try:
        return overrides_lib.resolve(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_model(config, model_config: models.CLIPConfig) -> None:
    """Raises ConfigError when the run's options do not fit the model it trains
    (`model_config`: from model.name and its fields, or from the init_from weights): patch
    dropout needs a ViT image tower, and training captions (`data.context_length`) cannot be
    longer than the text tower's context."""
    if config.init_from:
        has = f"the init_from weights ({config.init_from}) have"
        own = "the init_from weights' own"
    else:
        has = f"config.model.name={config.model.name!r} has"
        own = f"that of config.model.name={config.model.name!r}"
    rate = config.model.patch_dropout
    require(
        model_config.vision.type == "vit" or not rate,
        "model.patch_dropout",
        rate,
        f"needs a ViT image tower; {has} a {model_config.vision.type} tower",
    )
    length = int(config.data.get("context_length", 0) or 0)
    context = model_config.context_length
    if length > context:
        _, set_context = overrides_lib.input_sizes(config.model)
        unset = "" if set_context is not None else f" (unset: {own})"
        raise ConfigError(
            f"config.data.context_length={length} is longer than the model's text context "
            f"config.model.text.context_length={context}{unset}; training captions can only be "
            f"shortened"
        )


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """Raises `ConfigError("config.KEY=VALUE: WHY")` unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{key}={value!r}: {why}")


def validate_step_config(config, mesh: Mesh | None = None, num_processes: int = 1) -> None:
    """The checks of `train.validate_config` that concern the model and the step (not data,
    checkpoints or evaluation); raises ConfigError naming the offending key."""
    check = require
    check(config.batch_size > 0, "batch_size", config.batch_size, "must be positive")
    check(config.dtype in DTYPES, "dtype", config.dtype, f"must be one of {DTYPES}")
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
    try:  # FLIP patch dropout: a rate in [0, 1); a ViT tower is checked by check_model
        patch_dropout.check_rate(config.model.patch_dropout)
    except ValueError as e:
        raise ConfigError(f"config.model.{e}") from None
    if not config.init_from:
        try:
            models.get_model_config(config.model.name)
        except ValueError as e:
            raise ConfigError(f"config.model.name={config.model.name!r}: {e}") from None
    for key, value in zip(overrides_lib.INPUT_SIZES, overrides_lib.input_sizes(config.model)):
        check(
            value is None or value >= 1,
            f"model.{key}",
            value,
            "must be a positive int (unset: the architecture's own)",
        )
    if not config.init_from:  # the architecture is known without reading anything
        load_model(config, with_weights=False)
    else:
        model_overrides(config)
    if mesh is not None:
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
            config.batch_size % num_processes == 0,
            "batch_size",
            config.batch_size,
            f"must be divisible by the {num_processes} processes",
        )


def load_model(config, with_weights: bool = True) -> tuple[models.CLIPConfig, dict | None, str]:
    """The architecture the run trains (+ the variables of `init_from` when it is set and
    `with_weights`) and tokenizer name. Raises ConfigError (`check_model`) when the run's
    options do not fit that architecture.

    `init_from` is any model source of `clip_jax.model_store`: a converted directory, a
    training workdir (its latest checkpoint, or `WORKDIR@STEP`) or a Hub reference; its
    config and tokenizer replace `model.name` and `data.tokenizer`, at the input sizes
    `model.vision.image_size` / `model.text.context_length` when they are set (the image
    positional embeddings resized, the text ones truncated; `clip_jax.models.resize`). With
    `loss="siglip"` a from-scratch model gets SigLIP's initial temperature log(10) and a logit
    bias initialised at -10; weights without a bias get a fresh one (-10).
    `with_weights=False` reads only the model description (no arrays), for callers that need
    shapes alone.
    """
    siglip = config.loss == "siglip"
    if not config.init_from:
        model_config = models.get_model_config(config.model.name, **model_overrides(config))
        if siglip:
            model_config = model_config.replace(
                init_logit_scale=losses_lib.SIGLIP_INIT_LOGIT_SCALE,
                init_logit_bias=losses_lib.SIGLIP_INIT_LOGIT_BIAS,
            )
        check_model(config, model_config)
        return model_config, None, config.data.tokenizer
    from clip_jax import model_store
    from clip_jax.checkpoint import CheckpointError

    model_overrides(config)  # only the input sizes may be set
    try:
        read = model_store.load_model if with_weights else model_store.describe
        loaded = read(config.init_from)
    except CheckpointError as e:
        raise ConfigError(f"config.init_from: {e}") from None
    model_config = _at_input_sizes(config, loaded.config)
    check_model(config, model_config)
    variables = loaded.variables
    if variables is not None:
        try:
            variables = resize.adapt_variables(variables, model_config)
        except ValueError as e:
            raise ConfigError(f"config.init_from: {e}") from None
    if siglip and model_config.init_logit_bias is None:
        model_config = model_config.replace(init_logit_bias=losses_lib.SIGLIP_INIT_LOGIT_BIAS)
    return model_config, variables, loaded.tokenizer


def _at_input_sizes(config, loaded: models.CLIPConfig) -> models.CLIPConfig:
    """The init_from architecture `loaded` at the input sizes set in config.model (unset: the
    weights' own). A longer text context than the weights have is refused: there is nothing to
    learn the extra positions from."""
    image_size, context_length = overrides_lib.input_sizes(config.model)
    if context_length is not None and context_length > loaded.context_length:
        raise ConfigError(
            f"config.model.text.context_length={context_length}: longer than the "
            f"{loaded.context_length} text positions of the init_from weights "
            f"({config.init_from}); a context can only be shortened"
        )
    try:
        return resize.with_input_sizes(loaded, image_size=image_size, context_length=context_length)
    except ValueError as e:
        raise ConfigError(
            f"config.model.vision.image_size={image_size!r}: {e} (the {loaded.vision.type} tower "
            f"of the init_from weights)"
        ) from None


def build_model(config, model_config: models.CLIPConfig) -> models.CLIP:
    """The `CLIP` module with the config's compute dtype, attention kernel, remat and scan."""
    return models.CLIP(
        model_config,
        dtype=jnp.dtype(config.dtype),
        attention_impl=config.model.attention_impl or None,
        remat=config.model.remat,
        scan_layers=config.model.scan_layers,
        patch_dropout=config.model.patch_dropout,
    )


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """The pieces of a run that follow from (config, mesh); no parameter values.

    abstract_state: the TrainState of ShapeDtypeStructs (no shardings attached).
    state_shardings: its NamedShardings (params and Adam moments over `fsdp`).
    batch_sharding: the leading (batch) dimension over the data-parallel axes.
    """

    config: Any
    mesh: Mesh
    model_config: models.CLIPConfig
    init_variables: dict | None
    tokenizer_name: str
    model: models.CLIP
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    image_frozen: bool
    init_fn: Callable[[], step_lib.TrainState]
    abstract_state: step_lib.TrainState
    state_shardings: step_lib.TrainState
    batch_sharding: NamedSharding
    replicated: NamedSharding

    def train_step(self, mesh: Mesh | None | str = "setup") -> Callable:
        """The pure step `(state, batch) -> (state, metrics)`. `mesh=None` gives the unsharded
        step the trainer lowers for its model-FLOP count."""
        mesh = self.mesh if mesh == "setup" else mesh
        return step_lib.make_train_step(
            self.model,
            self.tx,
            self.schedule,
            mesh,
            train_image_tower=not self.image_frozen,
            loss=self.config.loss,
            accumulation_steps=self.config.accumulation_steps,
            param_shardings=self.state_shardings.params if mesh is not None else None,
            ema_decay=float(self.config.get("ema_decay", 0.0)),
        )

    def jit_step(self):
        """The jitted step as the trainer runs it: explicit shardings, state donated."""
        batch_shardings = {"image": self.batch_sharding, "text": self.batch_sharding}
        return jax.jit(
            self.train_step(),
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )

    def jit_init(self):
        """`jit(init_fn)` creating every state array directly in its sharded layout."""
        return jax.jit(self.init_fn, out_shardings=self.state_shardings)

    def abstract_batch(self, batch_size: int | None = None, sharded: bool = True) -> dict:
        """image uint8 [B, S, S, 3], text int32 [B, L] ShapeDtypeStructs (B: the global batch,
        default config.batch_size), carrying the batch sharding unless `sharded=False`."""
        b = self.config.batch_size if batch_size is None else batch_size
        s, length = self.model_config.image_size, self.model_config.context_length
        length = int(self.config.data.get("context_length", 0) or 0) or length  # short text
        kw = {"sharding": self.batch_sharding} if sharded else {}
        return {
            "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, **kw),
            "text": jax.ShapeDtypeStruct((b, length), jnp.int32, **kw),
        }

    def sharded_abstract_state(self) -> step_lib.TrainState:
        """The abstract state with each leaf's sharding attached (for `jit(...).lower`)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )


def build(
    config,
    mesh: Mesh,
    with_weights: bool = True,
    loaded: tuple[models.CLIPConfig, dict | None, str] | None = None,
) -> TrainSetup:
    """Everything `clip_jax.train` builds from `config` on `mesh`, without parameter values.

    `with_weights=False` skips reading the weights of `init_from`: only their architecture is
    read, for planning. `loaded`: `load_model(config)`'s result when the caller has it
    already (nothing is read again). Raises ConfigError for bad sharding rules or freeze
    regexes.
    """
    model_config, init_variables, tokenizer_name = loaded or load_model(config, with_weights)
    model = build_model(config, model_config)
    abstract_params = jax.eval_shape(model.init_variables, jax.random.key(0))["params"]
    try:
        tx, schedule = optim.create_optimizer(
            config.optim, config.total_steps, abstract_params, freeze=config.freeze
        )
        image_frozen = bool(config.freeze) and all(
            jax.tree.leaves(optim.frozen_mask(abstract_params, config.freeze)["image"])
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    init_fn = functools.partial(
        step_lib.init_train_state,
        model,
        tx,
        config.seed,
        ema=float(config.get("ema_decay", 0.0)) > 0,
    )
    abstract_state = jax.eval_shape(init_fn)
    try:
        state_shardings = sharding.state_shardings(
            mesh, abstract_state, rules=tuple(config.sharding_rules)
        )
    except ValueError as e:
        raise ConfigError(f"config.sharding_rules: {e}") from None
    return TrainSetup(
        config=config,
        mesh=mesh,
        model_config=model_config,
        init_variables=init_variables,
        tokenizer_name=tokenizer_name,
        model=model,
        tx=tx,
        schedule=schedule,
        image_frozen=image_frozen,
        init_fn=init_fn,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_sharding=sharding.batch_sharding(mesh),
        replicated=sharding.replicated(mesh),
    )
