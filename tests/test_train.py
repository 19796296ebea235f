"""Trainer: device-count invariance, exact resume, preemption, bad config, NaN policy, LiT."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from train_runs import get_config, losses, read_metrics, run_train_cli, train_argv

from clip_jax import checkpoint, model_store, train


@pytest.mark.parametrize("variant", ["tiny", "tiny_rn"])
def test_one_and_eight_devices_give_the_same_losses(tmp_path, variant):
    """Same global batch and seed: 8-way data parallelism reproduces the 1-device run
    (for the ResNet this needs synchronised BatchNorm)."""
    config = get_config(variant, batch_size=16, total_steps=5, **{"data.source": "synthetic"})
    train.train(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    train.train(config, str(tmp_path / "eight"), devices=jax.devices()[:8])
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(one) == [1, 2, 3, 4, 5]
    for step in one:
        np.testing.assert_allclose(eight[step], one[step], rtol=1e-4)
    assert one[5] < one[1]  # it learns


class _PreemptAtStep:
    """Stands in for SIGTERM arriving during step `n` (the loop polls `requested` once a step)."""

    def __init__(self, n):
        self.n, self.polls = n, 0

    def __call__(self):
        outer = self

        class Fake:
            @property
            def requested(self):
                outer.polls += 1
                return outer.polls >= outer.n

            def restore(self):
                pass

        return Fake()


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    """6 steps in one go == 3 steps, preemption (checkpoint + exit), restart, 3 more steps:
    same per-step losses and same final parameters. Uses the real tar-shard pipeline."""
    config = get_config(batch_size=16, total_steps=6)
    straight = tmp_path / "straight"
    train.train(config, str(straight))

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(train, "_Preemption", _PreemptAtStep(3))
    result = train.train(config, str(resumed))
    assert result.get("preempted") and result["step"] == 3
    assert checkpoint.Checkpointer(str(resumed), read_only=True).all_steps() == [3]
    monkeypatch.undo()
    train.train(config, str(resumed))

    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        np.testing.assert_allclose(b[step], a[step], rtol=1e-5, err_msg=f"step {step}")
    params_a = model_store.load_model(str(straight)).variables
    params_b = model_store.load_model(str(resumed)).variables
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    written = read_metrics(straight)[-1]
    for key in (
        "loss",
        "logit_scale",
        "lr",
        "samples_per_sec",
        "grad_norm",
        "i2t_accuracy",
        "t2i_accuracy",
        "data_wait_fraction",
        "skipped_samples",
        "flops_per_sec",
    ):
        assert key in written, key
    assert json.load(open(straight / "config.json"))["batch_size"] == 16
    assert list((straight / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.batch_sise=3", "batch_sise"),
        ("--config.model.vision.wdth=3", 'Did you mean "width"'),
        ("--config.batch_size=abc", "batch_size"),
        ("--config.batch_size=12", "divisible by the 8"),
        ("--config.data.source=tar", "data.shards is empty"),
        ("--config.model.name=ViT-Z-1", "unknown model"),
        ("--config.model.attention_impl=flash", "model.attention_impl='flash'"),
        (
            "--config.data.context_length=40",
            "config.data.context_length=40 is longer than the model's text context "
            "config.model.text.context_length=32 (unset: that of config.model.name='tiny-vit')",
        ),
        (
            "--config.data.context_length=20 --config.model.text.context_length=16",
            "config.data.context_length=20 is longer than the model's text context "
            "config.model.text.context_length=16; training captions can only be shortened",
        ),
        ("--config.model.patch_dropout=1.0", "config.model.patch_dropout=1.0 must be in [0, 1)"),
        (
            "--config.model.patch_dropout=0.5 --config.model.name=tiny-rn",
            "config.model.patch_dropout=0.5: needs a ViT image tower; "
            "config.model.name='tiny-rn' has a resnet tower",
        ),
        (
            "--config.model.image_size=112",
            "unknown key config.model.image_size; it is now config.model.vision.image_size",
        ),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, override, message):
    """`override`: one or more flags, separated by spaces."""
    proc = run_train_cli("--workdir", str(tmp_path / "w"), *override.split(" "), timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "clip_jax.train: error" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()  # found before the run built or wrote anything


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "w"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        train_argv(
            "--workdir",
            str(workdir),
            "--config.batch_size=8",
            "--config.total_steps=100000",
            "--config.log_every=1",
            "--config.data.source=synthetic",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    steps = checkpoint.Checkpointer(str(workdir), read_only=True).all_steps()
    assert len(steps) == 1 and steps[0] >= 2
    assert "preempted at step" in out


def test_nan_loss_stops_with_the_step_number_or_is_skipped(tmp_path):
    # A huge learning rate blows the parameters up within a few steps.
    config = get_config(
        batch_size=8,
        total_steps=6,
        **{"data.source": "synthetic", "optim.lr": 1e30, "optim.warmup_steps": 0},
    )
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step \d"):
        train.train(config, str(tmp_path / "stop"), devices=jax.devices()[:1])
    config = get_config(
        batch_size=8,
        total_steps=6,
        nan_policy="skip",
        **{"data.source": "synthetic", "optim.lr": 1e30, "optim.warmup_steps": 0},
    )
    result = train.train(config, str(tmp_path / "skip"), devices=jax.devices()[:1])
    assert result["step"] == 6
    assert sum(m["nonfinite"] for m in read_metrics(tmp_path / "skip")) >= 1


def test_lit_freezes_the_image_tower_of_converted_weights(tmp_path):
    from clip_jax import models

    model_config = models.get_model_config("tiny-vit")
    variables = jax.jit(models.create_model(model_config).init_variables)(jax.random.key(7))
    model_store.save_converted(tmp_path / "converted", model_config, variables)
    config = get_config(
        batch_size=8,
        total_steps=3,
        freeze="image/.*",
        init_from=str(tmp_path / "converted"),
        **{"data.source": "synthetic"},
    )
    train.train(config, str(tmp_path / "lit"), devices=jax.devices()[:1])
    trained = model_store.load_model(str(tmp_path / "lit")).variables
    start = variables["params"]
    assert jax.tree.structure(trained["params"]) == jax.tree.structure(start)
    # Exactly: every image parameter is bit-identical (frozen: no update, no weight decay) and
    # every other parameter (each text leaf and logit_scale) moved.
    after = jax.tree_util.tree_leaves_with_path(trained["params"])
    for (path, a), b in zip(after, jax.tree.leaves(start)):
        name = jax.tree_util.keystr(path)
        if name.startswith("['image']"):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        else:
            assert not np.array_equal(np.asarray(a), np.asarray(b)), f"{name} did not change"


def test_checkpoint_of_a_scanned_model_loads_for_inference(tmp_path):
    """Training with nn.scan stores stacked layers; evaluation/inference get the unrolled
    layout back and produce the same embeddings as the scanned model."""
    import clip_jax
    from clip_jax import models
    from clip_jax.models import transformer

    config = get_config(
        batch_size=8, total_steps=2, **{"data.source": "synthetic", "model.scan_layers": True}
    )
    train.train(config, str(tmp_path / "scan"), devices=jax.devices()[:1])
    loaded = model_store.load_model(str(tmp_path / "scan"))
    variables = loaded.variables
    assert loaded.meta["scan_layers"] is True
    assert "resblocks_1" in variables["params"]["text"]["transformer"]
    model = clip_jax.load(str(tmp_path / "scan"))
    tokens = ["a red square", "a photo of a dog"]
    features = model.encode_text(tokens)
    scanned = models.CLIP(models.get_model_config("tiny-vit"), scan_layers=True)
    ids = clip_jax.tokenizers.get("clip-bpe")(tokens, context_length=32)
    reference = scanned.apply(
        {"params": transformer.stack_layers(variables["params"])}, ids, method=scanned.encode_text
    )
    reference = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    np.testing.assert_allclose(features, reference, atol=1e-5)


def test_model_flops_ignore_accumulation_scan_and_remat():
    """MFU's numerator is the model's FLOPs per step, whatever runs them: XLA's cost analysis of
    the step as configured counts a loop body once and remat's recomputation on top (tiny-vit:
    0.68x with 2 micro-batches, 0.53x with scanned layers, 1.22x with full remat)."""
    from clip_jax import metrics, sharding, train_setup

    mesh = sharding.create_mesh(1, 1, devices=jax.devices()[:1])
    plain = train_setup.build(get_config(batch_size=16), mesh)
    looped = train_setup.build(
        get_config(
            batch_size=16,
            accumulation_steps=2,
            **{"model.scan_layers": True, "model.remat": "full"},
        ),
        mesh,
    )
    expected = metrics.model_flops(
        plain.train_step(mesh=None), plain.abstract_state, plain.abstract_batch(sharded=False)
    )
    assert train._flops_per_step(plain) == pytest.approx(expected, rel=1e-9)
    assert train._flops_per_step(looped) == pytest.approx(expected, rel=1e-9)


def test_ema_weights_are_averaged_resumed_and_exported(tmp_path, monkeypatch):
    """config.ema_decay: the jitted step moves the average by the documented rule (FSDP mesh,
    the average sharded as the params), and a run interrupted after 2 of 4 steps ends with
    the same average as the straight run; loading the workdir gives the average, not the
    last params."""
    from train_runs import small_config, synthetic_batch

    from clip_jax import sharding, step, train_setup

    config = small_config(batch_size=8, total_steps=4, ema_decay=0.5, **{"mesh.fsdp": 2})
    mesh = sharding.create_mesh(1, 2, devices=jax.devices()[:2])
    setup = train_setup.build(config, mesh)
    state = setup.jit_init()()
    start = jax.device_get(state.params)
    assert setup.state_shardings.ema_params == setup.state_shardings.params
    state, _ = setup.jit_step()(state, synthetic_batch(8))
    after = jax.device_get(state.params)
    # After the first update the old average weighs min(0.5, 1 / 10) = 0.1.
    for e, p0, p1 in zip(*(jax.tree.leaves(t) for t in (state.ema_params, start, after))):
        np.testing.assert_allclose(np.asarray(e), 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-6)
    assert float(step.ema_decay_at(0.5, np.int32(890))) == 0.5

    straight = tmp_path / "straight"
    train.train(config, str(straight), devices=jax.devices()[:2])
    resumed = tmp_path / "resumed"
    monkeypatch.setattr(train, "_Preemption", _PreemptAtStep(2))
    assert train.train(config, str(resumed), devices=jax.devices()[:2]).get("preempted")
    monkeypatch.undo()
    train.train(config, str(resumed), devices=jax.devices()[:2])
    loaded_a = model_store.load_model(str(straight)).variables["params"]
    loaded_b = model_store.load_model(str(resumed)).variables["params"]
    for x, y in zip(jax.tree.leaves(loaded_a), jax.tree.leaves(loaded_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    checkpointer = checkpoint.Checkpointer(str(straight), read_only=True)
    saved = checkpointer.saved_state_tree(4)
    raw, _ = checkpointer.restore(
        4,
        jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(saved)),
    )
    checkpointer.close()
    for x, ema, last in zip(
        *(jax.tree.leaves(t) for t in (loaded_a, raw["ema_params"], raw["params"]))
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ema))
    assert any(
        not np.allclose(np.asarray(e), np.asarray(p))
        for e, p in zip(jax.tree.leaves(raw["ema_params"]), jax.tree.leaves(raw["params"]))
    )
