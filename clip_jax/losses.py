"""Contrastive losses over the global batch.

`clip_loss` is the symmetric cross-entropy of CLIP. On a mesh, every device holds `b` rows of
the global batch `B`; it all-gathers the other tower's embeddings and scores its local rows
against all `B` columns, so memory per device is O(b x B) and no device ever holds the B x B
logit matrix. The all-gather's backward sums every device's gradient for each row and hands
each device its own rows (a reduce-scatter, done as psum + slice, see `_all_gather`), so
gradients are exact: they equal those of the single-device full-batch loss
(tests/test_losses.py checks this on 8 devices).

`siglip_loss` is the pairwise sigmoid loss of SigLIP (Zhai et al. 2023). It needs no softmax
normaliser over the batch, so no device ever needs all embeddings at once: the text blocks
travel around a ring of devices (`jax.lax.ppermute`), each device scoring its local images
against the block it currently holds, so memory per device is O(b x b) plus two [b, D] blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clip_jax import sharding

MAX_LOGIT_SCALE = 100.0  # CLIP clips the temperature's exp at 100


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-row softmax cross-entropy: [b, B] float32, [b] int -> [b]."""
    return (
        jax.nn.logsumexp(logits, axis=-1)
        - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    )


def _local_terms(
    image: jax.Array,
    text: jax.Array,
    all_image: jax.Array,
    all_text: jax.Array,
    scale: jax.Array,
    labels: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum of both directions' CE and correct-prediction counts for the local rows."""
    logits_i2t = scale * (image @ all_text.T)  # [b, B]
    logits_t2i = scale * (text @ all_image.T)  # [b, B]
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


def clip_loss_dense(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> tuple[jax.Array, dict]:
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _all_gather(x: jax.Array, axis_names: tuple[str, ...]) -> jax.Array:
    """Tiled all_gather [b, D] -> [B, D] whose backward is psum + own slice instead of XLA's
    reduce-scatter. Same values and gradients; the embedding gradients are tiny (B x D), so the
    extra traffic does not matter. Why: on CPU, multi-process (gloo) runs, every all-reduce that
    follows a reduce-scatter in later programs took ~3 s (jax 0.10, measured here), making
    multi-process CPU training ~100x slower."""
    return jax.lax.all_gather(x, axis_names, tiled=True)


def _all_gather_fwd(x, axis_names):
    return _all_gather(x, axis_names), None


def _all_gather_bwd(axis_names, _, g):
    local = g.shape[0] // jax.lax.psum(1, axis_names)
    total = jax.lax.psum(g, axis_names)
    start = jax.lax.axis_index(axis_names) * local
    return (jax.lax.dynamic_slice_in_dim(total, start, local, axis=0),)


_all_gather.defvjp(_all_gather_fwd, _all_gather_bwd)


def _clip_loss_per_device(image, text, logit_scale, *, axis_names, max_logit_scale):
    """Runs inside shard_map: image/text are this device's [b, D] rows."""
    scale = jnp.minimum(jnp.exp(logit_scale), max_logit_scale)
    image = image.astype(jnp.float32)
    text = text.astype(jnp.float32)
    all_image = _all_gather(image, axis_names)  # [B, D]
    all_text = _all_gather(text, axis_names)
    local = image.shape[0]
    # Row r of this device is global row (device index * b + r): the positive pair's column.
    labels = jax.lax.axis_index(axis_names) * local + jnp.arange(local)
    loss_sum, correct_i2t, correct_t2i = jax.lax.psum(
        _local_terms(image, text, all_image, all_text, scale, labels), axis_names
    )
    return _metrics(loss_sum, correct_i2t, correct_t2i, all_image.shape[0], scale)


def _batch_axes(mesh: Mesh, global_batch: int) -> tuple[tuple[str, ...], int]:
    """The mesh's batch axes and their total size, which must divide the global batch."""
    shards = sharding.num_batch_shards(mesh)
    if global_batch % shards:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the {shards} batch "
            f"shards of the mesh {dict(mesh.shape)}"
        )
    return sharding.batch_axes(mesh), shards


def clip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    *,
    mesh: Mesh | None = None,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> tuple[jax.Array, dict]:
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
    axes, shards = _batch_axes(mesh, image_embeddings.shape[0])
    per_device = functools.partial(
        _clip_loss_per_device, axis_names=axes, max_logit_scale=max_logit_scale
    )
    metric_specs = {k: P() for k in ("loss", "i2t_accuracy", "t2i_accuracy", "logit_scale")}
    fn = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=(P(), metric_specs)
    )
    return fn(image_embeddings, text_embeddings, logit_scale)


LOSSES = ("clip", "siglip")
SIGLIP_INIT_LOGIT_SCALE = 2.302585092994046  # log(10), SigLIP's temperature init
SIGLIP_INIT_LOGIT_BIAS = -10.0


def _siglip_block(
    image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array, positive: jax.Array | bool
) -> jax.Array:
    """Sum of -log sigmoid(z * logit) over one [b_i, b_t] block; z = +1 on the diagonal when
    `positive` (the block holds the local rows' own texts), else -1 everywhere."""
    logits = scale * (image @ text.T) + bias
    eye = jnp.eye(image.shape[0], text.shape[0], dtype=logits.dtype)
    labels = jnp.where(positive, 2.0 * eye - 1.0, -jnp.ones_like(logits))
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def siglip_loss_dense(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
) -> tuple[jax.Array, dict]:
    """Reference single-device sigmoid loss.

    Args:
      image_embeddings, text_embeddings: [B, D] float, L2-normalised; row i of each is a pair.
      logit_scale: scalar log-temperature (logits = exp(logit_scale) * cosine + logit_bias; not
        clipped, as in SigLIP). logit_bias: scalar.
    Returns:
      (loss, metrics): loss = sum over all B x B pairs of -log sigmoid(+-logit), divided by B
      (SigLIP's normalisation); metrics hold loss, logit_scale (exp'd) and logit_bias.
    """
    scale = jnp.exp(logit_scale)
    image = image_embeddings.astype(jnp.float32)
    text = text_embeddings.astype(jnp.float32)
    loss = _siglip_block(image, text, scale, logit_bias, True) / image.shape[0]
    return loss, {"loss": loss, "logit_scale": scale, "logit_bias": logit_bias}


def _siglip_loss_per_device(image, text, logit_scale, logit_bias, *, axis_names, num_devices):
    """Runs inside shard_map: image/text are this device's [b, D] rows.

    Step k: this device holds the text block of device (i - k) mod n; it scores its images
    against it, then passes the block to device i + 1. After n - 1 hops every image has met
    every text; the gradient of a ppermute is the reverse ppermute, so autodiff is exact.
    """
    scale = jnp.exp(logit_scale)
    image = image.astype(jnp.float32)
    text = text.astype(jnp.float32)
    ring = [(i, (i + 1) % num_devices) for i in range(num_devices)]
    total = _siglip_block(image, text, scale, logit_bias, True)

    def hop(carry, _):
        block, acc = carry
        block = jax.lax.ppermute(block, axis_names, ring)
        return (block, acc + _siglip_block(image, block, scale, logit_bias, False)), None

    if num_devices > 1:
        (_, total), _ = jax.lax.scan(hop, (text, total), None, length=num_devices - 1)
    global_batch = image.shape[0] * num_devices
    loss = jax.lax.psum(total, axis_names) / global_batch
    return loss, {"loss": loss, "logit_scale": scale, "logit_bias": logit_bias}


def siglip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, dict]:
    """SigLIP sigmoid loss over the global batch, never materialising the B x B logits.

    Args:
      image_embeddings, text_embeddings: [B, D] L2-normalised global arrays, batch-sharded
        over the mesh's data axes.
      logit_scale, logit_bias: scalars (replicated).
      mesh: the device mesh; None (or a 1-device mesh) computes the dense reference.
    Returns:
      (loss, metrics) as `siglip_loss_dense`.
    """
    if mesh is None or mesh.size == 1:
        return siglip_loss_dense(image_embeddings, text_embeddings, logit_scale, logit_bias)
    axes, shards = _batch_axes(mesh, image_embeddings.shape[0])
    per_device = functools.partial(_siglip_loss_per_device, axis_names=axes, num_devices=shards)
    metric_specs = {k: P() for k in ("loss", "logit_scale", "logit_bias")}
    fn = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=(P(), metric_specs)
    )
    return fn(image_embeddings, text_embeddings, logit_scale, logit_bias)


def contrastive_loss(name: str, out: dict, mesh: Mesh | None) -> tuple[jax.Array, dict]:
    """The configured loss (`config.loss`) of a model output dict (image_embeddings,
    text_embeddings, logit_scale and, for siglip, logit_bias)."""
    if name == "clip":
        return clip_loss(
            out["image_embeddings"], out["text_embeddings"], out["logit_scale"], mesh=mesh
        )
    if name == "siglip":
        if "logit_bias" not in out:
            raise ValueError(
                "loss 'siglip' needs a model with a logit_bias parameter "
                "(CLIPConfig.init_logit_bias)"
            )
        return siglip_loss(
            out["image_embeddings"],
            out["text_embeddings"],
            out["logit_scale"],
            out["logit_bias"],
            mesh=mesh,
        )
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
