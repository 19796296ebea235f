"""TFDS splits stored as TFRecords, read like `source: tfrecord` shards (`sources.tfds_shards`):
the same records and keys as TFDS's own reader, exact and constant-time resume from the
metadata's shard lengths, and TFDS's reader where the fast path does not apply."""

from __future__ import annotations

import contextlib
import io
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from data_samples import FakeTokenizer, captions_of, data_config, make_samples, take

from clip_jax.data import ordering, shard_counts, sources
from clip_jax.data.make_shards import write_shards
from clip_jax.data.pipeline import build_train_dataset

TOK = FakeTokenizer()
SIZE, CTX, BATCH = 8, 12, 4
SHARDS, PER_SHARD = 24, 5


@pytest.fixture(scope="module")
def tfds_view(tmp_path_factory):
    """24 TFRecord shards of 5 records (our layout: `image/encoded`, `text`,
    `image/class/label`) presented as a prepared TFDS dataset version folder."""
    from etils import epath
    from tensorflow_datasets.core import naming

    root = str(tmp_path_factory.mktemp("tfds_view"))
    written = write_shards(
        make_samples(SHARDS * PER_SHARD, prefix="v", labels=True),
        os.path.join(root, "records"),
        fmt="tfrecord",
        shard_size=PER_SHARD,
    )
    folder = os.path.join(root, "view", "1.0.0")
    os.makedirs(folder)
    for i, path in enumerate(sorted(written)):
        os.replace(path, os.path.join(folder, f"view-train.tfrecord-{i:05d}-of-{SHARDS:05d}"))
    template = naming.ShardedFileTemplate(
        data_dir=epath.Path(folder),
        template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name="view",
        filetype_suffix="tfrecord",
    )
    features = tfds.features.FeaturesDict(
        {
            "image": {
                "encoded": tfds.features.Image(shape=(None, None, 3)),
                "class": {"label": tfds.features.ClassLabel(num_classes=5)},
            },
            "text": tfds.features.Text(),
        }
    )
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its progress
        tfds.folder_dataset.write_metadata(
            data_dir=folder,
            features=features,
            split_infos=tfds.folder_dataset.compute_split_info(filename_template=template),
            filename_template=template,
        )
    return folder


def _source(folder, **overrides):
    spec = dict(
        name="",
        split="train",
        data_dir=folder,
        image_key="image/encoded",
        text_key="text",
        label_key="image/class/label",
        label_template="{}",
    )
    spec.update(overrides)
    return spec


def _fast_records(shards: sources.TfdsShards) -> list[tuple]:
    count = shard_counts.ShardCounter("tfrecord")
    read = shards.reader(lambda path: np.int64(count.count(path.decode())))
    ds = tf.data.Dataset.from_tensor_slices(list(shards.files)).flat_map(lambda p: read(p, 0))
    out = []
    for block in ds.batch(7).map(shards.parse).as_numpy_iterator():
        out += zip(block["key"], block["text"], block["label"], block["image"])
    return out


def _tfds_records(folder, **overrides) -> list[tuple]:
    spec = _source(folder, **overrides)
    ds = sources.tfds_records(
        **spec, shuffle_files=False, seed=0, process_index=0, process_count=1, repeat=False
    )
    return [(r["key"], r["text"], r["label"], r["image"]) for r in ds.as_numpy_iterator()]


@pytest.mark.parametrize("split", ["train", "train[7:93]"])
def test_same_records_and_keys_as_tfds_reader(tfds_view, split):
    shards, why = sources.tfds_shards(**_source(tfds_view, split=split))
    assert shards is not None, why
    assert sum(shards.counts) == (SHARDS * PER_SHARD if split == "train" else 86)
    fast = _fast_records(shards)
    assert len(fast) == sum(shards.counts)
    assert sorted(fast) == sorted(_tfds_records(tfds_view, split=split))
    # The decoder is chosen from the first images, as for TFRecord shards.
    first = [image for _, _, _, image in fast[:3]]
    assert shards.first_images(3) == first
    first_file = os.path.basename(shards.files[0])
    assert fast[0][0] == f"{first_file}__{shards.skips[0]}".encode()  # TFDS's tfds_id


def _train(folder, start=None, process_index=0, process_count=1, **overrides):
    cfg = data_config(
        source="tfds",
        tfds_data_dir=folder,
        image_key="image/encoded",
        text_key="text",
        shard_cycle_length=2,
        shuffle_buffer=6,
        **overrides,
    )
    return build_train_dataset(
        cfg,
        image_size=SIZE,
        tokenizer=TOK,
        context_length=CTX,
        local_batch_size=BATCH,
        seed=5,
        start_position=start,
        process_index=process_index,
        process_count=process_count,
    )


def test_train_resume_is_exact_and_reads_no_consumed_file(tfds_view, tmp_path):
    full = take(_train(tfds_view), 36)  # 144 samples: more than one epoch of 120
    assert set(captions_of(full)) == {f"v {i}" for i in range(SHARDS * PER_SHARD)}
    for k in (1, 7, 29):
        resumed = take(_train(tfds_view, start=full[k - 1]["position"]), 3)
        for a, b in zip(resumed, full[k : k + 3]):
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{k} {name}")

    # Position 64 lies in group 6 (groups of 2 shards, 10 records): in a copy of the dataset
    # whose 12 files of groups 0-5 are empty, the resume there gives the same batches, so the
    # resume point came from the metadata alone and no consumed file was read.
    plan = ordering.ShardPlan(SHARDS, seed=[5, 0, 0, 1], cycle_length=2, resample=False)
    names = sorted(f for f in os.listdir(tfds_view) if ".tfrecord-" in f)
    consumed = {names[i] for g in range(6) for i in plan.group(g)}
    assert len(consumed) == 12
    copy = _copy(tfds_view, tmp_path / "1.0.0", empty=consumed)
    position = full[15]["position"]
    assert int(position[0]) - 6 < 64 <= int(position[0])  # a block of 6 raw records ahead
    resumed = take(_train(copy, start=position), 2)
    for a, b in zip(resumed, full[16:18]):
        np.testing.assert_array_equal(a["text"], b["text"])
    # A fresh start reads them: the copy is not the same dataset.
    assert set(captions_of(take(_train(copy), 20))) != set(captions_of(full[:20]))


def _copy(folder, to, empty=(), missing=(), cut=()):
    """`folder` linked file by file into `to`, with the named files empty, missing or cut in
    the middle of a record."""
    os.makedirs(to)
    for name in os.listdir(folder):
        src, dst = os.path.join(folder, name), os.path.join(str(to), name)
        if name in missing:
            continue
        if name in empty or name in cut:
            data = open(src, "rb").read()
            with open(dst, "wb") as f:
                f.write(b"" if name in empty else data[: len(data) // 2])
        else:
            os.symlink(src, dst)
    return str(to)


def test_missing_file_is_an_error_at_start(tfds_view, tmp_path):
    copy = _copy(tfds_view, tmp_path / "1.0.0", missing={"view-train.tfrecord-00003-of-00024"})
    with pytest.raises(ValueError, match="1 of the 24 files of split 'train' are missing"):
        _train(copy)


def test_damaged_file_is_read_up_to_the_damage(tfds_view, tmp_path, caplog):
    copy = _copy(tfds_view, tmp_path / "1.0.0", cut={"view-train.tfrecord-00000-of-00024"})
    with caplog.at_level(logging.WARNING):
        seen = set(captions_of(take(_train(copy), 30)))  # one epoch: 120 - 3 records
    assert "truncated after 2 records" in caplog.text
    assert {"v 0", "v 1"} <= seen and not {"v 2", "v 3", "v 4"} & seen
    assert {f"v {i}" for i in range(5, 120)} <= seen


def test_fewer_files_than_processes_falls_back_to_tfds_reader(tfds_view, caplog):
    # "train[:8]" lies in 2 files: 3 processes need TFDS's per-record split.
    seen = set()
    with caplog.at_level(logging.INFO):
        for pi in range(3):
            batches = take(
                _train(tfds_view, split="train[:8]", process_index=pi, process_count=3), 1
            )
            seen |= set(captions_of(batches))
    assert "read through TFDS (2 files for 3 processes)" in caplog.text
    assert seen <= {f"v {i}" for i in range(8)}


def test_non_scalar_feature_uses_tfds_reader(tfds_view):
    # The decoded image's shape is (None, None, 3), but the stored one is a scalar string; an
    # int64 feature named as the image cannot be read as one.
    shards, why = sources.tfds_shards(**_source(tfds_view, image_key="image/class/label"))
    assert shards is None and "image/class/label" in why
