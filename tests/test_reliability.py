"""Reliability: checkpoint integrity and fallback, the workdir lock, metrics de-duplication
after resume, one-line startup errors that create nothing."""

import gc
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from train_runs import REPO, SMALL, SMALL_FLAGS, get_config, losses, read_metrics, train_argv

import clip_jax
from clip_jax import checkpoint, checksum, cli, evaluate, metrics, model_store, train, workdir_lock


def _config(**overrides):
    base = {
        "batch_size": 8,
        "total_steps": 4,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        "data.source": "synthetic",
        **SMALL,
    }
    base.update(overrides)
    return get_config(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4 (copy it before damaging it)."""
    workdir = tmp_path_factory.mktemp("trained") / "w"
    train.train(_config(), str(workdir), devices=jax.devices()[:1])
    return workdir


def _copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "w")
    return tmp_path / "w"


def _largest_array_file(workdir, step):
    files = glob.glob(
        str(workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d" / "*")
    )
    return max(files, key=os.path.getsize)


def _flip_middle_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def _one_line(message):
    assert "\n" not in message and len(message) < 700, message
    return message


def test_checksum_is_mesh_independent_and_catches_any_single_flip():
    """Same value for any sharding, on the jitted and the NumPy path; one flipped bit in any
    element of any dtype changes it; moving values around (same multiset) changes it too."""
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((16, 24)).astype(np.float32),
        "bf16": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
        "i32": np.arange(40, dtype=np.int32).reshape(8, 5),
        "u8": np.arange(7, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.int32(3),
    }
    reference = checksum.tree_checksums(tree)
    # The jitted (accelerator) path gives the same values as the NumPy (CPU backend) path.
    assert checksum.tree_checksums(tree, on_device=True) == reference
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("a", "b"))
    for spec in (P("a", "b"), P("b", None), P(None, ("a", "b")), P()):
        placed = dict(tree, f32=jax.device_put(tree["f32"], NamedSharding(mesh, spec)))
        assert checksum.tree_checksums(placed) == reference, spec
        if spec in (P("a", "b"), P("b", None)):
            assert checksum.tree_checksums(placed, on_device=True) == reference, spec
    for name in ("f32", "bf16", "i32", "u8", "bool"):
        x = np.array(tree[name])
        for index in (0, x.size // 2, x.size - 1):
            damaged = x.copy()
            if damaged.dtype == bool:
                damaged.reshape(-1)[index] ^= True
            else:
                damaged.view(np.uint8).reshape(-1)[index * x.itemsize] ^= 0x01
            assert checksum.tree_checksums({name: damaged})[name] != reference[name], (name, index)
    swapped = tree["f32"][::-1].copy()
    assert checksum.tree_checksums({"f32": swapped})["f32"] != reference["f32"]


def test_flipped_byte_is_reported_and_training_resumes_from_the_intact_checkpoint(
    trained, tmp_path, caplog
):
    """A flipped byte in the newest checkpoint's largest array file restored silently before.
    Now clip_jax.load and clip_jax.evaluate report it in one line, and training resumes from
    the older intact checkpoint (warning), replays the same steps and logs each step once."""
    workdir = _copy(trained, tmp_path)
    _flip_middle_byte(_largest_array_file(workdir, 4))

    with pytest.raises(checkpoint.DamagedCheckpointError) as error:
        clip_jax.load(str(workdir))
    message = _one_line(str(error.value))
    assert message.startswith(f"damaged checkpoint: step 4 in {workdir}/checkpoints: ")
    assert "fail their checksum" in message or "unreadable" in message
    assert "other steps: [2]" in message
    with pytest.raises(evaluate.EvalError) as eval_error:
        evaluate.evaluate(None, str(workdir))
    assert str(eval_error.value) == message
    assert model_store.load_model(str(workdir), step=2).step == 2  # older one is fine

    with caplog.at_level(logging.WARNING):
        result = train.train(_config(total_steps=6), str(workdir), devices=jax.devices()[:1])
    assert result["step"] == 6
    warnings = caplog.text
    assert "damaged checkpoint: step 4" in warnings and "trying step 2" in warnings
    assert "resuming from step 2 instead of damaged step 4" in warnings
    assert (workdir / "damaged_checkpoints" / "4" / "state").is_dir()
    assert checkpoint.Checkpointer(str(workdir), read_only=True).all_steps() == [2, 4, 6]
    # metrics.jsonl: one row per step, the replayed steps 3 and 4 with the original losses.
    assert [row["step"] for row in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
    before, after = losses(trained), losses(workdir)
    for step in (1, 2, 3, 4):
        np.testing.assert_allclose(after[step], before[step], rtol=1e-5, err_msg=str(step))


# Orbax's array reads left behind by the failed restore must not report it again.
@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_truncated_or_metadata_less_checkpoints_are_one_line_damage_errors(trained, tmp_path):
    """A truncated array file (an unreadable checkpoint, a 60-line TensorStore error before)
    and a deleted state/_METADATA (a pytree structure error before) are one-line
    damaged-checkpoint errors; when every checkpoint is damaged training stops, moving
    nothing."""
    workdir = _copy(trained, tmp_path)
    path = _largest_array_file(workdir, 4)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(checkpoint.DamagedCheckpointError) as error:
        model_store.load_model(str(workdir))
    assert _one_line(str(error.value)).startswith("damaged checkpoint: step 4 in ")
    assert "unreadable (ValueError: OUT_OF_RANGE" in str(error.value)
    gc.collect()
    # The CLI prints just that line: no traceback, not even from orbax's reads left behind.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "-m", "clip_jax.evaluate", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1
    # (Which array's read fails first varies: reads run concurrently.)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"clip_jax.evaluate: error: damaged checkpoint: step 4 in {workdir}/"
        f"checkpoints: unreadable (ValueError: OUT_OF_RANGE: "
    ), last
    assert last.endswith("; other steps: [2]"), last
    assert "Traceback" not in proc.stderr and "Error" not in proc.stdout, proc.stderr[-3000:]

    os.remove(workdir / "checkpoints" / "2" / "state" / "_METADATA")
    with pytest.raises(checkpoint.DamagedCheckpointError) as error:
        clip_jax.load(str(workdir), step=2)
    assert _one_line(str(error.value)) == (
        f"damaged checkpoint: step 2 in {workdir}/checkpoints: state/_METADATA is missing or "
        f"unreadable; other steps: [4]"
    )

    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"all 2 checkpoints in .* are damaged "
        r"\(steps 4, 2; newest: unreadable",
    ):
        train.train(_config(total_steps=6), str(workdir), devices=jax.devices()[:1])
    assert not (workdir / "damaged_checkpoints").exists()
    assert checkpoint.Checkpointer(str(workdir), read_only=True).all_steps() == [2, 4]


def test_a_read_error_that_is_not_damage_stops_without_skipping(trained, tmp_path, monkeypatch):
    """Running out of memory (or an unavailable filesystem) while restoring says nothing about
    the files: no fallback to an older step, no checkpoint moved aside, a one-line error."""
    workdir = _copy(trained, tmp_path)
    checkpointer = checkpoint.Checkpointer(str(workdir), read_only=True)

    def out_of_memory(*args, **kwargs):
        try:
            raise ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 1.8GiB")
        except ValueError as e:
            raise Exception("Encountered error while reading array index") from e

    monkeypatch.setattr(checkpointer._manager, "restore", out_of_memory)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
        dict(checkpointer.saved_state_tree(4)),
    )
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpointer.restore_latest_intact(abstract)
    assert not isinstance(error.value, checkpoint.DamagedCheckpointError)
    assert _one_line(str(error.value)) == (
        f"could not read checkpoint step 4 in {workdir}/checkpoints: unreadable (ValueError: "
        f"RESOURCE_EXHAUSTED: Out of memory allocating 1.8GiB) (not a sign of damage; retry)"
    )
    assert checkpointer.all_steps() == [2, 4]


def test_checkpoints_without_checksums_restore_unverified_with_a_warning(trained, tmp_path, caplog):
    """Checkpoints written before clip_jax stored checksums still load."""
    workdir = _copy(trained, tmp_path)
    meta_file = workdir / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    for key in ("checksums", "checksum_version", "meta_checksum"):
        del meta[key]
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        loaded = model_store.load_model(str(workdir))
    assert loaded.step == 4 and "params" in loaded.variables
    assert "written without checksums" in caplog.text


def test_metrics_rows_after_the_resume_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # torn
    writer = metrics.MetricWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 30.0})
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2] + [
        {"step": 3, "loss": 30.0}
    ]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


@pytest.mark.slow
def test_second_run_on_a_workdir_refuses_and_a_crashed_holder_leaves_no_stale_lock(tmp_path):
    """A real `clip_jax.train` holds the workdir; a second run stops with one line naming
    host, pid and start time and writes nothing; once the holder is killed (SIGKILL: no
    cleanup), the next run can take the workdir."""
    workdir = tmp_path / "w"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    holder = subprocess.Popen(
        train_argv(
            "--workdir",
            str(workdir),
            "--config.batch_size=8",
            "--config.total_steps=100000",
            "--config.data.source=synthetic",
            *SMALL_FLAGS,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        lock_file = workdir / workdir_lock.LOCK_NAME
        deadline = time.time() + 120
        while time.time() < deadline and f'"pid": {holder.pid}' not in (
            lock_file.read_text() if lock_file.exists() else ""
        ):
            assert holder.poll() is None, "the holder exited early"
            time.sleep(0.2)
        held = lock_file.read_text()
        started = json.loads(held)["started"]
        with pytest.raises(workdir_lock.WorkdirLockedError) as error:
            train.train(
                _config(total_steps=2, checkpoint_every=0), str(workdir), devices=jax.devices()[:1]
            )
        assert _one_line(str(error.value)) == (
            f"workdir {workdir} is in use by another clip_jax.train run (host "
            f"{os.uname().nodename}, pid {holder.pid}, started {started}); wait for it to end or "
            f"use another --workdir"
        )
        # The refused run wrote nothing: the lock and the config are still the holder's.
        assert lock_file.read_text() == held
        config_file = workdir / "config.json"
        assert (
            not config_file.exists() or json.loads(config_file.read_text())["total_steps"] == 100000
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The kernel released the dead holder's lock: the next run's lock step succeeds (a whole
    # run after the end of another is covered by the tests that resume training).
    lock = train._lock_workdir(str(workdir))
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()


@pytest.fixture
def run_main(monkeypatch):
    """Runs the CLI's main() in-process on a config (as `python -m clip_jax.train` does after
    flag parsing); returns its exit message (SystemExit's code)."""
    monkeypatch.setenv("CLIP_JAX_TUNE_MALLOC", "0")  # keep this process's allocator as it is

    def run(config, workdir):
        monkeypatch.setattr(train, "_CONFIG", types.SimpleNamespace(value=config))
        monkeypatch.setattr(train, "_WORKDIR", types.SimpleNamespace(value=str(workdir)))
        with pytest.raises(SystemExit) as exit_info:
            train.main(["clip_jax.train"])
        return str(exit_info.value.code)

    return run


def test_unknown_config_variant_is_one_line(tmp_path):
    argv = [
        "clip_jax.train",
        "--config",
        str(REPO / "configs" / "clip.py") + ":huge",
        "--workdir",
        str(tmp_path / "w"),
    ]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.flags_parser("clip_jax.train")(argv)
    finally:
        flags.FLAGS.unparse_flags()
    first, *rest = str(exit_info.value.code).splitlines()
    assert first.startswith("clip_jax.train: error: flag --config=") and first.endswith(
        "clip.py:huge: unknown config variant 'huge'; choose one of demo, tiny, tiny_rn, vit_b32, "
        "vit_b16, vit_l14, rn50, rn101, lit_b32, vit_b16_flip, vit_b16_clipa"
    )
    assert rest == ["Try --help."]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("case", ["workdir_under_file", "missing_shards", "directory_shard"])
def test_startup_errors_are_one_line_and_create_nothing(tmp_path, run_main, case):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    workdir, data, expected = tmp_path / "w", {}, None
    if case == "workdir_under_file":
        workdir = tmp_path / "a_file" / "w"
        expected = (
            f"--workdir {workdir}: cannot create it, {tmp_path / 'a_file'} is a file, "
            f"not a directory"
        )
    elif case == "missing_shards":
        data = {"data.source": "tar", "data.shards": f"{tmp_path}/s-{{0..3}}.tar"}
        expected = (
            f"config.data: tar shards file '{tmp_path}/s-0.tar' does not exist (from "
            f"'{tmp_path}/s-{{0..3}}.tar')"
        )
    else:
        data = {"data.source": "tar", "data.shards": str(tmp_path / "a_dir")}
        expected = str(tmp_path / "a_dir")
    before = sorted(p.name for p in tmp_path.iterdir())
    message = _one_line(run_main(get_config(**data), workdir))
    assert message.startswith("clip_jax.train: error: ") and expected in message, message
    if case == "directory_shard":
        assert "directory" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "a_file").read_text() == "x" and not os.listdir(tmp_path / "a_dir")
