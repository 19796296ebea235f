"""Train/eval pipeline: exact resume, per-process split, determinism, bad samples, eval once."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
from data_samples import (
    FakeTokenizer,
    add_members,
    captions_of,
    data_config,
    jpeg_bytes,
    take,
    write_dataset,
)

from clip_jax.data import ordering
from clip_jax.data.pipeline import build_eval_dataset, build_train_dataset

TOK = FakeTokenizer()
SIZE, CTX, BATCH = 16, 16, 8


def _train(cfg, seed=0, start=None, pi=0, pc=1, batch=BATCH):
    return build_train_dataset(
        cfg,
        image_size=SIZE,
        tokenizer=TOK,
        context_length=CTX,
        local_batch_size=batch,
        seed=seed,
        process_index=pi,
        process_count=pc,
        start_position=start,
    )


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _check_resume(cfg, n=4):
    full = take(_train(cfg, seed=3), 2 * n)
    first = take(_train(cfg, seed=3), n)
    _assert_same(first, full[:n])
    resumed = take(_train(cfg, seed=3, start=first[-1]["position"]), n)
    _assert_same(resumed, full[n:])
    return full


@pytest.mark.parametrize("fmt", ["tar", "tfrecord"])
def test_exact_resume(tmp_path, fmt):
    # 90 records, 3 shards, block shuffle of 16: 8 batches of 8 cross blocks and an epoch edge.
    pattern, captions = write_dataset(tmp_path, n=90, shard_size=30, fmt=fmt)
    full = _check_resume(data_config(source=fmt, shards=pattern), n=6)
    assert full[0]["image"].shape == (BATCH, SIZE, SIZE, 3) and full[0]["image"].dtype == np.uint8
    assert full[0]["text"].shape == (BATCH, CTX) and full[0]["text"].dtype == np.int32
    seen = captions_of(full)
    assert set(seen) <= set(captions)
    # The first epoch (90 records) lies within the first 96 outputs: order is shuffled, not raw.
    assert seen[:10] != captions[:10]
    # Single source: position = [records of the source, mixed records], equal, counting up.
    positions = np.stack([b["position"] for b in full])
    np.testing.assert_array_equal(positions[:, 0], positions[:, 1])
    np.testing.assert_array_equal(positions[:, 1], BATCH * np.arange(1, len(full) + 1))


def test_exact_resume_mixture_and_resample(tmp_path):
    tar_pattern, tar_caps = write_dataset(tmp_path, n=60, shard_size=20, fmt="tar", prefix="a")
    rec_pattern, rec_caps = write_dataset(tmp_path, n=40, shard_size=20, fmt="tfrecord", prefix="b")
    cfg = data_config(
        resample=True,
        sources=(
            {"source": "tar", "shards": tar_pattern, "weight": 3.0},
            {"source": "tfrecord", "shards": rec_pattern, "weight": 1.0},
        ),
    )
    full = _check_resume(cfg, n=5)
    positions = np.stack([b["position"] for b in full])
    assert positions.shape == (10, 3)
    # Per-source counts add up to the mixed count, and both sources were used ~3:1.
    np.testing.assert_array_equal(positions[:, 0] + positions[:, 1], positions[:, 2])
    assert positions[-1, 0] > positions[-1, 1] > 0
    seen = captions_of(full)
    assert {c.split()[0] for c in seen} == {"a", "b"}


def test_process_split_disjoint_and_complete(tmp_path):
    pattern, captions = write_dataset(tmp_path, n=80, shard_size=20, fmt="tar")
    cfg = data_config(source="tar", shards=pattern)
    per_process = []
    for pi in range(2):
        # 40 records per process; 12 batches of 8 = 2.4 epochs: every own record shows up.
        per_process.append(set(captions_of(take(_train(cfg, pi=pi, pc=2), 12))))
    assert per_process[0].isdisjoint(per_process[1])
    assert per_process[0] | per_process[1] == set(captions)
    assert len(per_process[0]) == len(per_process[1]) == 40
    with pytest.raises(ValueError, match="shard"):
        _train(cfg, pi=0, pc=5)  # 4 shards for 5 processes


def test_determinism_and_seed(tmp_path):
    pattern, _ = write_dataset(tmp_path, n=60, shard_size=20, fmt="tar")
    cfg = data_config(source="tar", shards=pattern)
    a = take(_train(cfg, seed=7), 3)
    b = take(_train(cfg, seed=7), 3)
    _assert_same(a, b)
    c = take(_train(cfg, seed=8), 3)
    assert captions_of(a) != captions_of(c)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def _write_bad_shard(path, rng):
    """12 sample groups: g0, g1 (.txt), six bad ones, g2..g5 (.json captions)."""
    jpeg = jpeg_bytes(rng)
    with tarfile.open(path, "w") as tar:
        for k in ("g0", "g1"):
            add_members(tar, [(f"{k}.jpg", jpeg_bytes(rng)), (f"{k}.txt", f"good {k}".encode())])
        add_members(
            tar,
            [
                ("b0.jpg", jpeg[: len(jpeg) // 2]),
                ("b0.txt", b"truncated jpeg"),
                ("b1.jpg", rng.bytes(300)),
                ("b1.txt", b"random bytes"),
                ("b2.jpg", jpeg_bytes(rng)),
                ("b2.txt", b"   "),  # empty caption
                ("b3.txt", b"caption but no image"),  # missing image
                ("b4.jpg", jpeg_bytes(rng)),  # missing caption
                ("b5.jpg", jpeg[:200] + rng.bytes(400) + jpeg[600:]),
                ("b5.txt", b"corrupt middle"),
            ],
        )
        for k in ("g2", "g3", "g4", "g5"):
            add_members(
                tar,
                [
                    (f"{k}.jpg", jpeg_bytes(rng)),
                    (f"{k}.json", b'{"caption": "good %s"}' % k.encode()),
                ],
            )


GOOD = ["good g0", "good g1", "good g2", "good g3", "good g4", "good g5"]


def test_bad_samples_skipped_and_counted(tmp_path):
    path = os.path.join(str(tmp_path), "bad.tar")
    _write_bad_shard(path, np.random.default_rng(0))
    ev = list(
        build_eval_dataset(
            {"source": "tar", "shards": path},
            image_size=SIZE,
            tokenizer=TOK,
            context_length=CTX,
            batch_size=4,
        ).as_numpy_iterator()
    )
    got = [c.decode() for b in ev for c, m in zip(b["caption"], b["mask"]) if m]
    assert got == GOOD  # every good sample, in shard order, nothing else
    # Train without shuffling: raw order g0 g1 b0..b5 g2..g5, 12 groups per epoch.
    # Batches: [g0 g1 g2 g3] ends at raw 10; [g4 g5 g0 g1] at 12+2; [g2..g5] at 24.
    cfg = data_config(source="tar", shards=path, shuffle_buffer=0)
    batches = take(_train(cfg, batch=4), 3)
    assert captions_of(batches) == GOOD[:4] + GOOD[4:] + GOOD[:2] + GOOD[2:]
    assert [int(b["position"][-1]) for b in batches] == [10, 14, 24]
    assert ordering.num_skipped(batches[-1]["position"], 12) == 12  # 6 bad x 2 epochs
    with pytest.raises(ValueError):
        ordering.num_skipped(batches[-1]["position"], 25)


def test_eval_every_sample_once(tmp_path):
    pattern, captions = write_dataset(tmp_path, n=45, shard_size=10, fmt="tar", labels=True)
    seen = []
    for pi in range(2):
        ds = build_eval_dataset(
            {"source": "tar", "shards": pattern},
            image_size=SIZE,
            tokenizer=TOK,
            context_length=CTX,
            batch_size=8,
            process_index=pi,
            process_count=2,
            num_batches=4,
        )
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == 4  # 22 or 23 samples -> 3 batches, padded to 4
        for b in batches:
            assert b["image"].shape == (8, SIZE, SIZE, 3) and b["mask"].shape == (8,)
            assert not b["image"][~b["mask"]].any()
            caps = [c.decode() for c in b["caption"][b["mask"]]]
            assert caps == [TOK.decode(r) for r in b["text"][b["mask"]]]
            labels = b["label"][b["mask"]]
            assert [int(c.split()[1]) % 5 for c in caps] == labels.tolist()
            seen += caps
    assert sorted(seen) == sorted(captions)
    with pytest.raises(Exception, match="num_batches"):
        list(
            build_eval_dataset(
                {"source": "tar", "shards": pattern},
                image_size=SIZE,
                tokenizer=TOK,
                context_length=CTX,
                batch_size=8,
                num_batches=2,
            ).as_numpy_iterator()
        )


def test_windowed_decode_gives_the_same_batches_below_2x(tmp_path):
    # 20-32 px JPEGs cropped to 16 px are < 2x the target: "window" decodes only the crop, with
    # pixels identical to decoding the whole image; "auto" picks "full" for them.
    from clip_jax.data import pipeline

    pattern, _ = write_dataset(tmp_path, n=40, shard_size=20, fmt="tar")
    full = take(_train(data_config(source="tar", shards=pattern, decode="full")), 3)
    window = take(_train(data_config(source="tar", shards=pattern, decode="window")), 3)
    _assert_same(full, window)
    spec = pipeline.config_lib.source_specs(data_config(source="tar", shards=pattern))[0]
    files = pipeline._shard_files(spec)
    assert not pipeline.use_windowed_decode({"decode": "auto"}, spec, files, SIZE)
    assert pipeline.use_windowed_decode({"decode": "auto"}, spec, files, 8)


def test_small_images_hint_comes_from_the_peeked_shapes(tmp_path):
    # 16-32 px JPEGs: every peeked image fits the one-op resize, so the pipeline skips the
    # per-image size test (a speed hint only: same pixels either way, see test_transforms).
    from clip_jax.data import pipeline, transforms

    pattern, _ = write_dataset(tmp_path, n=20, shard_size=20, fmt="tfrecord")
    spec = pipeline.config_lib.source_specs(data_config(source="tfrecord", shards=pattern))[0]
    shapes = pipeline._peek_jpeg_shapes(spec, pipeline._shard_files(spec))
    assert len(shapes) == 8 and all(16 <= min(s) and max(s) <= 32 for s in shapes)
    assert pipeline.small_images([shapes])
    assert pipeline.small_images([shapes, [(9, 9)]])
    assert not pipeline.small_images([shapes, []])  # a source that could not be peeked
    big = int(transforms._ONE_OP_MAX_PIXELS**0.5) + 1
    assert not pipeline.small_images([shapes + [(big, big)]])
