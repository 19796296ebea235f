"""Optimizer: which parameters decay, scanned == unrolled training, one step counter, config
validation."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from train_runs import get_config

from clip_jax import models, optim, sharding, train
from clip_jax import step as step_lib
from clip_jax.models import transformer


def optim_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            warmup_steps=100,
            end_lr_factor=0.0,
            weight_decay=0.2,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            grad_clip_norm=0.0,
        )
    )
    config.update(overrides)
    return config


def abstract_params(name: str, scan_layers: bool = False) -> dict:
    model = models.CLIP(
        models.get_model_config(name, init_logit_bias=-10.0), scan_layers=scan_layers
    )
    return jax.eval_shape(model.init_variables, jax.random.key(0))["params"]


def decayed_paths(params) -> set[str]:
    mask = optim.weight_decay_mask(params)
    return {
        sharding.path_str(path)
        for path, decayed in jax.tree_util.tree_leaves_with_path(mask)
        if decayed
    }


def _block_kernels(tower: str, layers: int) -> set[str]:
    return {
        f"{tower}/transformer/resblocks_{i}/{m}/kernel"
        for i in range(layers)
        for m in ("attn/in_proj", "attn/out_proj", "mlp/c_fc", "mlp/c_proj")
    }


TEXT_DECAYED = _block_kernels("text", 2) | {"text/text_projection"}


def test_tiny_vit_decays_kernels_and_projections_only():
    expected = TEXT_DECAYED | _block_kernels("image", 2) | {"image/conv1/kernel", "image/proj"}
    assert decayed_paths(abstract_params("tiny-vit")) == expected


def test_tiny_rn_decays_kernels_and_projections_only():
    convs = {f"image/conv{i}/kernel" for i in (1, 2, 3)}
    for stage in range(1, 5):
        convs |= {
            f"image/layer{stage}_0/{c}/kernel"
            for c in ("conv1", "conv2", "conv3", "downsample_conv")
        }
    attnpool = {f"image/attnpool/{p}/kernel" for p in ("q_proj", "k_proj", "v_proj", "c_proj")}
    assert decayed_paths(abstract_params("tiny-rn")) == TEXT_DECAYED | convs | attnpool


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_scanned_mask_is_the_stacked_unrolled_mask(name):
    """Stacked LayerNorm gains and biases are [L, W]: a rank rule would decay them."""
    unrolled = optim.weight_decay_mask(abstract_params(name))
    scanned = optim.weight_decay_mask(abstract_params(name, scan_layers=True))
    # Stacking the unrolled mask gives [L] bool leaves under `resblocks`, all equal per leaf.
    stacked = transformer.stack_layers(jax.tree.map(np.asarray, unrolled))
    assert jax.tree.map(lambda x: bool(np.all(x)) == bool(np.any(x)), stacked) == jax.tree.map(
        lambda _: True, stacked
    )
    assert scanned == jax.tree.map(lambda x: bool(np.all(x)), stacked)


def test_unknown_parameter_name_is_refused():
    with pytest.raises(ValueError, match="image/adapter/gamma"):
        optim.weight_decay_mask({"image": {"adapter": {"gamma": jnp.ones(3)}}})


def _batch(config: models.CLIPConfig, size: int = 8) -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, config.image_size, config.image_size, 3), np.uint8)
    text = rng.integers(1, 1000, (size, config.context_length), np.int32)
    text[:, 10:] = 0  # padding after an end-of-text position
    return {"image": jnp.asarray(image), "text": jnp.asarray(text)}


@pytest.fixture(scope="module")
def small_clip() -> tuple[models.CLIPConfig, dict]:
    """A ~0.1M-parameter ViT CLIP (16 px, width 32, 2 layers per tower) and its weights."""
    config = models.get_model_config(
        "tiny-vit",
        embed_dim=16,
        vision={"width": 32, "image_size": 16},
        text={"width": 32, "vocab_size": 1000, "context_length": 12},
    )
    # Every setup step is jitted: run eagerly, each small op compiles on its own (200 compiles,
    # most of a test's time).
    return config, jax.jit(models.CLIP(config).init_variables)(jax.random.key(0))["params"]


def _state(tx, params) -> step_lib.TrainState:
    return step_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={},
        opt_state=jax.jit(tx.init)(params),
        rng=jnp.zeros(2, jnp.uint32),
    )


def test_scanned_and_unrolled_runs_end_with_the_same_parameters(small_clip):
    """From the same weights, several AdamW steps with weight decay (lr 0.01, wd 0.2) give the
    same parameters whether the Transformer blocks are scanned or unrolled. Under the old rank
    rule every stacked LayerNorm gain of the scanned run drifted (by 0.009 here)."""
    config, weights = small_clip
    batch = _batch(config)
    final = {}
    for scan in (False, True):
        model = models.CLIP(config, scan_layers=scan)
        params = jax.jit(transformer.stack_layers)(weights) if scan else weights
        tx, schedule = optim.create_optimizer(
            optim_config(lr=0.01, warmup_steps=0, weight_decay=0.2), 10, params
        )
        state = _state(tx, params)
        train_step = jax.jit(step_lib.make_train_step(model, tx, schedule, mesh=None))
        for _ in range(5):
            state, _ = train_step(state, batch)
        params = jax.jit(transformer.unstack_layers)(state.params) if scan else state.params
        final[scan] = jax.tree.map(np.asarray, params)
    unrolled, scanned = final[False], final[True]
    ln_scale = unrolled["text"]["transformer"]["resblocks_1"]["ln_2"]["scale"]
    assert np.abs(ln_scale - 1).max() > 1e-3  # the gains did train
    for layer in ("resblocks_0", "resblocks_1"):
        np.testing.assert_allclose(
            scanned["text"]["transformer"][layer]["ln_1"]["scale"],
            unrolled["text"]["transformer"][layer]["ln_1"]["scale"],
            atol=2e-4,
            err_msg=f"text {layer} ln_1 gain",
        )
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(unrolled), jax.tree.leaves(scanned)
    ):
        name = sharding.path_str(path)
        if name.endswith("in_proj/bias"):
            # The key bias [W:2W] has a zero true gradient (softmax ignores a constant shift of
            # the logits): Adam scales its rounding noise, different in the two programs, to
            # steps of ~lr (seen: up to 6e-4 apart). Compare the query and value biases only.
            width = a.shape[-1] // 3
            a, b = np.delete(a, np.s_[width : 2 * width]), np.delete(b, np.s_[width : 2 * width])
        np.testing.assert_allclose(b, a, atol=2e-4, err_msg=name)


def test_optimizer_is_optax_adamw_when_no_step_is_skipped():
    """Same updates as optax.adamw with the schedule (its own count equals the step then)."""
    rng = np.random.default_rng(0)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
        }
    }
    config = optim_config(lr=0.1, warmup_steps=2, weight_decay=0.2)
    tx, schedule = optim.create_optimizer(config, 6, params)
    reference = optax.adamw(
        schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, mask=optim.weight_decay_mask(params)
    )
    ours, theirs = params, params
    ours_state, theirs_state = tx.init(params), reference.init(params)
    for step in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, ours_state = tx.update(grads, ours_state, ours, step=jnp.int32(step))
        ours = optax.apply_updates(ours, updates)
        updates, theirs_state = reference.update(grads, theirs_state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(TypeError, match="step=state.step"):
        tx.update(grads, ours_state, ours)


def test_learning_rate_after_skipped_steps_is_the_logged_one(small_clip):
    """Steps 1 and 2 are skipped (a token id beyond the vocabulary embeds as NaN): step 3
    applies schedule(2), the rate its metrics log, and the schedule keeps its length. With the
    schedule counting optax's updates instead, step 3 applied schedule(0) = 0 while logging
    schedule(2)."""
    config, weights = small_clip
    model = models.CLIP(config)
    tx, schedule = optim.create_optimizer(optim_config(lr=0.01, warmup_steps=4), 8, weights)
    train_step = jax.jit(step_lib.make_train_step(model, tx, schedule, mesh=None))
    good = _batch(config)
    bad = dict(good, text=good["text"].at[0, 0].set(config.text.vocab_size + 5))
    state = _state(tx, weights)
    logged, applied = [], []
    for batch in (bad, bad, good, good):
        before = float(state.params["logit_scale"])
        state, metrics = train_step(state, batch)
        logged.append(float(metrics["lr"]))
        applied.append(abs(float(state.params["logit_scale"]) - before))
    assert int(state.step) == 4
    np.testing.assert_allclose(logged, [schedule(i) for i in range(4)], rtol=1e-6)
    # logit_scale is not decayed: Adam's first update of a scalar is lr * g / (|g| + eps).
    assert applied[:2] == [0.0, 0.0]
    np.testing.assert_allclose(applied[2], logged[2], rtol=1e-3)
    assert applied[3] > 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", -1e-3, "must be a finite number >= 0"),
        ("lr", float("nan"), "must be a finite number >= 0"),
        ("warmup_steps", -1, "must be an integer >= 0"),
        ("warmup_steps", 2.5, "must be an integer >= 0"),
        ("end_lr_factor", 1.5, "must be in [0, 1] (final LR as a fraction of the peak)"),
        ("weight_decay", -1.0, "must be a finite number >= 0"),
        ("b1", 1.0, "must be in [0, 1)"),
        ("b2", 1.5, "must be in [0, 1)"),
        ("eps", 0.0, "must be a finite number > 0"),
        ("grad_clip_norm", -1.0, "must be a finite number >= 0 (0: off)"),
    ],
)
def test_validate_names_the_bad_key_and_value(key, value, message):
    optim.validate(optim_config())  # the defaults pass
    # A namespace, as benchmarks pass: a ConfigDict would already refuse 2.5 for an int key.
    bad = types.SimpleNamespace(**dict(optim_config().to_dict(), **{key: value}))
    with pytest.raises(ValueError) as error:
        optim.validate(bad)
    assert str(error.value) == f"config.optim.{key}={value!r}: {message}"


def test_validate_refuses_a_missing_key():
    config = optim_config()
    del config["eps"]
    with pytest.raises(ValueError, match=r"^config.optim.eps is missing$"):
        optim.validate(config)


def test_training_config_checks_the_optimizer_first():
    for key, value in (("weight_decay", -1.0), ("b2", 1.5), ("grad_clip_norm", -1.0)):
        with pytest.raises(train.ConfigError, match=f"config.optim.{key}={value!r}"):
            train.validate_config(get_config(**{f"optim.{key}": value}))
