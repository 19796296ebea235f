"""Scale features: FSDP meshes, cross-mesh restore, remat/scan, exact gradient accumulation,
SigLIP in the trainer, converted weights into a scanned model, the eval hook, config errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_runs import (
    SMALL_MODEL,
    get_config,
    losses,
    max_abs_diff,
    read_metrics,
    small_config,
    synthetic_batch,
)

from clip_jax import checkpoint, model_store, models, sharding, step, train, train_setup
from clip_jax.models.transformer import stack_layers, unstack_layers


def test_fsdp_meshes_match_one_device_shrink_params_and_restore_across_meshes(tmp_path):
    """DP 8x1, FSDP 1x8 and 2x4 reproduce the 1-device losses; per-device parameter bytes
    shrink by the fsdp factor; an FSDP 1x8 checkpoint resumes on 1 device exactly."""
    runs = {"one": (1, 1, 1), "dp8x1": (8, 8, 1), "fsdp1x8": (8, 1, 8), "fsdp2x4": (8, 2, 4)}
    for name, (devices, data, fsdp) in runs.items():
        config = small_config(
            **{
                "mesh.data": data,
                "mesh.fsdp": fsdp,
                "checkpoint_every": 3 if name == "fsdp1x8" else 0,
                "keep_checkpoints": 2,
            }
        )
        train.train(config, str(tmp_path / name), devices=jax.devices()[:devices])
    ref = losses(tmp_path / "one")
    assert sorted(ref) == [1, 2, 3, 4, 5]
    for name in runs:
        got = losses(tmp_path / name)
        for s in ref:
            np.testing.assert_allclose(got[s], ref[s], rtol=1e-4, err_msg=f"{name} step {s}")

    nbytes = {name: read_metrics(tmp_path / name)[0]["param_bytes_per_device"] for name in runs}
    full = nbytes["one"]
    assert nbytes["dp8x1"] == full
    # Only a few scalars/odd-sized leaves stay replicated: within 1% of the ideal split.
    assert full / 8 <= nbytes["fsdp1x8"] <= 1.01 * full / 8, nbytes
    assert full / 4 <= nbytes["fsdp2x4"] <= 1.01 * full / 4, nbytes

    # Step-3 checkpoint written with FSDP over 8 devices -> resume on 1 device for steps 4, 5.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "fsdp1x8" / "checkpoints" / "3", resumed / "checkpoints" / "3")
    train.train(small_config(), str(resumed), devices=jax.devices()[:1])
    after = losses(resumed)
    assert sorted(after) == [4, 5]
    for s in (4, 5):
        np.testing.assert_allclose(after[s], ref[s], rtol=1e-4, err_msg=f"resumed step {s}")


def test_sharding_rules_and_optimizer_state_follow_params():
    mesh = sharding.create_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
    params = {
        "text": {
            "token_embedding": {"embedding": jax.ShapeDtypeStruct((100, 64), jnp.float32)},
            "proj": jax.ShapeDtypeStruct((64, 12), jnp.float32),
        },
        "scale": jax.ShapeDtypeStruct((), jnp.float32),
        "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32),
    }
    specs = sharding.param_specs(mesh, params)
    assert specs["text"]["token_embedding"]["embedding"] == P("fsdp", None)  # 100 % 4 == 0
    assert specs["text"]["proj"] == P("fsdp", None)  # 64 > 12, both divisible: the largest
    assert specs["scale"] == P() and specs["odd"] == P()
    rules = ((r"text/token_embedding/.*", (None, "fsdp")), (r"text/proj", (("data", "fsdp"), None)))
    specs = sharding.param_specs(mesh, params, rules)
    assert specs["text"]["token_embedding"]["embedding"] == P(None, "fsdp")
    assert specs["text"]["proj"] == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.param_specs(mesh, params, ((r"odd", ("fsdp",)),))
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        sharding.param_specs(mesh, params, ((r"scale", ()), (r"odd", ("model",))))

    # Adam's mu/nu get their parameter's sharding; scalars (count, step) are replicated.
    import optax

    model = models.create_model("tiny-vit")
    tx = optax.adamw(1e-3)
    abstract = jax.eval_shape(lambda: step.init_train_state(model, tx, 0))
    shardings = sharding.state_shardings(mesh, abstract)
    mu = shardings.opt_state[0].mu
    flat_params = jax.tree.leaves(shardings.params)
    assert [s.spec for s in jax.tree.leaves(mu)] == [s.spec for s in flat_params]
    assert shardings.opt_state[0].count.spec == P() and shardings.step.spec == P()
    assert any(s.spec != P() for s in flat_params)


def _small_model(**kwargs):
    return models.CLIP(models.get_model_config("tiny-vit", **SMALL_MODEL), **kwargs)


def test_remat_and_scan_give_the_same_loss_and_gradients():
    plain = _small_model()
    params = jax.jit(plain.init_variables)(jax.random.key(0))["params"]
    batch = synthetic_batch(8)
    ref_loss, _, ref_grads, _ = jax.jit(step.make_grad_fn(plain, None))(params, {}, batch)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
    for remat, scan in [
        ("full", False),
        ("dots_with_no_batch_dims_saveable", True),
        ("none", True),
    ]:
        model = _small_model(remat=remat, scan_layers=scan)
        p = stack_layers(params) if scan else params
        abstract = jax.eval_shape(model.init_variables, jax.random.key(0))["params"]
        assert jax.tree.structure(abstract) == jax.tree.structure(p)
        loss, _, grads, _ = jax.jit(step.make_grad_fn(model, None))(p, {}, batch)
        if scan:
            assert grads["image"]["transformer"]["resblocks"]["ln_1"]["scale"].shape == (2, 64)
            grads = unstack_layers(grads)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert max_abs_diff(grads, ref_grads) <= 1e-4 * scale, (remat, scan)
    assert unstack_layers(stack_layers(params)).keys() == params.keys()
    assert max_abs_diff(unstack_layers(stack_layers(params)), params) == 0.0


def test_accumulation_gives_full_batch_gradients_with_less_memory():
    """GradCache over 4 micro-batches == one full-batch step (1e-5), lower compiled temp
    memory; on a 2x4 mesh too (CLIP and SigLIP losses)."""
    model = _small_model()
    params = jax.jit(model.init_variables)(jax.random.key(0))["params"]
    batch = synthetic_batch(32)
    compiled = {}
    for k in (1, 4):
        fn = jax.jit(step.make_grad_fn(model, None, accumulation_steps=k))
        compiled[k] = fn.lower(params, {}, batch).compile()
    ref_loss, ref_metrics, ref_grads, _ = compiled[1](params, {}, batch)
    loss, metrics, grads, _ = compiled[4](params, {}, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["i2t_accuracy"], ref_metrics["i2t_accuracy"])
    assert max_abs_diff(grads, ref_grads) <= 1e-5
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
    print(f"accumulation temp bytes: K=1 {temp[1]}, K=4 {temp[4]}")
    assert temp[4] < 0.6 * temp[1], temp

    mesh = sharding.create_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
    shards = sharding.state_shardings(
        mesh,
        step.TrainState(
            step=jnp.int32(0), params=params, batch_stats={}, opt_state={}, rng=jnp.zeros(2)
        ),
    )
    sharded_params = jax.device_put(params, shards.params)
    sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    fn = jax.jit(
        step.make_grad_fn(model, mesh, accumulation_steps=2, param_shardings=shards.params)
    )
    loss, _, grads, _ = fn(sharded_params, {}, sharded_batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert max_abs_diff(grads, ref_grads) <= 1e-5
    assert any(not g.sharding.is_fully_replicated for g in jax.tree.leaves(grads))

    siglip = models.CLIP(model.config.replace(init_logit_bias=-10.0))
    sig_params = dict(params, logit_bias=jnp.float32(-10.0))
    ref_loss, _, ref_grads, _ = jax.jit(step.make_grad_fn(siglip, None, loss="siglip"))(
        sig_params, {}, batch
    )
    loss, _, grads, _ = jax.jit(
        step.make_grad_fn(siglip, mesh, loss="siglip", accumulation_steps=2)
    )(sig_params, {}, sharded_batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert max_abs_diff(grads, ref_grads) <= 1e-5
    assert float(jnp.abs(grads["logit_bias"])) > 0


def test_siglip_training_on_eight_devices_with_accumulation(tmp_path):
    config = small_config(loss="siglip", accumulation_steps=2, total_steps=3)
    train.train(config, str(tmp_path / "w"), devices=jax.devices()[:8])
    rows = read_metrics(tmp_path / "w")
    np.testing.assert_allclose(rows[0]["logit_scale"], 10.0, rtol=1e-6)  # SigLIP init
    np.testing.assert_allclose(rows[0]["logit_bias"], -10.0, rtol=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    meta = checkpoint.Checkpointer(str(tmp_path / "w"), read_only=True).restore_meta()
    assert meta["loss"] == "siglip" and meta["model_config"]["init_logit_bias"] == -10.0


def test_converted_weights_train_scanned_and_eval_metrics_are_logged(tmp_path):
    """init_from (unrolled resblocks_{i}) into a scanned, rematerialised model; the eval hook
    writes evaluator metrics to metrics.jsonl."""
    model_config = models.get_model_config("tiny-vit", **SMALL_MODEL)
    variables = jax.jit(models.create_model(model_config).init_variables)(jax.random.key(3))
    model_store.save_converted(tmp_path / "converted", model_config, variables)
    config = get_config(
        batch_size=8,
        total_steps=2,
        eval_every=2,
        init_from=str(tmp_path / "converted"),
        **{
            "data.source": "synthetic",
            "model.scan_layers": True,
            "model.remat": "full",
            "optim.lr": 0.0,
        },
    )
    config.unlock()
    for name in list(config.eval.evaluators.keys()):
        if name != "zeroshot":
            del config.eval.evaluators[name]
    config.lock()
    train.train(config, str(tmp_path / "w"), devices=jax.devices()[:1])
    last = read_metrics(tmp_path / "w")[-1]
    assert last["step"] == 2 and 0.0 <= last["zeroshot/top1"] <= 1.0
    loaded = model_store.load_model(str(tmp_path / "w"))
    trained = loaded.variables
    assert loaded.meta["scan_layers"] is True
    # lr 0: the stacked checkpoint holds exactly the converted weights.
    assert (
        max_abs_diff(
            unstack_layers(jax.device_get(trained["params"])), jax.device_get(variables["params"])
        )
        == 0.0
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"accumulation_steps": 3}, "divisible by accumulation_steps"),
        ({"loss": "triplet"}, "config.loss"),
        ({"model.remat": "sometimes"}, "model.remat"),
        ({"model.vision.wdth": 3}, r"model\.vision\.wdth=3: the vit tower of 'tiny-vit' has no"),
        ({"model.vision.patch_size": 5}, r"model \(tiny-vit with .*vision.patch_size=5.*\): image"),
        (
            {"model.vision.layers": (1, 1, 1, 1)},
            r"vision\.layers=\(1, 1, 1, 1\): must be int",
        ),
        ({"model.name": "tiny-rn", "model.vision.patch_size": 8}, "resnet tower of 'tiny-rn'"),
        ({"init_from": "/"}, r"model\.embed_dim=64: architecture fields must stay unset with init"),
        ({"distributed.heartbeat_timeout_s": 0}, "heartbeat_timeout_s"),
    ],
)
def test_bad_scale_config_is_a_clear_error(overrides, message):
    with pytest.raises(train.ConfigError, match=message):
        train.validate_config(small_config(**overrides))


def test_model_fields_replace_those_of_the_named_architecture():
    """`config.model.{embed_dim, vision.*, text.*}` replace the named architecture's fields;
    unset ones keep its values; ResNet stage depths are a tuple."""
    model_config, _, _ = train_setup.load_model(
        small_config(**{"model.text.layers": 1, "model.vision.mlp_ratio": 2})
    )
    named = models.get_model_config("tiny-vit")
    assert (model_config.embed_dim, model_config.vision.width, model_config.text.width) == (64,) * 3
    assert (model_config.text.layers, model_config.vision.mlp_ratio) == (1, 2.0)
    assert model_config.vision.layers == named.vision.layers
    assert model_config.vision.patch_size == named.vision.patch_size
    resnet = get_config("tiny_rn", **{"model.vision.layers": (1, 2, 1, 1)})
    assert train_setup.load_model(resnet)[0].vision.layers == (1, 2, 1, 1)


def test_bad_sharding_rule_is_a_config_error(tmp_path):
    config = small_config(
        sharding_rules=((r"logit_scale", ("fsdp",)),), **{"mesh.data": 1, "mesh.fsdp": 8}
    )
    with pytest.raises(train.ConfigError, match="sharding_rules"):
        train.train(config, str(tmp_path / "w"), devices=jax.devices()[:8])
