"""FLIP patch dropout: masking statistics, the tower sees only kept patches, evaluation is
unaffected, and GradCache / remat / scan / FSDP give the same gradients with the same masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_runs import (
    SMALL_MODEL,
    cli_error,
    max_abs_diff,
    run_train_cli,
    small_config,
    synthetic_batch,
)

from clip_jax import checkpoint, model_store, models, sharding, step, train
from clip_jax.models import patch_dropout
from clip_jax.models.transformer import stack_layers, unstack_layers


def _model(rate=0.5, **kwargs):
    return models.CLIP(
        models.get_model_config("tiny-vit", **SMALL_MODEL), patch_dropout=rate, **kwargs
    )


def test_kept_counts_follow_open_clip():
    assert patch_dropout.num_kept(196, 0.5) == 98
    assert patch_dropout.num_kept(196, 0.75) == 49
    assert patch_dropout.num_kept(196, 0.0) == 196
    assert patch_dropout.num_kept(4, 0.99) == 1  # at least one patch
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="patch_dropout"):
            patch_dropout.check_rate(bad)


def test_masking_statistics():
    """Each sample keeps exactly K distinct patches behind its class token, in raster order;
    over many samples every patch is kept with probability 1 - rate and masks differ."""
    batch, patches, rate = 4000, 16, 0.75
    keep = patch_dropout.num_kept(patches, rate)
    # Token t carries the value t (class token 0, patch i the value i + 1) in every channel.
    x = jnp.broadcast_to(jnp.arange(patches + 1, dtype=jnp.float32)[None, :, None], (batch, 17, 2))
    noise = patch_dropout.sample_noise(jax.random.key(0), batch, patches)
    kept = np.asarray(patch_dropout.keep_patches(x, noise, rate))[..., 0].astype(int)
    assert kept.shape == (batch, 1 + keep)
    assert (kept[:, 0] == 0).all()  # class token always first
    patch_ids = kept[:, 1:] - 1
    assert (np.diff(patch_ids, axis=1) > 0).all()  # distinct, raster order
    # The kept patches are the K lowest-noise ones.
    lowest = np.sort(np.argsort(np.asarray(noise), axis=1)[:, :keep], axis=1)
    np.testing.assert_array_equal(patch_ids, lowest)
    # Uniform: each patch kept in 25% of samples; binomial std sqrt(4000*.25*.75) = 27 -> 5 std.
    counts = np.bincount(patch_ids.ravel(), minlength=patches)
    assert np.abs(counts - batch * (1 - rate)).max() < 5 * 27, counts
    # Independent per sample: 4000 uniform draws among the C(16, 4) = 1820 masks give
    # 1820 * (1 - (1 - 1/1820)^4000) = 1619 distinct ones on average (std ~ 13).
    distinct = len({tuple(r) for r in patch_ids})
    assert abs(distinct - 1820 * (1 - (1 - 1 / 1820) ** 4000)) < 60, distinct
    with pytest.raises(ValueError, match="noise has shape"):
        patch_dropout.keep_patches(x, noise[:, :5], rate)


def test_tower_sees_only_kept_patches_and_eval_is_unaffected():
    dropped, plain = _model(0.75), _model(0.0)
    params = jax.jit(plain.init_variables)(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    # Train mode: only the 16 kept of 64 patches matter. Patch (r, c) covers pixels
    # [8r, 8r+8) x [8c, 8c+8); rows 2 and 3 are image 0 with its noisiest (dropped) and its
    # least noisy (kept) patch changed, under image 0's noise.
    noise = patch_dropout.sample_noise(jax.random.key(2), 2, 64)
    order = np.argsort(np.asarray(noise[0]))
    edited = []
    for patch in (int(order[-1]), int(order[0])):
        r, c = divmod(patch, 8)
        edited.append(images[0].at[8 * r : 8 * r + 8, 8 * c : 8 * c + 8].add(1.0))
    batch = jnp.concatenate([images, jnp.stack(edited)])
    noise = jnp.concatenate([noise, noise[:1], noise[:1]])

    @jax.jit
    def outputs(params):
        encode = lambda model, **kw: model.apply(params, images, method="encode_image", **kw)
        return {
            "eval_plain": encode(plain),
            "eval_dropped": encode(dropped),  # train=False: patch dropout changes nothing
            "train": dropped.apply(
                params, batch, train=True, patch_noise=noise, method="encode_image"
            ),
            # Without explicit noise, train mode draws it from the "dropout" stream.
            "rng3": encode(dropped, train=True, rngs={"dropout": jax.random.key(3)}),
            "rng4": encode(dropped, train=True, rngs={"dropout": jax.random.key(4)}),
        }

    out = jax.tree.map(np.asarray, outputs(params))
    np.testing.assert_array_equal(out["eval_dropped"], out["eval_plain"])
    assert np.abs(out["train"][:2] - out["eval_plain"]).max() > 1e-3
    train_out = out["train"]
    dropped_diff = np.abs(train_out[2] - train_out[0]).max()
    kept_diff = np.abs(train_out[3] - train_out[0]).max()
    assert dropped_diff < 1e-6 < 1e-4 < kept_diff, (dropped_diff, kept_diff)
    assert np.abs(out["rng3"] - out["rng4"]).max() > 1e-4
    with pytest.raises(ValueError, match="needs a ViT"):
        rn = models.CLIP(models.get_model_config("tiny-rn"), patch_dropout=0.5)
        jax.eval_shape(rn.init_variables, jax.random.key(0))


def test_accumulation_remat_scan_and_fsdp_see_the_same_masks():
    """With the same per-sample noise, GradCache over 2 micro-batches on a 2x4 FSDP mesh with
    remat and scanned layers gives the one-device full-batch loss and gradients (1e-5)."""
    model = _model(0.5)
    params = jax.jit(model.init_variables)(jax.random.key(0))["params"]
    noise = patch_dropout.sample_noise(jax.random.key(5), 16, 64)
    batch = dict(synthetic_batch(16), patch_noise=noise)
    ref_fn = jax.jit(step.make_grad_fn(model, None))
    ref_loss, _, ref_grads, _ = ref_fn(params, {}, batch)
    other = ref_fn(params, {}, dict(batch, patch_noise=1.0 - noise))
    assert abs(float(other[0]) - float(ref_loss)) > 1e-4  # the masks do change the loss

    scanned = _model(0.5, remat="full", scan_layers=True)
    stacked = stack_layers(params)
    mesh = sharding.create_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
    shards = sharding.state_shardings(
        mesh,
        step.TrainState(
            step=jnp.int32(0), params=stacked, batch_stats={}, opt_state={}, rng=jnp.zeros(2)
        ),
    )
    fn = jax.jit(
        step.make_grad_fn(scanned, mesh, accumulation_steps=2, param_shardings=shards.params)
    )
    loss, _, grads, _ = fn(
        jax.device_put(stacked, shards.params),
        {},
        jax.device_put(batch, sharding.batch_sharding(mesh)),
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert max_abs_diff(unstack_layers(grads), ref_grads) <= 1e-5


def test_step_noise_is_per_step_and_reproducible():
    rng = jax.random.key_data(jax.random.key(0))
    a = patch_dropout.step_noise(rng, jnp.int32(3), 8, 64)
    np.testing.assert_array_equal(a, patch_dropout.step_noise(rng, jnp.int32(3), 8, 64))
    assert not np.array_equal(a, patch_dropout.step_noise(rng, jnp.int32(4), 8, 64))


def test_trainer_drops_patches_and_rejects_bad_rates(tmp_path, monkeypatch):
    traced = []

    def recording(x, noise, rate):
        traced.append((x.shape, noise.shape, rate))
        return keep_patches(x, noise, rate)

    keep_patches = patch_dropout.keep_patches
    monkeypatch.setattr(patch_dropout, "keep_patches", recording)
    config = small_config(batch_size=8, total_steps=1, **{"model.patch_dropout": 0.75})
    history = train.train(config, str(tmp_path / "w"), devices=jax.devices()[:1])
    assert history["step"] == 1 and np.isfinite(history["loss"])
    assert traced and all(t == ((8, 65, 64), (8, 64), 0.75) for t in traced), traced
    for rate, model_name, message in (
        (1.0, "tiny-vit", r"model.patch_dropout=1.0 must be in \[0, 1\)"),
        (-0.5, "tiny-vit", r"model.patch_dropout=-0.5 must be in \[0, 1\)"),
        (0.5, "tiny-rn", "needs a ViT image tower; config.model.name='tiny-rn' has a resnet"),
    ):
        bad = small_config(**{"model.patch_dropout": rate, "model.name": model_name})
        with pytest.raises(train.ConfigError, match=message):
            train.validate_config(bad)


@pytest.mark.parametrize("kind", ["converted", "workdir"])
def test_patch_dropout_on_loaded_resnet_weights_is_a_one_line_error(tmp_path, kind):
    """With init_from the image tower is the weights': their description (model.json, a
    checkpoint's metadata) says ResNet, and the run stops there, before reading any array (the
    stand-in arrays here fit no model) or creating its workdir. Hub references: test_hub.py."""
    rn = models.get_model_config("tiny-rn")
    stand_in = {"params": {"x": np.zeros(2, np.float32)}}
    source = tmp_path / "rn"
    if kind == "converted":
        model_store.save_converted(source, rn, stand_in)
    else:
        checkpointer = checkpoint.Checkpointer(str(source))
        checkpointer.save(1, jax.tree.map(jnp.asarray, stand_in), {"model_config": rn.to_dict()})
        checkpointer.close()
    proc = run_train_cli(
        "--workdir",
        str(tmp_path / "w"),
        f"--config.init_from={source}",
        "--config.model.patch_dropout=0.5",
        timeout=120,
    )
    assert cli_error(proc) == (
        f"clip_jax.train: error: config.model.patch_dropout=0.5: needs a ViT image tower; the "
        f"init_from weights ({source}) have a resnet tower"
    )
    assert not (tmp_path / "w").exists()
