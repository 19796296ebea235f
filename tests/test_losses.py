"""The global-batch contrastive loss equals the dense single-device loss, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import losses, sharding


def _embeddings(batch=32, dim=16, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (batch, dim))
    txt = img + 0.5 * jax.random.normal(k2, (batch, dim))  # correlated so accuracy is non-trivial
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return norm(img), norm(txt)


def _reference_numpy(img, txt, logit_scale):
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = min(np.exp(logit_scale), 100.0) * img @ txt.T

    def ce(lg):
        lg = lg - lg.max(axis=1, keepdims=True)
        return -(np.diag(lg) - np.log(np.exp(lg).sum(axis=1)))

    return (ce(logits).mean() + ce(logits.T).mean()) / 2


def test_dense_loss_matches_numpy_and_paper_init():
    img, txt = _embeddings()
    scale = jnp.log(1 / 0.07)
    loss, metrics = losses.clip_loss_dense(img, txt, scale)
    np.testing.assert_allclose(loss, _reference_numpy(img, txt, float(scale)), rtol=1e-5)
    assert 0.0 < float(metrics["i2t_accuracy"]) <= 1.0
    np.testing.assert_allclose(metrics["logit_scale"], 1 / 0.07, rtol=1e-6)


def test_logit_scale_is_clipped_at_100():
    img, txt = _embeddings()
    _, metrics = losses.clip_loss_dense(img, txt, jnp.float32(10.0))
    assert float(metrics["logit_scale"]) == 100.0
    grad = jax.grad(lambda s: losses.clip_loss_dense(img, txt, s)[0])(jnp.float32(10.0))
    assert float(grad) == 0.0  # clipped: no gradient pushes the temperature further


def _loss_and_grads(fn, img, txt, scale):
    return jax.value_and_grad(lambda i, t, s: fn(i, t, s)[0], argnums=(0, 1, 2))(img, txt, scale)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4), (1, 8)])
def test_sharded_loss_and_gradients_equal_single_device(data, fsdp):
    assert jax.device_count() >= 8
    img, txt = _embeddings(batch=32)
    scale = jnp.float32(np.log(1 / 0.07))
    ref_loss, ref_grads = jax.jit(lambda i, t, s: _loss_and_grads(losses.clip_loss_dense, i, t, s))(
        img, txt, scale
    )
    _, ref_metrics = losses.clip_loss_dense(img, txt, scale)

    mesh = sharding.create_mesh(data=data, fsdp=fsdp, devices=jax.devices()[:8])
    shard = sharding.batch_sharding(mesh)
    img_s, txt_s = jax.device_put(img, shard), jax.device_put(txt, shard)
    fn = lambda i, t, s: losses.clip_loss(i, t, s, mesh=mesh)
    loss, grads = jax.jit(lambda i, t, s: _loss_and_grads(fn, i, t, s))(img_s, txt_s, scale)
    _, metrics = jax.jit(fn)(img_s, txt_s, scale)

    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=1e-5)
    for key in ("i2t_accuracy", "t2i_accuracy"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], atol=1e-6)
    # Gradients w.r.t. the embeddings stay batch-sharded (reduce-scatter, no full copy).
    assert grads[0].sharding.is_equivalent_to(shard, 2)


def test_per_device_logits_are_local_by_global():
    """Memory per device is O(b x B): the compiled program never holds a B x B logit matrix."""
    img, txt = _embeddings(batch=64)
    mesh = sharding.create_mesh(data=8, devices=jax.devices()[:8])
    shard = sharding.batch_sharding(mesh)
    fn = jax.jit(lambda i, t: losses.clip_loss(i, t, jnp.float32(2.0), mesh=mesh)[0])
    hlo = fn.lower(jax.device_put(img, shard), jax.device_put(txt, shard)).compile().as_text()
    assert "f32[8,64]" in hlo
    assert "f32[64,64]" not in hlo


def test_indivisible_batch_is_a_clear_error():
    img, txt = _embeddings(batch=12)
    mesh = sharding.create_mesh(data=8, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match="not divisible"):
        losses.clip_loss(img, txt, jnp.float32(2.0), mesh=mesh)


def _siglip_reference_numpy(img, txt, logit_scale, logit_bias):
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = np.exp(logit_scale) * img @ txt.T + logit_bias
    labels = 2 * np.eye(len(img)) - 1
    return np.sum(np.log1p(np.exp(-labels * logits))) / len(img)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_siglip_ring_equals_dense_loss_and_gradients(data, fsdp):
    """The ppermute ring over 8 devices gives the dense sigmoid loss and its gradients
    (embeddings, temperature, bias) to 1e-5."""
    img, txt = _embeddings(batch=32)
    scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-10.0)
    args = (img, txt, scale, bias)
    grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0], argnums=(0, 1, 2, 3)))
    ref_loss, ref_grads = grad(losses.siglip_loss_dense)(*args)
    np.testing.assert_allclose(ref_loss, _siglip_reference_numpy(*args), rtol=1e-5)

    mesh = sharding.create_mesh(data=data, fsdp=fsdp, devices=jax.devices()[:8])
    shard = sharding.batch_sharding(mesh)
    ring = lambda i, t, s, b: losses.siglip_loss(i, t, s, b, mesh=mesh)
    loss, grads = grad(ring)(jax.device_put(img, shard), jax.device_put(txt, shard), scale, bias)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(grads[3])) > 0  # the bias is learned

    # Per device only [b, b] blocks: no [B, b] or [B, B] logits anywhere in the program.
    hlo = (
        jax.jit(lambda i, t: ring(i, t, scale, bias)[0])
        .lower(jax.device_put(img, shard), jax.device_put(txt, shard))
        .compile()
        .as_text()
    )
    assert "f32[4,4]" in hlo
    assert "f32[32,32]" not in hlo and "f32[4,32]" not in hlo


def test_contrastive_loss_dispatch_and_errors():
    img, txt = _embeddings(batch=8)
    out = {"image_embeddings": img, "text_embeddings": txt, "logit_scale": jnp.float32(2.0)}
    np.testing.assert_allclose(
        losses.contrastive_loss("clip", out, None)[0],
        losses.clip_loss_dense(img, txt, jnp.float32(2.0))[0],
    )
    with pytest.raises(ValueError, match="logit_bias"):
        losses.contrastive_loss("siglip", out, None)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.contrastive_loss("triplet", out, None)
