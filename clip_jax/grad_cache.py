"""Exact large-batch gradients of the contrastive loss in bounded memory (GradCache).

`make_grad_fn(forward, mesh, loss=..., accumulation_steps=K)` computes the *same* gradients as
one pass over the whole batch B (the contrastive loss still sees all B x B pairs) with the
activations of only B / K rows alive at a time (GradCache, Gao et al. 2021):
  1. embed every micro-batch with no gradient tape (a `lax.scan` of forward passes);
  2. the loss over the full [B, D] embeddings and its gradient w.r.t. the embeddings (and the
     temperature/bias parameters), with the usual sharded loss;
  3. for each micro-batch again: forward under `jax.vjp`, pull back its [B/K, D] slice of the
     embedding gradient, add the parameter gradients to a running sum (a `lax.scan`).
The forward runs twice (about 1.33x the FLOPs of a plain step).

BatchNorm (ResNet towers) normalises with each micro-batch's statistics, in both passes alike
(so the gradients are those of that micro-batch-BN model; equal to the plain step only for
models without BatchNorm); running statistics are updated once per micro-batch during pass 1.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import losses, sharding

# forward(params, batch_stats, images uint8 [b, H, W, 3], text int32 [b, L],
#         patch dropout noise float32 [b, N] or None)
#   -> (model outputs {image_embeddings [b, D], text_embeddings [b, D], logit_scale, ...},
#       new batch_stats)
Forward = Callable[[Any, Any, jax.Array, jax.Array, Any], tuple[dict, Any]]
# grad_fn(params, batch_stats, batch) -> (loss, metrics, grads, new batch_stats)
GradFn = Callable[[Any, Any, dict], tuple[jax.Array, dict, Any, Any]]


def split_micro_batches(x: jax.Array, steps: int, mesh: Mesh | None) -> jax.Array:
    """[B, ...] -> [K, B/K, ...], K = `steps`. Micro-batch m takes rows [m*c, (m+1)*c) of
    every batch shard's local rows (c = B / (K * n) for n batch shards), so splitting (and
    `merge_micro_batches`) never moves data between devices."""
    num_shards = sharding.num_batch_shards(mesh) if mesh is not None else 1
    global_batch = x.shape[0]
    if global_batch % (steps * num_shards):
        raise ValueError(
            f"batch {global_batch} is not divisible by accumulation_steps "
            f"{steps} x {num_shards} batch shards"
        )
    c = global_batch // (steps * num_shards)
    x = x.reshape(num_shards, steps, c, *x.shape[1:]).swapaxes(0, 1)
    x = x.reshape(steps, num_shards * c, *x.shape[3:])
    return _constrain(x, mesh, lambda axes: P(None, axes))


def merge_micro_batches(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inverse of `split_micro_batches`: [K, B/K, ...] -> [B, ...] in the original row order."""
    num_shards = sharding.num_batch_shards(mesh) if mesh is not None else 1
    steps, c = x.shape[0], x.shape[1] // num_shards
    x = x.reshape(steps, num_shards, c, *x.shape[2:]).swapaxes(0, 1)
    x = x.reshape(steps * num_shards * c, *x.shape[3:])
    return _constrain(x, mesh, lambda axes: P(axes))


def _constrain(x: jax.Array, mesh: Mesh | None, spec: Callable[[Any], P]) -> jax.Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(sharding.batch_axes(mesh))))


def make_grad_fn(
    forward: Forward,
    mesh: Mesh | None,
    *,
    loss: str,
    accumulation_steps: int,
    param_shardings: Any = None,
) -> GradFn:
    """`grad_fn(params, batch_stats, batch) -> (loss, metrics, grads, new_batch_stats)` over
    `accumulation_steps` micro-batches (see the module docstring).

    batch: image uint8 [B, H, W, 3], text int32 [B, L], batch-sharded over the mesh.
    `param_shardings` (optional) pins the gradient accumulator's sharding to the parameters'
    (FSDP: each device accumulates only its shard).
    """
    steps = accumulation_steps

    def embed(params, batch_stats, images_u8, text, noise):
        out, new_batch_stats = forward(params, batch_stats, images_u8, text, noise)
        return (out["image_embeddings"], out["text_embeddings"]), new_batch_stats

    def pin(tree):
        if param_shardings is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, param_shardings)

    def grad_fn(params, batch_stats, batch):
        images = split_micro_batches(batch["image"], steps, mesh)
        texts = split_micro_batches(batch["text"], steps, mesh)
        # Patch dropout: the full batch's noise, split like the images, so every sample gets
        # the mask it would get in a plain step (None: no patch dropout).
        noise = batch.get("patch_noise")
        noises = None if noise is None else split_micro_batches(noise, steps, mesh)

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
        )(merge_micro_batches(image_emb, mesh), merge_micro_batches(text_emb, mesh), scalars)

        # Pass 2: recompute each micro-batch under vjp and back-propagate its gradient slice.
        def backward_step(acc, xs):
            images_m, text_m, noise_m, g_image_m, g_text_m = xs
            _, pullback = jax.vjp(
                lambda p: embed(p, batch_stats, images_m, text_m, noise_m)[0], params
            )
            (grads_m,) = pullback((g_image_m, g_text_m))
            return pin(jax.tree.map(jnp.add, acc, grads_m)), None

        zeros = pin(jax.tree.map(jnp.zeros_like, params))
        g_images = split_micro_batches(g_image, steps, mesh)
        g_texts = split_micro_batches(g_text, steps, mesh)
        grads, _ = jax.lax.scan(backward_step, zeros, (images, texts, noises, g_images, g_texts))
        grads = dict(grads)
        for k, g in g_scalars.items():
            grads[k] = grads[k] + g.astype(grads[k].dtype)
        return value, metrics, grads, new_batch_stats

    return grad_fn
