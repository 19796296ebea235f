"""Input faults end a run with one line, promptly: unusable shards, unreadable files, SIGTERM."""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import numpy as np
import pytest
from data_samples import FakeTokenizer, data_config, make_samples

from clip_jax.data import device, shards
from clip_jax.data.make_shards import write_shards
from clip_jax.data.pipeline import InputWatch, NoUsableData, build_train_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
TOK = FakeTokenizer()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _bad_samples_tar(path, n=20):
    rng = np.random.default_rng(0)
    _write_tar(
        path,
        [
            m
            for i in range(n)
            for m in ((f"{i:04d}.jpg", rng.bytes(300)), (f"{i:04d}.txt", b"a caption"))
        ],
    )


def _consume(cfg, timeout_s=60, after_build=None, max_batches=1):
    """Pulls batches the way the trainer does; returns the error that ended the wait, after
    checking that the input thread ends (a pipeline left spinning over undecodable records
    kept a core busy for the rest of the test process). `after_build()` runs between building
    the pipeline and reading from it; up to `max_batches` may come before the error."""
    before = set(threading.enumerate())
    watch = InputWatch()
    ds = build_train_dataset(
        cfg, image_size=8, tokenizer=TOK, context_length=8, local_batch_size=4, seed=0, watch=watch
    )
    if after_build is not None:
        after_build()
    deadline = time.time() + timeout_s

    def poll():
        if time.time() > deadline:
            raise TimeoutError("the pipeline neither delivered nor failed")
        watch.check(0)

    batches = device.prefetch_to_device(
        ds.as_numpy_iterator(),
        0,
        None,
        host_keys=("position", "image", "text"),
        poll=poll,
        poll_interval_s=0.2,
    )
    with pytest.raises(NoUsableData) as err:
        try:
            for _ in range(max_batches):
                next(batches)
                watch.raise_noted_error()  # as the trainer does after every batch
        except StopIteration:
            watch.check(0)
    if max_batches > 1:
        # Batches came: the input thread may wait on its full queue, as it does in a trainer
        # until the process exits. What matters is that the pipeline stopped working.
        cpu = time.process_time()
        time.sleep(3)
        assert time.process_time() - cpu < 0.5, "the input pipeline still works after the error"
        return str(err.value)
    for thread in set(threading.enumerate()) - before:
        if thread.name == "clip_jax-input":
            thread.join(timeout=30)
            assert not thread.is_alive(), "the input pipeline still runs after NoUsableData"
    return str(err.value)


@pytest.mark.parametrize("kind", ["empty", "not_a_tar"])
def test_shards_without_records_fail_fast(tmp_path, kind):
    path = str(tmp_path / f"{kind}.tar")
    if kind == "empty":
        tarfile.open(path, "w").close()
    else:
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(100_000))
    message = _consume(data_config(source="tar", shards=path))
    assert "no record in any of the 1 shard(s)" in message and path in message


def test_tfrecord_shard_gone_during_the_run_fails_fast(tmp_path):
    # Past the decode stage's ignore_errors, tf.data retried the failed open forever.
    files = write_shards(make_samples(8), str(tmp_path / "rec"), fmt="tfrecord", shard_size=4)
    message = _consume(
        data_config(source="tfrecord", shards=" ".join(files), shuffle_buffer=8),
        after_build=lambda: os.remove(files[1]),
        max_batches=10,
    )
    assert message.startswith(f"cannot read TFRecord file {files[1]}"), message


def test_only_undecodable_samples_fail_fast(tmp_path):
    path = str(tmp_path / "bad.tar")
    _bad_samples_tar(path)
    message = _consume(data_config(source="tar", shards=path, shuffle_buffer=16))
    assert message.startswith("no usable sample in") and path in message


@pytest.mark.slow
def test_directory_and_unreadable_shards_are_one_line_errors(tmp_path):
    (tmp_path / "dir.tar").mkdir()
    with pytest.raises(ValueError, match="is a directory, not a shard file"):
        shards.resolve_files(str(tmp_path / "dir.tar"))
    # /tmp itself is searchable by everyone; pytest's tmp_path parents are not.
    base = pathlib.Path(tempfile.mkdtemp(prefix="clip_jax_perm_"))
    try:
        open_dir, closed_dir = base / "open", base / "closed"
        open_dir.mkdir()
        closed_dir.mkdir()
        for folder in (open_dir, closed_dir):
            _bad_samples_tar(str(folder / "x.tar"), n=1)
        (open_dir / "x.tar").chmod(0)
        base.chmod(0o755)
        open_dir.chmod(0o755)
        closed_dir.chmod(0o700)
        cases = [
            (str(open_dir / "x.tar"), "permission denied: shards file"),
            (str(closed_dir / "x.tar"), "permission denied: cannot reach"),
            (str(closed_dir / "*.tar"), "permission denied: cannot list"),
        ]
        # One child process checks every case (each start costs a few seconds of imports).
        code = (
            "import sys; from clip_jax.data import shards\n"
            "for spec in sys.argv[1:]:\n"
            "    try:\n        shards.resolve_files(spec); print('resolved', spec)\n"
            "    except ValueError as e:\n        print(e)\n"
        )
        cmd = [sys.executable, "-c", code, *(spec for spec, _ in cases)]
        if os.geteuid() == 0:  # root reads anything: check as an unprivileged user
            if shutil.which("setpriv") is None:
                pytest.skip("needs setpriv to drop root privileges")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == len(cases), proc.stdout  # one-line errors
        for line, (spec, message) in zip(lines, cases):
            assert line.startswith(message), (spec, line)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _train_cli(workdir, shard, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clip_jax.train",
            "--config",
            str(REPO / "configs/clip.py:tiny"),
            "--workdir",
            str(workdir),
            "--config.batch_size=8",
            "--config.data.source=tar",
            f"--config.data.shards={shard}",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_train_cli_empty_shard_is_one_line_error(tmp_path):
    path = tmp_path / "empty.tar"
    tarfile.open(path, "w").close()
    out, _ = _train_cli(tmp_path / "w", path).communicate(timeout=300)
    errors = [line for line in out.splitlines() if "clip_jax.train: error" in line]
    assert len(errors) == 1 and "no record in any" in errors[0], out[-3000:]
    assert "Traceback" not in out


@pytest.mark.slow
def test_sigterm_while_waiting_for_data_exits_cleanly(tmp_path):
    path = tmp_path / "bad.tar"
    _bad_samples_tar(str(path))
    # A huge shuffle block: the watch would take minutes to give up, so the run is waiting.
    proc = _train_cli(tmp_path / "w", path, "--config.data.shuffle_buffer=5000000")
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if "waiting for the first batch" in line or time.time() > deadline:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received while waiting for data" in out


def _jpeg(seed, size=32):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("split", ["train", "eval"])
def test_truncated_jpeg_is_named_once(tmp_path, caplog, split):
    """libjpeg's 'Premature end of JPEG data' does not say which sample; the pipeline logs the
    key of a truncated JPEG, once however often the sample comes around, and skips it."""
    from clip_jax.data.pipeline import build_eval_dataset

    members = []
    for i in range(12):
        data = _jpeg(i)
        if i == 5:
            data = data[: len(data) // 2]
        if i == 7:  # trailing bytes after the end marker are not damage
            data = data + b"\x00" * 10
        members += [(f"s{i:03d}.jpg", data), (f"s{i:03d}.txt", b"a caption")]
    path = str(tmp_path / "mixed.tar")
    _write_tar(path, members)
    caplog.set_level("WARNING")
    if split == "train":
        ds = build_train_dataset(
            data_config(source="tar", shards=path),
            image_size=8,
            tokenizer=TOK,
            context_length=8,
            local_batch_size=4,
            seed=0,
        )
        batches = list(ds.take(9).as_numpy_iterator())  # 36 samples: three epochs of 11
        from clip_jax.data import num_skipped

        assert num_skipped(batches[-1]["position"], 36) == 3  # s005 skipped in each epoch
    else:
        ds = build_eval_dataset(
            {"source": "tar", "shards": path},
            image_size=8,
            tokenizer=TOK,
            context_length=8,
            batch_size=4,
        )
        batches = list(ds.as_numpy_iterator())
        assert sum(int(b["mask"].sum()) for b in batches) == 11
    named = [r.getMessage() for r in caplog.records if "truncated JPEG" in r.getMessage()]
    assert len(named) == 1 and "'s005'" in named[0], named
