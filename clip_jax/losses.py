"""Contrastive losses over the global batch.

`clip_loss` is the symmetric cross-entropy of CLIP. On a mesh, every device holds `b` rows of
the global batch `B`; it all-gathers the other tower's embeddings and scores its local rows
against all `B` columns, so memory per device is O(b x B) and no device ever holds the B x B
logit matrix. The all-gather's transpose is a reduce-scatter, so gradients are exact: they
equal those of the single-device full-batch loss (tests/test_losses.py checks this on 8 devices).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from clip_jax import sharding

MAX_LOGIT_SCALE = 100.0  # CLIP clips the temperature's exp at 100


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-row softmax cross-entropy: [b, B] float32, [b] int -> [b]."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, labels[:, None], axis=-1)[:, 0]


def _local_terms(image: jax.Array, text: jax.Array, all_image: jax.Array, all_text: jax.Array,
                 scale: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum of both directions' CE and correct-prediction counts for the local rows."""
    logits_i2t = scale * (image @ all_text.T)   # [b, B]
    logits_t2i = scale * (text @ all_image.T)   # [b, B]
    loss_sum = _cross_entropy(logits_i2t, labels).sum() + _cross_entropy(logits_t2i, labels).sum()
    correct_i2t = jnp.sum(jnp.argmax(logits_i2t, axis=-1) == labels)
    correct_t2i = jnp.sum(jnp.argmax(logits_t2i, axis=-1) == labels)
    return loss_sum, correct_i2t, correct_t2i


def _metrics(loss_sum, correct_i2t, correct_t2i, global_batch: int, scale) -> tuple:
    loss = loss_sum / (2 * global_batch)
    return loss, {
        "loss": loss,
        "i2t_accuracy": correct_i2t / global_batch,
        "t2i_accuracy": correct_t2i / global_batch,
        "logit_scale": scale,
    }


def clip_loss_dense(image_embeddings: jax.Array, text_embeddings: jax.Array,
                    logit_scale: jax.Array,
                    max_logit_scale: float = MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """Reference single-device loss over the whole batch.

    Args:
      image_embeddings, text_embeddings: [B, D] float, L2-normalised; row i of each is a pair.
      logit_scale: scalar log-temperature; logits are min(exp(logit_scale), max) * cosine.
    Returns:
      (loss, metrics) where metrics holds loss, i2t/t2i in-batch top-1 accuracy, logit_scale.
    """
    scale = jnp.minimum(jnp.exp(logit_scale), max_logit_scale)
    image = image_embeddings.astype(jnp.float32)
    text = text_embeddings.astype(jnp.float32)
    labels = jnp.arange(image.shape[0])
    terms = _local_terms(image, text, image, text, scale, labels)
    return _metrics(*terms, image.shape[0], scale)


def _clip_loss_per_device(image, text, logit_scale, *, axis_names, max_logit_scale):
    """Runs inside shard_map: image/text are this device's [b, D] rows."""
    scale = jnp.minimum(jnp.exp(logit_scale), max_logit_scale)
    image = image.astype(jnp.float32)
    text = text.astype(jnp.float32)
    all_image = jax.lax.all_gather(image, axis_names, tiled=True)  # [B, D]
    all_text = jax.lax.all_gather(text, axis_names, tiled=True)
    local = image.shape[0]
    # Row r of this device is global row (device index * b + r): the positive pair's column.
    labels = jax.lax.axis_index(axis_names) * local + jnp.arange(local)
    loss_sum, correct_i2t, correct_t2i = jax.lax.psum(
        _local_terms(image, text, all_image, all_text, scale, labels), axis_names)
    return _metrics(loss_sum, correct_i2t, correct_t2i, all_image.shape[0], scale)


def clip_loss(image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array,
              *, mesh: Mesh | None = None,
              max_logit_scale: float = MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """Symmetric CLIP cross-entropy over the global batch.

    Args:
      image_embeddings, text_embeddings: [B, D] L2-normalised global arrays, batch-sharded over
        the mesh's data axes (any sharding works; shard_map reshards if needed).
      logit_scale: scalar log-temperature (replicated).
      mesh: the device mesh; None (or a 1-device mesh) computes the dense reference.
    Returns:
      (loss, metrics): loss is the mean over the 2B rows of both directions; metrics add the
      in-batch image->text / text->image top-1 accuracy and the clipped scale.
    """
    if mesh is None or mesh.size == 1:
        return clip_loss_dense(image_embeddings, text_embeddings, logit_scale, max_logit_scale)
    axes = sharding.batch_axes(mesh)
    shards = sharding.num_batch_shards(mesh)
    if image_embeddings.shape[0] % shards:
        raise ValueError(f"global batch {image_embeddings.shape[0]} is not divisible by the "
                         f"{shards} batch shards of the mesh {dict(mesh.shape)}")
    per_device = functools.partial(_clip_loss_per_device, axis_names=axes,
                                   max_logit_scale=max_logit_scale)
    metric_specs = {k: P() for k in ("loss", "i2t_accuracy", "t2i_accuracy", "logit_scale")}
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(axes), P(axes), P()),
                       out_specs=(P(), metric_specs))
    return fn(image_embeddings, text_embeddings, logit_scale)
