"""Optimizer: AdamW with CLIP's defaults, warmup + cosine schedule, decay and freeze masks."""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import optax

from clip_jax.sharding import path_str

# Weight decay by parameter role, read from the leaf name (the last path component), so a
# stacked `resblocks` tree (scan_layers=True: LayerNorm gains [L, W], biases [L, W]) decays
# exactly what the unrolled tree decays. A rank test (`ndim >= 2`) cannot tell a stacked gain
# from a matrix. Decayed: weight matrices and conv kernels (nn.Dense/nn.Conv/QKV `kernel`, the
# towers' output projections `proj` and `text_projection`). Not decayed: LayerNorm/BatchNorm
# gains (`scale`) and all biases (CLIP paper: "all weights that are not gains or biases"), the
# token, positional and class embeddings (as big_vision, which decays only `.../kernel`; open_clip
# decays token and positional embeddings because they are 2-D), and the temperature/bias of the
# loss (`logit_scale`, `logit_bias`).
DECAYED_NAMES = frozenset({"kernel", "proj", "text_projection"})
NOT_DECAYED_NAMES = frozenset(
    {
        "scale",
        "bias",
        "embedding",
        "positional_embedding",
        "class_embedding",
        "logit_scale",
        "logit_bias",
    }
)


def is_decayed(path: str) -> bool:
    """Whether the parameter at `path` ('text/ln_final/scale') gets weight decay, by the role
    its leaf name states (see DECAYED_NAMES / NOT_DECAYED_NAMES). Raises ValueError for a
    name with no known role, so a new kind of parameter cannot be decayed by accident."""
    name = path.rsplit("/", 1)[-1]
    if name in DECAYED_NAMES:
        return True
    if name in NOT_DECAYED_NAMES:
        return False
    raise ValueError(
        f"parameter {path!r}: no weight-decay role for the name {name!r}; add it "
        f"to clip_jax.optim.DECAYED_NAMES or NOT_DECAYED_NAMES"
    )


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that are decayed (kernels and projections), False for gains,
    biases, embeddings and the loss's temperature/bias; the same for scanned (stacked) and
    unrolled parameter trees."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(path_str(path)), params)


def frozen_mask(params: Any, freeze: str) -> Any:
    """True for parameters whose path fully matches the regex `freeze` ('' freezes nothing)."""
    if not freeze:
        return jax.tree.map(lambda _: False, params)
    try:
        pattern = re.compile(freeze)
    except re.error as e:
        raise ValueError(f"config.freeze={freeze!r} is not a valid regex: {e}") from None
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: bool(pattern.fullmatch(path_str(path))), params
    )
    if not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"config.freeze={freeze!r} matches no parameter path (paths look like "
            f"'image/conv1/kernel' or 'text/ln_final/scale')"
        )
    return mask


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Every key of configs/clip.py's `optim` block, with the test its value must pass.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda x: _real(x) and x >= 0, "must be a finite number >= 0"),
    "warmup_steps": (lambda x: _integer(x) and x >= 0, "must be an integer >= 0"),
    "end_lr_factor": (
        lambda x: _real(x) and 0 <= x <= 1,
        "must be in [0, 1] (final LR as a fraction of the peak)",
    ),
    "weight_decay": (lambda x: _real(x) and x >= 0, "must be a finite number >= 0"),
    "b1": (lambda x: _real(x) and 0 <= x < 1, "must be in [0, 1)"),
    "b2": (lambda x: _real(x) and 0 <= x < 1, "must be in [0, 1)"),
    "eps": (lambda x: _real(x) and x > 0, "must be a finite number > 0"),
    "grad_clip_norm": (lambda x: _real(x) and x >= 0, "must be a finite number >= 0 (0: off)"),
}


def validate(optim_config) -> None:
    """Raises a one-line ValueError naming the first `optim.<key>` that is missing or has an
    impossible value (e.g. "config.optim.b2=1.5: must be in [0, 1)"). Accepts a ConfigDict or
    any object with the keys as attributes."""
    for key, (ok, why) in _CHECKS.items():
        if not hasattr(optim_config, key):
            raise ValueError(f"config.optim.{key} is missing")
        value = getattr(optim_config, key)
        if not ok(value):
            raise ValueError(f"config.optim.{key}={value!r}: {why}")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `lr * end_factor`."""
    lr = float(optim_config.lr)
    warmup = int(optim_config.warmup_steps)
    if warmup >= total_steps:
        return optax.linear_schedule(0.0, lr, max(warmup, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=lr * float(optim_config.end_lr_factor),
    )


def scale_by_schedule_at_step(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by `-schedule(step)`, `step` given to `update(..., step=...)`.

    optax's own schedules count the updates they have seen; a step skipped for a non-finite
    gradient (step.py leaves the optimizer state unchanged) would stop that count while the
    train step counter goes on, so the learning rate applied, the learning rate logged and the
    schedule's end would drift apart. Reading the train step counter keeps one clock.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        if step is None:
            raise TypeError(
                "this optimizer needs the train step: tx.update(grads, opt_state, "
                "params, step=state.step)"
            )
        lr = schedule(step)
        return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def create_optimizer(
    optim_config, total_steps: int, params: Any, freeze: str = ""
) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (b1, b2, eps, decoupled weight decay on `weight_decay_mask`), optional global-norm
    clipping, frozen parameters (regex over paths) receiving zero updates and no optimizer state.

    The learning rate follows the train step counter, passed at every update:
    `tx.update(grads, opt_state, params, step=state.step)`. A step skipped for a non-finite
    gradient uses up its place in the schedule (as open_clip's per-iteration scheduler does), so
    the schedule ends at `total_steps` and the logged `schedule(step)` is the rate applied;
    Adam's bias correction counts the updates actually applied.

    `params` may be abstract (ShapeDtypeStructs): only the tree structure and names are read.
    Returns the transformation and the schedule (for logging the learning rate).
    """
    schedule = learning_rate_schedule(optim_config, total_steps)
    chain = []
    if float(optim_config.grad_clip_norm) > 0:
        chain.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
    # optax.adamw's own chain, with the schedule read at the train step instead of its count.
    chain += [
        optax.scale_by_adam(
            b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.eps)
        ),
        optax.add_decayed_weights(float(optim_config.weight_decay), mask=weight_decay_mask(params)),
        scale_by_schedule_at_step(schedule),
    ]
    tx = optax.chain(*chain)
    frozen = frozen_mask(params, freeze)
    if any(jax.tree.leaves(frozen)):
        labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
