"""Train state and the pure training step `train_step(state, batch) -> (state, metrics)`."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from clip_jax import losses
from clip_jax.data.transforms import normalize_images
from clip_jax.models import CLIP


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: saved whole in every checkpoint.

    step: int32 scalar, optimizer steps taken.
    params / batch_stats: model variables (batch_stats is {} for models without BatchNorm).
    opt_state: optax state.
    rng: uint32 [2] raw PRNG key data (raw, so checkpoints need no typed-key support).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(model: CLIP, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Initial state from `seed`. Meant to run under `jax.jit(..., out_shardings=...)` so every
    array is created directly in its sharded layout (no host copy of the parameters)."""
    init_key, state_key = jax.random.split(jax.random.key(seed))
    variables = model.init_variables(init_key)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=jax.random.key_data(state_key))


def make_train_step(model: CLIP, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh | None, train_image_tower: bool = True,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds the pure step. Jit it with explicit shardings (see train.py).

    batch: image uint8 [B, H, W, 3] (not normalised), text int32 [B, L]; both batch-sharded.
    A non-finite loss or gradient leaves params, optimizer state and BN statistics unchanged
    (the step counter still advances) and sets metrics["nonfinite"]; the caller decides whether
    to stop or carry on.
    `train_image_tower=False` runs the image tower in inference mode (frozen BN statistics),
    for locked-image tuning (LiT).
    """
    has_batch_stats = model.config.vision.type == "resnet"
    bn_train = has_batch_stats and train_image_tower

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images = normalize_images(batch["image"], model.dtype)

        def loss_fn(params):
            variables = {"params": params}
            if has_batch_stats:
                variables["batch_stats"] = state.batch_stats
            if bn_train:
                out, updates = model.apply(variables, images, batch["text"], train=True,
                                           mutable=["batch_stats"])
                new_batch_stats = updates["batch_stats"]
            else:
                out = model.apply(variables, images, batch["text"], train=False)
                new_batch_stats = state.batch_stats
            loss, metrics = losses.clip_loss(out["image_embeddings"], out["text_embeddings"],
                                             out["logit_scale"], mesh=mesh)
            return loss, (metrics, new_batch_stats)

        (loss, (metrics, new_batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            batch_stats=keep(new_batch_stats, state.batch_stats))
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                       nonfinite=jnp.logical_not(finite).astype(jnp.int32))
        return new_state, metrics

    return train_step
