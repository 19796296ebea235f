"""Train state and the pure training step `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from clip_jax import grad_cache, losses, sharding
from clip_jax.data.transforms import normalize_images
from clip_jax.models import CLIP, patch_dropout


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: saved whole in every checkpoint.

    step: int32 scalar, optimizer steps taken.
    params / batch_stats: model variables (batch_stats is {} for models without BatchNorm).
    opt_state: optax state.
    rng: uint32 [2] raw PRNG key data (raw, so checkpoints need no typed-key support).
    ema_params: exponential moving average of params (`config.ema_decay`), the weights that
      evaluation and export use; None when the run keeps no average.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None


def init_train_state(
    model: CLIP, tx: optax.GradientTransformation, seed: int, ema: bool = False
) -> TrainState:
    """Initial state from `seed` (`ema`: keep a moving average of the params, starting at
    them). Meant to run under `jax.jit(..., out_shardings=...)` so every array is created
    directly in its sharded layout (no host copy of the parameters)."""
    init_key, state_key = jax.random.split(jax.random.key(seed))
    variables = model.init_variables(init_key)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(state_key),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
    )


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The averaging weight of the old average after `step` (0-based) updates: `decay`, but
    at most (1 + step) / (10 + step) early on, so the average is not dominated by the random
    initial weights in short runs (0.1 at the first step, 0.9 at step 80, 0.99 at step 890)."""
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def update_ema(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """`decay * ema + (1 - decay) * params`, leaf by leaf (float32)."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


GradFn = grad_cache.GradFn


def make_grad_fn(
    model: CLIP,
    mesh: Mesh | None,
    *,
    loss: str = "clip",
    accumulation_steps: int = 1,
    train_image_tower: bool = True,
    param_shardings: Any = None,
) -> GradFn:
    """`grad_fn(params, batch_stats, batch) -> (loss, metrics, grads, new_batch_stats)`.

    batch: image uint8 [B, H, W, 3], text int32 [B, L], batch-sharded over the mesh, and for
    a ViT with patch dropout `patch_noise` float32 [B, N] (see models/patch_dropout.py).
    `accumulation_steps` K > 1 computes the *same* gradients as K = 1 with the activations of
    only B / K rows alive at a time (`clip_jax.grad_cache`). `param_shardings` (optional) pins
    its gradient accumulator's sharding to the parameters' (FSDP).
    """
    forward = _make_forward(model, mesh, train_image_tower)
    if accumulation_steps > 1:
        return grad_cache.make_grad_fn(
            forward,
            mesh,
            loss=loss,
            accumulation_steps=accumulation_steps,
            param_shardings=param_shardings,
        )

    def grad_fn(params, batch_stats, batch):
        def loss_fn(params):
            out, new_batch_stats = forward(
                params, batch_stats, batch["image"], batch["text"], batch.get("patch_noise")
            )
            value, metrics = losses.contrastive_loss(loss, out, mesh)
            return value, (metrics, new_batch_stats)

        (value, (metrics, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params
        )
        return value, metrics, grads, new_batch_stats

    return grad_fn


def _make_forward(model: CLIP, mesh: Mesh | None, train_image_tower: bool) -> grad_cache.Forward:
    """`forward(params, batch_stats, images uint8 [b, H, W, 3], text int32 [b, L]) ->
    (model outputs, new batch_stats)`: images normalised in the model's dtype; BatchNorm
    (ResNet towers) in training mode unless the image tower is frozen."""
    has_batch_stats = model.config.vision.type == "resnet"
    bn_train = has_batch_stats and train_image_tower

    def gather(params):
        """FSDP: all-gather each weight where the forward uses it. Without this constraint
        GSPMD propagates the weights' feature-dim sharding into the activations (and then
        reshards them back and forth); with it, activations stay batch-sharded and the
        transpose of the all-gather reduce-scatters the gradients into the parameters' shards.
        A no-op for replicated parameters."""
        if mesh is None:
            return params
        return jax.lax.with_sharding_constraint(params, sharding.replicated(mesh))

    def forward(params, batch_stats, images_u8, text, noise=None):
        images = normalize_images(images_u8, model.dtype)
        variables = {"params": gather(params)}
        if has_batch_stats:
            variables["batch_stats"] = batch_stats
        if bn_train:
            out, updates = model.apply(variables, images, text, train=True, mutable=["batch_stats"])
            return out, updates["batch_stats"]
        # train=True only matters to a ViT with patch dropout (the noise is given then).
        kwargs = {} if noise is None else {"patch_noise": noise, "train": train_image_tower}
        return model.apply(variables, images, text, **kwargs), batch_stats

    return forward


def make_train_step(
    model: CLIP,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh | None,
    train_image_tower: bool = True,
    *,
    loss: str = "clip",
    accumulation_steps: int = 1,
    param_shardings: Any = None,
    ema_decay: float = 0.0,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds the pure step. Jit it with explicit shardings (see train.py).

    batch: image uint8 [B, H, W, 3] (not normalised), text int32 [B, L]; both batch-sharded.
    A non-finite loss or gradient leaves params, optimizer state and BN statistics unchanged
    and sets metrics["nonfinite"]; the caller decides whether to stop or carry on. The step
    counter still advances and the learning rate follows it (`tx` reads `step=state.step`, see
    optim.create_optimizer): metrics["lr"] is the rate this step applied (or would have), and
    the schedule ends at the last step whatever was skipped.
    `train_image_tower=False` runs the image tower in inference mode (frozen BN statistics),
    for locked-image tuning (LiT). `loss`: "clip" or "siglip"; `accumulation_steps`: exact
    large-batch gradient accumulation (see `make_grad_fn`). `ema_decay` > 0: the state's
    `ema_params` follow the params (`ema_decay_at`; a skipped step averages the unchanged
    params in).
    """
    grad_fn = make_grad_fn(
        model,
        mesh,
        loss=loss,
        accumulation_steps=accumulation_steps,
        train_image_tower=train_image_tower,
        param_shardings=param_shardings,
    )

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if model.patch_dropout and train_image_tower:
            batch = dict(batch, patch_noise=_patch_noise(model, state, batch, mesh))
        loss_value, metrics, grads, new_batch_stats = grad_fn(
            state.params, state.batch_stats, batch
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)

        def update(operands):
            params, opt_state, _, new_batch_stats, grads = operands
            updates, opt_state = tx.update(grads, opt_state, params, step=state.step)
            return optax.apply_updates(params, updates), opt_state, new_batch_stats

        def skip(operands):
            params, opt_state, batch_stats, _, _ = operands
            return params, opt_state, batch_stats

        # A conditional, not `where(finite, new, old)` over every leaf: the select form reads
        # and writes the whole state twice more and kept XLA:CPU from fusing AdamW's update
        # (ViT-B-32's update went from 0.15 s to 0.76 s).
        new_params, new_opt_state, new_batch_stats = jax.lax.cond(
            finite,
            update,
            skip,
            (state.params, state.opt_state, state.batch_stats, new_batch_stats, grads),
        )
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            batch_stats=new_batch_stats,
        )
        if ema_decay > 0:
            new_state = new_state.replace(
                ema_params=update_ema(
                    state.ema_params, new_params, ema_decay_at(ema_decay, state.step)
                )
            )
        metrics = dict(
            metrics,
            grad_norm=grad_norm,
            lr=schedule(state.step),
            nonfinite=jnp.logical_not(finite).astype(jnp.int32),
        )
        return new_state, metrics

    return train_step


def _patch_noise(model: CLIP, state: TrainState, batch: dict, mesh: Mesh | None) -> jax.Array:
    """Patch dropout noise float32 [B, N] for the whole global batch, from the state's RNG and
    step (the same masks whatever the accumulation or mesh), batch-sharded like the images."""
    noise = patch_dropout.step_noise(
        state.rng,
        state.step,
        batch["image"].shape[0],
        patch_dropout.grid_patches(model.config.vision),
    )
    if mesh is None:
        return noise
    return jax.lax.with_sharding_constraint(noise, sharding.batch_sharding(mesh))
