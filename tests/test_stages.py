"""Stage schedules (clip_jax/stages.py): configs per stage, skipping finished stages, stopping
on preemption, and a real two-stage low-resolution -> full-size run."""

import os

import jax
import numpy as np
import pytest
from train_runs import small_config

from clip_jax import model_store, stages
from clip_jax.models import overrides, resize

TWO_STAGES = (
    {"total_steps": 2, "model.vision.image_size": 32, "data.context_length": 8},
    {"total_steps": 1, "optim.lr": 1e-4},
)


def test_stage_configs_chain_init_from_and_restore_full_size(tmp_path):
    config = small_config(stages=TWO_STAGES)
    (dir0, c0), (dir1, c1) = stages.stage_configs(config, str(tmp_path))
    assert dir0 == str(tmp_path / "stage_0") and dir1 == str(tmp_path / "stage_1")
    assert c0.stages == () and c0.total_steps == 2 and c0.model.vision.image_size == 32
    assert c0.data.context_length == 8 and c0.init_from == "" and c0.model.embed_dim == 64
    # Stage 1: base config + its own overrides, from stage 0's weights, back at full size.
    # Only the input sizes are set in stage 1 (tiny-vit's): the architecture comes from stage
    # 0's weights, whose positional embeddings are resized to them.
    assert c1.init_from == dir0
    assert overrides.set_fields(c1.model) == {"vision.image_size": 64, "text.context_length": 32}
    assert c1.data.context_length == 0 and c1.optim.lr == 1e-4 and c1.total_steps == 1
    for bad, message in (
        (({"total_stepz": 1},), r"config.stages\[0\]: unknown config key 'total_stepz'"),
        (({"model.nope": 1},), "unknown config key 'model.nope'"),
        (({"model.image_size": 1},), r"'model.image_size' \(now model.vision.image_size\)"),
        (({}, {"init_from": "x"}), r"config.stages\[1\]: sets init_from"),
        (({"total_steps": "many"},), "total_steps='many'"),
    ):
        with pytest.raises(stages.StageError, match=message):
            stages.stage_configs(small_config(stages=bad), str(tmp_path))


def test_run_skips_finished_stages_and_stops_when_preempted(tmp_path):
    config = small_config(stages=({"total_steps": 2}, {"total_steps": 3}, {"total_steps": 4}))
    calls = []

    def fake_train(cfg, workdir, preempt_at=None):
        calls.append((os.path.basename(workdir), cfg.total_steps))
        os.makedirs(workdir, exist_ok=True)
        return {"step": cfg.total_steps, "preempted": cfg.total_steps == preempt_at}

    history = stages.run(config, str(tmp_path), fake_train, preempt_at=3)
    assert calls == [("stage_0", 2), ("stage_1", 3)] and history["preempted"]
    assert stages.is_complete(str(tmp_path / "stage_0"))
    assert not stages.is_complete(str(tmp_path / "stage_1"))
    calls.clear()
    history = stages.run(config, str(tmp_path), fake_train)  # rerun: resumes at stage 1
    assert calls == [("stage_1", 3), ("stage_2", 4)] and history["stage"] == 2


def test_every_stage_is_checked_before_the_first_trains(tmp_path):
    """A later stage's bad option stops the schedule before stage 0 trains: its weights do not
    exist yet, so it is checked as stage 0's architecture at its own input sizes."""
    from clip_jax import train

    calls = []

    def fake_train(cfg, workdir):
        calls.append(workdir)
        os.makedirs(workdir)
        return {"step": cfg.total_steps}

    for schedule, message in (
        (
            ({}, {"data.context_length": 40}),
            r"config.stages\[1\]: config.data.context_length=40 is longer than the model's text "
            r"context config.model.text.context_length=32",
        ),
        (  # stage 1 returns to the base context (32), longer than stage 0's weights have
            ({"model.text.context_length": 16}, {}),
            r"config.stages\[1\]: config.model.text.context_length=32 is longer than stage 0's 16",
        ),
        (
            ({}, {}, {"model.vision.width": 32}),
            r"config.stages\[2\]: config.model.vision.width=32: architecture fields must stay",
        ),
        (({}, {"model.patch_dropout": 1.0}), r"config.stages\[1\]: config.model.patch_dropout"),
    ):
        config = small_config(stages=schedule)
        with pytest.raises(stages.StageError, match=message):
            stages.run(config, str(tmp_path), fake_train, train.validate_config)
        assert calls == []
    # A good schedule (stage 0 at 32 px, stage 1 back at 64) passes and runs both stages.
    history = stages.run(
        small_config(stages=({"model.vision.image_size": 32}, {})),
        str(tmp_path / "good"),
        fake_train,
        train.validate_config,
    )
    assert history["stage"] == 1 and len(calls) == 2


def test_two_stage_low_resolution_then_full_size_run(tmp_path):
    """Stage 0: 32 px, 8-token captions, 2 steps. Stage 1: 64 px from stage 0's weights; its
    first step has learning rate 0 (warmup), so its saved weights are stage 0's, resized."""
    config = small_config(batch_size=8, stages=TWO_STAGES)
    history = stages.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert history["stage"] == 1 and history["step"] == 1
    stage0 = model_store.load_model(str(tmp_path / "stage_0"))
    stage1 = model_store.load_model(str(tmp_path / "stage_1"))
    low, full = stage0.variables, stage1.variables
    assert stage0.config.vision.image_size == 32
    assert stage1.config.vision.image_size == 64
    want = resize.resize_pos_embed(np.asarray(low["params"]["image"]["positional_embedding"]), 8)
    np.testing.assert_allclose(full["params"]["image"]["positional_embedding"], want, atol=1e-6)


@pytest.mark.parametrize("variant", ["vit_b16_flip", "vit_b16_clipa"])
def test_recipe_configs_are_valid_stage_schedules(tmp_path, variant):
    from train_runs import get_config

    from clip_jax import train

    schedule = stages.stage_configs(get_config(variant), str(tmp_path))
    stages.check(schedule, train.validate_config)  # both stages, before any trains
    (_, first), (_, last) = schedule
    assert last.model.vision.image_size == 224 and last.model.text.context_length == 77
    assert last.model.patch_dropout == 0.0  # the final phase sees every patch
    if variant == "vit_b16_flip":
        assert first.model.patch_dropout == 0.5
    else:
        assert first.model.vision.image_size == 112 and first.data.context_length == 16
        assert last.data.context_length == 32


def test_cli_runs_stages_and_reports_a_bad_stage_in_one_line(tmp_path):
    from train_runs import cli_error, run_train_cli

    proc = run_train_cli(
        "--workdir", str(tmp_path / "w"), "--config.stages=({'total_stepz': 1},)", timeout=120
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "clip_jax.train: error" in line]
    assert len(errors) == 1 and "config.stages[0]: unknown config key 'total_stepz'" in errors[0]
    assert "Traceback" not in proc.stderr
    # A bad later stage stops the command before stage 0 trains.
    proc = run_train_cli(
        "--workdir", str(tmp_path / "w"), "--config.stages=({}, {'data.context_length': 40})"
    )
    assert cli_error(proc).endswith(
        "error: config.stages[1]: config.data.context_length=40 is longer than the model's text "
        "context config.model.text.context_length=32; training captions can only be shortened"
    )
    assert not (tmp_path / "w").exists()
