"""Train state and the pure training step `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import losses, sharding
from clip_jax.data.transforms import normalize_images
from clip_jax.models import CLIP, patch_dropout


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
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(state_key),
    )


GradFn = Callable[[Any, Any, dict], tuple[jax.Array, dict, Any, Any]]


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
    `accumulation_steps` K > 1 computes the *same* gradients as K = 1 (the contrastive loss
    still sees all B x B pairs) with the activations of only B / K rows alive at a time
    (GradCache, Gao et al. 2021):
      1. embed every micro-batch with no gradient tape (a `lax.scan` of forward passes);
      2. the loss over the full [B, D] embeddings and its gradient w.r.t. the embeddings (and
         the temperature/bias parameters), with the usual sharded loss;
      3. for each micro-batch again: forward under `jax.vjp`, pull back its [B/K, D] slice of
         the embedding gradient, add the parameter gradients to a running sum (a `lax.scan`).
    The forward runs twice (about 1.33x the FLOPs of a plain step).
    BatchNorm (ResNet towers) normalises with each micro-batch's statistics, in both passes
    alike (so the gradients are those of that micro-batch-BN model; equal to the plain step
    only for models without BatchNorm); running statistics are updated once per micro-batch
    during pass 1.
    Micro-batch m takes rows [m*c, (m+1)*c) of every device's local rows (c = B / (K * n)
    for n batch shards), so splitting and merging never move data between devices.
    `param_shardings` (optional) pins the gradient accumulator's sharding to the parameters'
    (FSDP: each device accumulates only its shard).
    """
    has_batch_stats = model.config.vision.type == "resnet"
    bn_train = has_batch_stats and train_image_tower
    num_shards = sharding.num_batch_shards(mesh) if mesh is not None else 1
    axes = sharding.batch_axes(mesh) if mesh is not None else ()

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
        """Model outputs and updated batch stats for one (micro-)batch. `noise`: patch dropout
        noise [B, N] for these rows (None: no patch dropout)."""
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

    def plain(params, batch_stats, batch):
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

    if accumulation_steps == 1:
        return plain
    steps = accumulation_steps

    def constrain(x, spec):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def split(x):
        """[B, ...] -> [K, B/K, ...]: micro-batch m = rows [m*c, (m+1)*c) of each shard."""
        global_batch = x.shape[0]
        if global_batch % (steps * num_shards):
            raise ValueError(
                f"batch {global_batch} is not divisible by accumulation_steps "
                f"{steps} x {num_shards} batch shards"
            )
        c = global_batch // (steps * num_shards)
        x = x.reshape(num_shards, steps, c, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x.reshape(steps, num_shards * c, *x.shape[3:]), P(None, axes))

    def merge(x):
        """Inverse of `split`: [K, B/K, ...] -> [B, ...] in the original row order."""
        c = x.shape[1] // num_shards
        x = x.reshape(steps, num_shards, c, *x.shape[2:]).swapaxes(0, 1)
        return constrain(x.reshape(steps * num_shards * c, *x.shape[3:]), P(axes))

    def embed(params, batch_stats, images_u8, text, noise):
        out, new_batch_stats = forward(params, batch_stats, images_u8, text, noise)
        return (out["image_embeddings"], out["text_embeddings"]), new_batch_stats

    def accumulated(params, batch_stats, batch):
        images, texts = split(batch["image"]), split(batch["text"])
        # Patch dropout: the full batch's noise, split like the images, so every sample gets
        # the mask it would get in a plain step (None: no patch dropout).
        noises = split(batch["patch_noise"]) if "patch_noise" in batch else None

        # Pass 1: embeddings of all micro-batches, no activations kept for a backward pass.
        frozen = jax.lax.stop_gradient(params)

        def embed_step(stats, xs):
            embeddings, stats = embed(frozen, stats, *xs)
            return stats, embeddings

        new_batch_stats, (image_emb, text_emb) = jax.lax.scan(
            embed_step, batch_stats, (images, texts, noises)
        )

        # Full-batch loss; gradient w.r.t. the embeddings and the loss's own parameters.
        scalars = {k: params[k] for k in ("logit_scale", "logit_bias") if k in params}

        def loss_of_embeddings(image_all, text_all, scalars):
            out = {
                "image_embeddings": image_all,
                "text_embeddings": text_all,
                **{k: v.astype(jnp.float32) for k, v in scalars.items()},
            }
            return losses.contrastive_loss(loss, out, mesh)

        (value, metrics), (g_image, g_text, g_scalars) = jax.value_and_grad(
            loss_of_embeddings, argnums=(0, 1, 2), has_aux=True
        )(merge(image_emb), merge(text_emb), scalars)

        # Pass 2: recompute each micro-batch under vjp and back-propagate its gradient slice.
        def pin(tree):
            if param_shardings is None:
                return tree
            return jax.tree.map(jax.lax.with_sharding_constraint, tree, param_shardings)

        def backward_step(acc, xs):
            images_m, text_m, noise_m, g_image_m, g_text_m = xs
            _, pullback = jax.vjp(
                lambda p: embed(p, batch_stats, images_m, text_m, noise_m)[0], params
            )
            (grads_m,) = pullback((g_image_m, g_text_m))
            return pin(jax.tree.map(jnp.add, acc, grads_m)), None

        zeros = pin(jax.tree.map(jnp.zeros_like, params))
        grads, _ = jax.lax.scan(
            backward_step, zeros, (images, texts, noises, split(g_image), split(g_text))
        )
        grads = dict(grads)
        for k, g in g_scalars.items():
            grads[k] = grads[k] + g.astype(grads[k].dtype)
        return value, metrics, grads, new_batch_stats

    return accumulated


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
    large-batch gradient accumulation (see `make_grad_fn`).
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
