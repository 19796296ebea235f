"""Optimizer: AdamW with CLIP's defaults, warmup + cosine schedule, decay and freeze masks."""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

# Parameters that get no weight decay: gains and biases (1-D), embeddings, the temperature.
_NO_DECAY = re.compile(r"(embedding|logit_scale|logit_bias)")


def path_str(path: tuple) -> str:
    """A pytree key path as 'image/transformer/resblocks_0/attn/in_proj/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that are decayed: matrices and conv kernels, not embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not _NO_DECAY.search(path_str(path)), params)


def frozen_mask(params: Any, freeze: str) -> Any:
    """True for parameters whose path fully matches the regex `freeze` ('' freezes nothing)."""
    if not freeze:
        return jax.tree.map(lambda _: False, params)
    try:
        pattern = re.compile(freeze)
    except re.error as e:
        raise ValueError(f"config.freeze={freeze!r} is not a valid regex: {e}") from None
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: bool(pattern.fullmatch(path_str(path))), params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"config.freeze={freeze!r} matches no parameter path (paths look like "
                         f"'image/conv1/kernel' or 'text/ln_final/scale')")
    return mask


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `lr * end_factor`."""
    lr = float(optim_config.lr)
    warmup = int(optim_config.warmup_steps)
    if warmup >= total_steps:
        return optax.linear_schedule(0.0, lr, max(warmup, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=lr * float(optim_config.end_lr_factor))


def create_optimizer(optim_config, total_steps: int, params: Any,
                     freeze: str = "") -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (b1, b2, eps, decoupled weight decay on `weight_decay_mask`), optional global-norm
    clipping, frozen parameters (regex over paths) receiving zero updates and no optimizer state.

    `params` may be abstract (ShapeDtypeStructs): only the tree structure and ranks are read.
    Returns the transformation and the schedule (for logging the learning rate).
    """
    schedule = learning_rate_schedule(optim_config, total_steps)
    chain = []
    if float(optim_config.grad_clip_norm) > 0:
        chain.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
    chain.append(optax.adamw(schedule, b1=float(optim_config.b1), b2=float(optim_config.b2),
                             eps=float(optim_config.eps),
                             weight_decay=float(optim_config.weight_decay),
                             mask=weight_decay_mask(params)))
    tx = optax.chain(*chain)
    frozen = frozen_mask(params, freeze)
    if any(jax.tree.leaves(frozen)):
        labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
