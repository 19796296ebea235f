"""Model-level behaviour: shapes, dtypes, registry, synchronised BatchNorm, causal text mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import models, sharding
from clip_jax.models import CLIPConfig, get_model_config

TINY_RN = dict(
    vision=dict(image_size=32, layers=(1, 1, 1, 1), width=8, heads=2),
    text=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
)
TINY_VIT = dict(
    vision=dict(image_size=32, patch_size=8, width=32, layers=1, heads=2),
    text=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
)


def _batch(n, size=32, length=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    images = jax.random.normal(k1, (n, size, size, 3))
    tokens = jax.random.randint(k2, (n, length), 1, 64)
    return images, tokens.at[:, -2:].set(0)


def test_registry_shapes_match_open_clip_parameter_counts():
    counts = {"ViT-B-32": 151_277_313, "RN50": 102_007_137}
    for name, expected in counts.items():
        model = models.create_model(name)
        shapes = jax.eval_shape(model.init_variables, jax.random.key(0))
        assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == expected
    assert "ViT-L-14-336-quickgelu" in models.list_models()
    assert get_model_config("ViT-B-16-quickgelu").vision.activation == "quick_gelu"
    with pytest.raises(ValueError, match="unknown model"):
        get_model_config("ViT-Q-99")


def test_config_round_trips_through_dict_and_rejects_unknown_keys():
    for name in ("RN50x4", "ViT-L-14", "tiny-rn"):
        config = get_model_config(name)
        assert CLIPConfig.from_dict(config.to_dict()) == config
    bad = get_model_config("tiny-vit").to_dict()
    bad["vision"]["patch_sise"] = 8
    with pytest.raises(ValueError, match="patch_sise"):
        CLIPConfig.from_dict(bad)


def test_create_model_applies_overrides_to_a_name_or_a_config():
    by_name = models.create_model("tiny-vit", embed_dim=64, vision={"layers": 1})
    by_config = models.create_model(
        get_model_config("tiny-vit"), embed_dim=64, vision={"layers": 1}
    )
    assert by_config.config == by_name.config
    assert by_config.config.embed_dim == 64 and by_config.config.vision.layers == 1
    assert by_config.config.text == get_model_config("tiny-vit").text
    with pytest.raises(ValueError, match="patch_sise"):
        models.create_model(get_model_config("tiny-vit"), vision={"patch_sise": 4})


@pytest.mark.parametrize("overrides", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_outputs_are_normalised_and_bfloat16_compute_keeps_float32_params(overrides):
    base = "tiny-vit" if "patch_size" in overrides["vision"] else "tiny-rn"
    config = get_model_config(base, **overrides)
    model32 = models.create_model(config)
    model16 = models.create_model(config, dtype="bfloat16")
    variables = jax.jit(model32.init_variables)(jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    images, tokens = _batch(4)
    out32 = jax.jit(model32.apply)(variables, images, tokens)
    out16 = jax.jit(model16.apply)(variables, images, tokens)
    norms = jnp.linalg.norm(out32["image_embeddings"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    np.testing.assert_allclose(out32["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    assert out16["text_embeddings"].dtype == jnp.float32  # embeddings always leave as float32
    np.testing.assert_allclose(out16["text_embeddings"], out32["text_embeddings"], atol=0.05)
    with pytest.raises(ValueError, match="expected images of shape"):
        model32.apply(variables, images[:, :16], tokens)


def test_text_tower_is_causal_and_pools_at_end_of_text():
    config = get_model_config("tiny-vit", **TINY_VIT)
    model = models.create_model(config)
    # Jitted: run eagerly, each small op compiles on its own (~5x the time of two jit compiles).
    variables = jax.jit(model.init_variables)(jax.random.key(1))
    encode_jit = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))
    encode = lambda t: encode_jit(variables, jnp.asarray(t, jnp.int32))
    padded = encode([[5, 6, 7, 9, 0, 0, 0, 0]])
    # Causal: the padding after the end-of-text token cannot influence it, so the unpadded
    # sequence gives the same features. Without the mask the pad positions would leak in.
    np.testing.assert_allclose(padded, encode([[5, 6, 7, 9]]), atol=1e-5)
    # Pooling follows the last non-pad token.
    assert not np.allclose(padded, encode([[5, 6, 7, 9, 4, 0, 0, 0]]), atol=1e-3)
    # A pad-id token inside the text (OpenAI BPE id 0 is "!") does not move the pooling point.
    inner_zero = encode([[5, 0, 7, 9, 0, 0, 0, 0]])
    np.testing.assert_allclose(inner_zero, encode([[5, 0, 7, 9]]), atol=1e-5)
    from clip_jax.models.text import end_of_text_index

    assert end_of_text_index(jnp.array([[49406, 2781, 0, 263, 49407, 0, 0]])).tolist() == [4]
    # Tokens before the end matter.
    assert not np.allclose(padded, encode([[8, 6, 7, 9, 0, 0, 0, 0]]), atol=1e-3)


def test_resnet_batchnorm_statistics_are_global_under_batch_sharding():
    """Synchronised BN: 8-way batch-sharded training gives the batch_stats of one device."""
    config = get_model_config("tiny-rn", **TINY_RN)
    model = models.create_model(config)
    variables = jax.jit(model.init_variables)(jax.random.key(0))
    images, tokens = _batch(16, seed=3)
    images = images * jnp.arange(1, 17, dtype=jnp.float32)[:, None, None, None]  # rows differ

    def step(variables, images, tokens):
        out, updates = model.apply(variables, images, tokens, train=True, mutable=["batch_stats"])
        return out["image_embeddings"], updates["batch_stats"]

    ref_step = jax.jit(step)
    ref_emb, ref_stats = ref_step(variables, images, tokens)
    mesh = sharding.create_mesh(data=8, devices=jax.devices()[:8])
    shard, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    sharded_step = jax.jit(step, in_shardings=(repl, shard, shard), out_shardings=(shard, repl))
    emb, stats = sharded_step(variables, images, tokens)
    np.testing.assert_allclose(emb, ref_emb, atol=2e-5)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    # A per-shard (unsynchronised) statistic would differ, so the test can fail. Device 0's
    # 2 rows tiled to 16 have exactly their statistics and reuse the compiled reference step.
    local_emb, local_stats = ref_step(variables, jnp.tile(images[:2], (8, 1, 1, 1)), tokens)
    assert not np.allclose(jax.tree.leaves(local_stats)[0], jax.tree.leaves(ref_stats)[0])


@pytest.mark.parametrize("in_channels,out_channels", [(4, 12), (12, 4), (6, 6)])
def test_pointwise_conv_gradients_match_autodiff(in_channels, out_channels):
    """ResNet's 1x1 conv orders its kernel-gradient matmul by width (a CPU speed-up): the
    gradients must be autodiff's, whichever side is wider, also under jit and remat."""
    from clip_jax.models import resnet

    kx, kk, kg = jax.random.split(jax.random.key(in_channels * out_channels), 3)
    x = jax.random.normal(kx, (2, 5, 3, in_channels))
    kernel = jax.random.normal(kk, (in_channels, out_channels))
    cotangent = jax.random.normal(kg, (2, 5, 3, out_channels))

    def loss(fn):
        return lambda x, k: jnp.sum(fn(x, k) * cotangent)

    reference = jax.grad(loss(lambda x, k: jnp.einsum("bhwc,cd->bhwd", x, k)), (0, 1))(x, kernel)
    for fn in (resnet._channel_matmul, jax.checkpoint(resnet._channel_matmul)):
        got = jax.jit(jax.grad(loss(fn), (0, 1)))(x, kernel)
        for g, want in zip(got, reference):
            assert g.shape == want.shape
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
