"""`config.init_from` names another run's workdir (`runs/x`: its latest checkpoint,
`runs/x@STEP`: that one): the new run starts from those weights with a fresh optimizer and step
counter; a missing or damaged step and an unknown path are one-line errors."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from train_runs import get_config

from clip_jax import checkpoint, model_store, train, train_setup


def _config(**overrides):
    return get_config(batch_size=8, **{"data.source": "synthetic", **overrides})


def _one_line(message: str) -> str:
    assert "\n" not in message and len(message) < 700, message
    return message


def _assert_same(tree_a, tree_b):
    a, b = jax.tree.leaves(jax.device_get(tree_a)), jax.tree.leaves(jax.device_get(tree_b))
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> str:
    """Two steps of a one-layer-text tiny ViT on one device, a checkpoint after each; its
    tokenizer is named "openai" (an alias of "clip-bpe") so that the name can be traced."""
    workdir = str(tmp_path_factory.mktemp("init_from") / "first")
    config = _config(
        total_steps=2,
        checkpoint_every=1,
        **{"model.text.layers": 1, "data.tokenizer": "openai"},
    )
    train.train(config, workdir, devices=jax.devices()[:1])
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [1, 2]
    return workdir


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_second_run_starts_from_the_latest_weights_with_a_fresh_optimizer(
    first_run, tmp_path, ema_decay
):
    # lr 0: the one step of the second run leaves its parameters where they started. With
    # ema_decay the loaded weights are the moving average: it starts at the loaded weights
    # too (from random ones it would be 0.1 x random + 0.9 x loaded after the step).
    config = _config(total_steps=1, init_from=first_run, ema_decay=ema_decay, **{"optim.lr": 0.0})
    second = str(tmp_path / "second")
    train.train(config, second, devices=jax.devices()[:1])
    started = model_store.load_model(second)
    assert started.step == 1  # its own step counter, from 0
    _assert_same(started.variables, model_store.load_model(first_run).variables)

    # Fresh optimizer: after one step Adam's count is 1 (the first run's was 2 at its end).
    checkpointer = checkpoint.Checkpointer(second, read_only=True)
    saved = dict(checkpointer.saved_state_tree(1))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), saved
    )
    state, meta = checkpointer.restore(1, abstract)
    checkpointer.close()
    counts = [
        int(np.asarray(x))
        for path, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
        if "count" in jax.tree_util.keystr(path)
    ]
    assert counts and set(counts) == {1}, counts
    assert meta["samples_delivered"] == 8  # the data order starts over too


def test_a_given_step_is_taken(first_run):
    model_config, variables, tokenizer = train_setup.load_model(
        _config(total_steps=1, init_from=f"{first_run}@1")
    )
    _assert_same(variables, model_store.load_model(first_run, step=1).variables)
    # The architecture and tokenizer are the first run's, not this config's (2 text layers).
    assert model_config.text.layers == 1 and tokenizer == "openai"
    with pytest.raises(AssertionError):  # step 1 differs from the latest (step 2)
        _assert_same(variables, model_store.load_model(first_run).variables)


def test_missing_or_damaged_step_and_unknown_path_are_one_line_errors(first_run, tmp_path):
    with pytest.raises(train.ConfigError) as error:
        train.train(_config(total_steps=1, init_from=f"{first_run}@7"), str(tmp_path / "a"))
    assert _one_line(str(error.value)) == (
        f"config.init_from: no checkpoint for step 7 in {first_run}/checkpoints; "
        f"available steps: [1, 2]"
    )

    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(train.ConfigError) as error:
        train.validate_config(_config(init_from=f"{nowhere}@3"))
    assert _one_line(str(error.value)) == f"config.init_from: {nowhere} does not exist"
    with pytest.raises(train.ConfigError, match="is neither a training workdir"):
        train.validate_config(_config(init_from=str(tmp_path)))

    damaged = str(tmp_path / "damaged")
    shutil.copytree(first_run, damaged)
    arrays = os.path.join(damaged, "checkpoints", "2", "state", "ocdbt.process_0", "d")
    largest = max((os.path.join(arrays, f) for f in os.listdir(arrays)), key=os.path.getsize)
    with open(largest, "r+b") as f:  # one flipped bit in the middle of the largest array file
        f.seek(os.path.getsize(largest) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(train.ConfigError) as error:
        train.train(_config(total_steps=1, init_from=damaged), str(tmp_path / "b"))
    message = _one_line(str(error.value))
    assert message.startswith(
        f"config.init_from: damaged checkpoint: step 2 in {damaged}/checkpoints: "
    ), message
    assert message.endswith("; other steps: [1]"), message
    assert not os.path.exists(tmp_path / "b")  # stopped before creating the new workdir
