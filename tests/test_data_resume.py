"""Constant-time resume: the shard-group plan, per-shard counts, and what a resume opens."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_samples import FakeTokenizer, data_config, make_samples, take

from clip_jax.data import ordering, pipeline, shard_counts, tar_shards
from clip_jax.data.make_shards import write_shards
from clip_jax.data.pipeline import build_train_dataset

TOK = FakeTokenizer()
SIZE, CTX, BATCH = 8, 12, 4


def _train(cfg, start=None, index_dir=""):
    return build_train_dataset(
        cfg,
        image_size=SIZE,
        tokenizer=TOK,
        context_length=CTX,
        local_batch_size=BATCH,
        seed=5,
        start_position=start,
        index_dir=index_dir,
    )


def _write_uneven(tmp_path, sizes, fmt):
    """One shard per entry of `sizes` (0 = an empty shard); returns the file list."""
    out = os.path.join(str(tmp_path), fmt)
    paths, offset = [], 0
    for i, n in enumerate(sizes):
        samples = make_samples(n, seed=i, prefix=f"f{i}x") if n else []
        ext = "tfrecord" if fmt == "tfrecord" else "tar"
        path = os.path.join(out, f"{i:05d}.{ext}")
        if n:
            written = write_shards(samples, os.path.join(out, f"tmp{i}"), fmt=fmt, shard_size=n)
            os.replace(written[0], path)
        else:
            os.makedirs(out, exist_ok=True)
            if fmt == "tar":
                import tarfile

                tarfile.open(path, "w").close()
            else:
                open(path, "wb").close()
        paths.append(path)
        offset += n
    return paths


def _simulate(plan, sizes, n):
    """The first `n` raw records (file, record) by literal round-robin over groups."""
    out, g = [], 0
    while len(out) < n:
        files = plan.group(g)
        left = [sizes[f] for f in files]
        taken = [0] * len(files)
        while any(t < s for t, s in zip(taken, left)):
            for i, f in enumerate(files):
                if taken[i] < left[i]:
                    out.append((f, taken[i]))
                    taken[i] += 1
        g += 1
    return out[:n]


@pytest.mark.parametrize("resample", [False, True])
def test_resume_point_matches_round_robin(resample):
    sizes = [7, 0, 13, 4, 9, 1, 0, 5]
    plan = ordering.ShardPlan(len(sizes), seed=[1, 2], cycle_length=3, resample=resample)
    order = _simulate(plan, sizes, 200)
    for pos in range(0, 150, 7):
        g, slots, starts = plan.resume_point(pos, lambda f: sizes[f])
        # Continuing the round-robin from the rotated group gives the rest of the order.
        rest, taken = [], list(starts)
        while any(t < sizes[f] for t, f in zip(taken, slots)):
            for i, f in enumerate(slots):
                if taken[i] < sizes[f]:
                    rest.append((f, taken[i]))
                    taken[i] += 1
        assert rest == order[pos : pos + len(rest)], pos
        assert sorted(slots) == sorted(plan.group(g))


def test_resume_point_rejects_all_empty():
    plan = ordering.ShardPlan(3, seed=[0], cycle_length=2, resample=False)
    with pytest.raises(ValueError, match="empty"):
        plan.resume_point(5, lambda f: 0)


@pytest.mark.parametrize("fmt", ["tar", "tfrecord"])
def test_exact_resume_uneven_and_empty_shards(tmp_path, fmt):
    # Shards of unequal sizes, two empty; groups of 3 shards; blocks of 5 records.
    paths = _write_uneven(tmp_path, [7, 0, 13, 4, 9, 1, 0, 5], fmt)
    cfg = data_config(source=fmt, shards=" ".join(paths), shard_cycle_length=3, shuffle_buffer=5)
    full = take(_train(cfg), 24)  # 96 samples: more than two epochs of 39 records
    for k in (1, 5, 9, 13, 20):
        resumed = take(_train(cfg, start=full[k - 1]["position"]), 3)
        for a, b in zip(resumed, full[k : k + 3]):
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{k} {name}")


def test_resume_opens_only_the_shards_in_flight(tmp_path, monkeypatch):
    # 60 shards of 6 records, read 2 at a time (12 records a group): position 152 lies in
    # group 12. Shards of groups 0-11 must not be opened, with the count cache in place.
    out = os.path.join(str(tmp_path), "many")
    files = write_shards(make_samples(360, prefix="m"), out, fmt="tar", shard_size=6)
    # The pipeline peeks at 8 JPEG headers of the list's first shard to choose its decoder and
    # resize (a constant cost at any position); that peek is stubbed out so that `opened` holds
    # the reader's opens only.
    monkeypatch.setattr(pipeline, "_peek_jpeg_shapes", lambda spec, files, n=8, tfds_split=None: [])
    cfg = data_config(
        source="tar",
        shards=os.path.join(out, "*.tar"),
        shard_cycle_length=2,
        shuffle_buffer=0,
        decode="full",
    )
    index_dir = os.path.join(str(tmp_path), "index")
    first = take(_train(cfg, index_dir=index_dir), 40)  # reads shards through: counts cached
    assert os.path.isfile(os.path.join(index_dir, "shard_counts.jsonl"))
    plan = ordering.ShardPlan(len(files), seed=[5, 0, 0, 1], cycle_length=2, resample=False)
    consumed = {files[i] for g in range(12) for i in plan.group(g)}
    assert len(consumed) == 24

    opened = []
    real_open = tar_shards.open_shard
    monkeypatch.setattr(tar_shards, "open_shard", lambda p: opened.append(p) or real_open(p))
    resumed = take(_train(cfg, start=first[37]["position"], index_dir=index_dir), 2)
    np.testing.assert_array_equal(resumed[0]["text"], first[38]["text"])
    np.testing.assert_array_equal(resumed[1]["text"], first[39]["text"])
    assert opened and not consumed & set(opened)

    # Without the cache the consumed shards are counted once (headers only), then cached.
    opened.clear()
    fresh_index = os.path.join(str(tmp_path), "index2")
    take(_train(cfg, start=first[37]["position"], index_dir=fresh_index), 1)
    assert consumed <= set(opened)
    opened.clear()
    take(_train(cfg, start=first[37]["position"], index_dir=fresh_index), 1)
    assert opened and not consumed & set(opened)


def test_counts_match_reader_on_damaged_shards(tmp_path):
    out = os.path.join(str(tmp_path), "dmg")
    (tar_path,) = write_shards(make_samples(10, prefix="t"), out, fmt="tar", shard_size=10)
    (rec_path,) = write_shards(make_samples(10, prefix="r"), out, fmt="tfrecord", shard_size=10)
    for path in (tar_path, rec_path):
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: int(len(data) * 0.55)])  # cut inside a record
    tar_n = shard_counts.ShardCounter("tar").count(tar_path)
    assert tar_n == sum(len(b["key"]) for b in tar_shards.iter_tar_blocks(tar_path))
    assert 0 < tar_n < 10
    rec_n = shard_counts.count_tfrecord_records(rec_path)
    import tensorflow as tf

    good = 0
    try:
        for _ in tf.data.TFRecordDataset(rec_path):
            good += 1
    except tf.errors.DataLossError:
        pass
    assert rec_n == good and 0 < rec_n < 10
    # The pipeline reads the damaged TFRecord up to the damage instead of failing.
    cfg = data_config(source="tfrecord", shards=rec_path, shuffle_buffer=0)
    batches = take(_train(cfg), 4)
    assert len(batches) == 4


def test_tar_stream_reads_in_the_interleave_order(tmp_path):
    # The one-generator tar reader must produce exactly what tf.data's deterministic interleave
    # over per-shard readers does (the order the resume arithmetic was checked against).
    from clip_jax.data import sources

    paths = _write_uneven(tmp_path, [7, 0, 13, 4, 9, 1, 0, 5], "tar")
    plan = ordering.ShardPlan(len(paths), seed=[3], cycle_length=3, resample=False)
    for position in (0, 11, 40):
        g, slots, starts = plan.resume_point(position, lambda i: [7, 0, 13, 4, 9, 1, 0, 5][i])
        ours = sources.tar_stream(
            paths, plan, start_group=g, first_slots=slots, first_starts=starts
        ).unbatch()
        theirs = sources.read_groups(
            paths,
            plan,
            lambda p, s: sources.tar_shard_dataset(p, "caption", s),
            start_group=g,
            first_slots=slots,
            first_starts=starts,
            num_parallel_calls=-1,
        )
        a = [r["key"] for r in ours.take(60).as_numpy_iterator()]
        b = [r["key"] for r in theirs.take(60).as_numpy_iterator()]
        assert a == b and len(a) == 60, position


def test_tar_resume_seeks_to_recorded_sample_offsets(tmp_path, monkeypatch):
    # Every 2nd sample's byte offset is noted while the first run reads the shards through (and
    # cached in index_dir); resumed runs seek to the nearest one instead of walking headers,
    # with exactly the uninterrupted run's batches.
    monkeypatch.setattr(tar_shards, "SEEK_EVERY", 2)
    hints = []
    real_hint = shard_counts.ShardCounter.seek_hint

    def seek_hint(self, path, start):
        hint = real_hint(self, path, start)
        hints.append(hint)
        return hint

    monkeypatch.setattr(shard_counts.ShardCounter, "seek_hint", seek_hint)
    paths = _write_uneven(tmp_path, [7, 0, 13, 4, 9, 1, 0, 5], "tar")
    cfg = data_config(source="tar", shards=" ".join(paths), shard_cycle_length=3, shuffle_buffer=5)
    index_dir = str(tmp_path / "index")
    full = take(_train(cfg, index_dir=index_dir), 24)
    with open(os.path.join(index_dir, "shard_counts.jsonl"), encoding="utf-8") as f:
        assert any('"offsets"' in line for line in f)
    hints.clear()
    for k in (5, 9, 13, 20):
        resumed = take(_train(cfg, start=full[k - 1]["position"], index_dir=index_dir), 3)
        for a, b in zip(resumed, full[k : k + 3]):
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{k} {name}")
    assert any(h is not None and h[0] > 0 for h in hints)
