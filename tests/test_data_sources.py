"""Sources: shard patterns, TFDS, image folders, demo lookup, config validation, make_shards."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_samples import (
    FakeTokenizer,
    captions_of,
    data_config,
    jpeg_bytes,
    png_bytes,
    take,
    write_dataset,
)
from PIL import Image

from clip_jax.data import config as config_lib
from clip_jax.data import make_shards, shards
from clip_jax.data.pipeline import build_eval_dataset, build_train_dataset, image_folder_classnames

TOK = FakeTokenizer()
SIZE, CTX = 16, 16


def _eval_all(spec, **kw):
    ds = build_eval_dataset(
        spec,
        image_size=SIZE,
        tokenizer=TOK,
        context_length=CTX,
        batch_size=kw.pop("batch_size", 8),
        **kw,
    )
    return list(ds.as_numpy_iterator())


def _valid(batches, field):
    return [x for b in batches for x, m in zip(b[field], b["mask"]) if m]


# ---------------------------------------------------------------- shard patterns
def test_expand_braces_and_resolve(tmp_path):
    assert shards.expand_braces("d/{00008..00011}.tar") == [
        "d/00008.tar",
        "d/00009.tar",
        "d/00010.tar",
        "d/00011.tar",
    ]
    assert shards.expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    with pytest.raises(ValueError, match="brace"):
        shards.expand_braces("{5..3}.tar")
    with pytest.raises(ValueError, match="unbalanced"):
        shards.expand_braces("{00..03.tar")
    for name in ("00000.tar", "00001.tar", "00002.tar", "x.tfrecord"):
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path)
    got = shards.resolve_files([f"{d}/{{00000..00001}}.tar", f"{d}/*.tfrecord"])
    assert [os.path.basename(p) for p in got] == ["00000.tar", "00001.tar", "x.tfrecord"]
    got = shards.resolve_files(f"{d}/*.tar; {d}/00000.tar")  # duplicates removed, order kept
    assert [os.path.basename(p) for p in got] == ["00000.tar", "00001.tar", "00002.tar"]
    with pytest.raises(ValueError, match="does not exist"):
        shards.resolve_files(f"{d}/{{00000..00005}}.tar")
    with pytest.raises(ValueError, match="matches no file"):
        shards.resolve_files(f"{d}/*.tar.gz")
    with pytest.raises(ValueError, match="empty"):
        shards.resolve_files("")
    assert shards.split_for_process(list("abcde"), 1, 2) == ["b", "d"]
    with pytest.raises(ValueError, match="3 shard"):
        shards.split_for_process(list("abc"), 0, 4)


def test_missing_shards_fail_at_build_time(tmp_path):
    cfg = data_config(source="tar", shards=str(tmp_path / "nope-{0..3}.tar"))
    with pytest.raises(ValueError, match="does not exist"):
        build_train_dataset(
            cfg, image_size=SIZE, tokenizer=TOK, context_length=CTX, local_batch_size=4, seed=0
        )
    with pytest.raises(ValueError, match="tfds_data_dir"):
        build_eval_dataset(
            {"source": "tfds", "tfds_name": "x", "tfds_data_dir": ""},
            image_size=SIZE,
            tokenizer=TOK,
            context_length=CTX,
            batch_size=4,
        )
    with pytest.raises(ValueError, match="does not exist"):
        build_eval_dataset(
            {"source": "tfds", "tfds_name": "x", "tfds_data_dir": str(tmp_path / "missing")},
            image_size=SIZE,
            tokenizer=TOK,
            context_length=CTX,
            batch_size=4,
        )


def test_gzipped_tar_and_truncated_shard(tmp_path):
    pattern, captions = write_dataset(tmp_path, n=30, shard_size=15, fmt="tar", gzip=True)
    assert pattern.endswith(".tar.gz")
    got = _valid(_eval_all({"source": "tar", "shards": pattern}), "caption")
    assert sorted(c.decode() for c in got) == sorted(captions)
    # Cut the second shard in half: the first shard and the head of the second still arrive.
    second = os.path.join(os.path.dirname(pattern), "00001.tar.gz")
    data = open(second, "rb").read()
    open(second, "wb").write(data[: len(data) // 2])
    got = [c.decode() for c in _valid(_eval_all({"source": "tar", "shards": pattern}), "caption")]
    assert set(captions[:15]) <= set(got) and set(got) < set(captions)


# ---------------------------------------------------------------- TFDS
def _examples(n, prefix):
    rng = np.random.default_rng(n)
    return [
        (
            i,
            {
                "image": rng.integers(0, 255, (20, 24, 3), dtype=np.uint8),
                "caption": f"{prefix} {i}",
                "label": i % 3,
            },
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A prepared local TFDS dataset "tiny_captions" (image, caption, label); no download."""
    root = str(tmp_path_factory.mktemp("tfds"))
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["cat", "dog", "red_bird"]),
        }
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_captions",
        version="1.0.0",
        features=features,
        data_dir=root,
        split_datasets={"train": _examples(48, "t"), "test": _examples(10, "v")},
    )
    return root


def test_tfds_train_resume_and_eval(tfds_dir):
    cfg = data_config(source="tfds", tfds_name="tiny_captions", tfds_data_dir=tfds_dir)

    def build(start=None, pi=0, pc=1):
        return build_train_dataset(
            cfg,
            image_size=SIZE,
            tokenizer=TOK,
            context_length=CTX,
            local_batch_size=8,
            seed=1,
            process_index=pi,
            process_count=pc,
            start_position=start,
        )

    full = take(build(), 8)
    first = take(build(), 4)
    resumed = take(build(start=first[-1]["position"]), 4)
    for a, b in zip(first + resumed, full):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert set(captions_of(full)) == {f"t {i}" for i in range(48)}  # 64 draws over 48 samples
    # Per-process eval slices are disjoint and complete; labels come along.
    seen = []
    for pi in range(2):
        b = _eval_all(
            {
                "source": "tfds",
                "split": "test",
                "tfds_name": "tiny_captions",
                "tfds_data_dir": tfds_dir,
                "label_key": "label",
            },
            process_index=pi,
            process_count=2,
        )
        seen += list(zip(_valid(b, "caption"), _valid(b, "label")))
    assert sorted(seen) == sorted((f"v {i}".encode(), i % 3) for i in range(10))


def test_tfds_nested_image_feature(tmp_path):
    """An image feature inside a nested dict (`image/encoded`, the layout of TFRecords read as
    a TFDS dataset) is kept encoded and decoded by the pipeline."""
    features = tfds.features.FeaturesDict(
        {
            "image": {"encoded": tfds.features.Image(shape=(None, None, 3))},
            "text": tfds.features.Text(),
        }
    )
    examples = [
        (i, {"image": {"encoded": ex["image"]}, "text": ex["caption"]})
        for i, ex in _examples(8, "n")
    ]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="nested_captions",
        version="1.0.0",
        features=features,
        data_dir=str(tmp_path),
        split_datasets={"train": examples},
    )
    cfg = data_config(
        source="tfds",
        tfds_name="nested_captions",
        tfds_data_dir=str(tmp_path),
        image_key="image/encoded",
        text_key="text",
    )
    batch = take(
        build_train_dataset(
            cfg, image_size=SIZE, tokenizer=TOK, context_length=CTX, local_batch_size=8, seed=1
        ),
        1,
    )[0]
    assert batch["image"].shape == (8, SIZE, SIZE, 3)
    assert set(captions_of([batch])) <= {f"n {i}" for i in range(8)}  # epochs mix in a block
    assert batch["image"].std() > 0  # decoded pixels, not an empty image


def test_tfds_image_label_captions(tfds_dir):
    b = _eval_all(
        {
            "source": "tfds",
            "split": "test",
            "tfds_name": "tiny_captions",
            "tfds_data_dir": tfds_dir,
            "text_key": "",
            "label_key": "label",
        }
    )
    got = {(c.decode(), int(label)) for c, label in zip(_valid(b, "caption"), _valid(b, "label"))}
    assert got == {
        ("a photo of a cat.", 0),
        ("a photo of a dog.", 1),
        ("a photo of a red bird.", 2),
    }
    with pytest.raises(ValueError, match="no text feature"):
        _eval_all(
            {
                "source": "tfds",
                "split": "test",
                "tfds_name": "tiny_captions",
                "tfds_data_dir": tfds_dir,
                "text_key": "nope",
            }
        )


# ---------------------------------------------------------------- image folder, demo
def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("zebra", 3), ("ant", 2)):
        os.makedirs(tmp_path / cls / "sub")
        for i in range(n):
            (tmp_path / cls / "sub" / f"{i}.png").write_bytes(png_bytes(rng))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    assert image_folder_classnames(str(tmp_path)) == ["ant", "zebra"]
    b = _eval_all({"source": "image_folder", "image_folder": str(tmp_path)}, batch_size=4)
    assert "text" not in b[0]
    assert sorted(_valid(b, "label")) == [0, 0, 1, 1, 1]
    assert sorted(k.decode() for k in _valid(b, "key"))[0] == os.path.join("ant", "sub", "0.png")
    with pytest.raises(ValueError, match="does not exist"):
        image_folder_classnames(str(tmp_path / "missing"))


def test_demo_source():
    with pytest.raises(ValueError, match="demo split"):
        shards.demo_shards("validation")
    # Package data: a missing demo split is a packaging error, so it fails here.
    files = shards.demo_shards("heldout")
    assert all(f.endswith(".tar.gz") and os.path.isfile(f) for f in files)
    b = _eval_all({"source": "demo", "split": "heldout"}, batch_size=64)
    assert len(_valid(b, "caption")) > 0


# ---------------------------------------------------------------- config
def test_config_defaults_and_validation():
    cfg = config_lib.get_default_config()
    assert cfg.source == "demo" and cfg.tokenizer == "clip-bpe"
    config_lib.validate(cfg)
    cfg.tokenizer = "openai"  # every name clip_jax.tokenizers.get accepts
    config_lib.validate(cfg)
    bad = [
        ("source", "s3", "data.source"),
        ("aug_scale", (0.5, 1.2), "data.aug_scale"),
        ("resize_method", "cubic", "data.resize_method"),
        ("tokenizer", "bpe", "tokenizer"),
        ("shuffle_buffer", -1, "shuffle_buffer"),
        ("num_parallel_calls", 0, "num_parallel"),
        ("split", "test", "data.split"),
    ]
    for key, value, message in bad:
        c = config_lib.get_default_config()
        c[key] = value
        with pytest.raises(ValueError, match=message):
            config_lib.validate(c)
    c = config_lib.get_default_config()
    c.source = "tar"
    with pytest.raises(ValueError, match="data.shards"):
        config_lib.validate(c)
    c = config_lib.get_default_config()
    c.sources = ({"source": "tar", "shards": "a.tar", "weight": 0.0},)
    with pytest.raises(ValueError, match=r"sources\[0\].weight"):
        config_lib.validate(c)
    c.sources = ({"source": "tar", "shardz": "a.tar"},)
    with pytest.raises(ValueError, match="unknown key"):
        config_lib.validate(c)


# ---------------------------------------------------------------- make_shards
@pytest.mark.parametrize("fmt", ["tar", "tfrecord"])
def test_make_shards_roundtrip(tmp_path, fmt, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    os.makedirs(images / "a")
    rows = []
    for i in range(7):
        rel = f"a/{i}.png" if i % 2 else f"{i}.jpg"
        arr = rng.integers(0, 255, (18, 22, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / rel)
        rows.append({"image": rel, "caption": f"picture {i}", "label": i % 3})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "names.txt").write_text("x\ny\nz\n")
    out = tmp_path / "out"
    make_shards.main(
        [
            "--images",
            str(images),
            "--captions",
            str(tmp_path / "captions.jsonl"),
            "--format",
            fmt,
            "--shard-size",
            "3",
            "--output",
            str(out),
            "--classnames",
            str(tmp_path / "names.txt"),
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards"] == 3 and summary["samples"] == 7
    suffix = "tar" if fmt == "tar" else "tfrecord"
    assert sorted(os.listdir(out)) == [
        "00000." + suffix,
        "00001." + suffix,
        "00002." + suffix,
        "classnames.txt",
    ]
    assert shards.read_classnames(str(out / "classnames.txt")) == ["x", "y", "z"]
    b = _eval_all({"source": fmt, "shards": f"{out}/{{00000..00002}}.{suffix}"})
    got = sorted(zip([c.decode() for c in _valid(b, "caption")], _valid(b, "label")))
    assert got == [(f"picture {i}", i % 3) for i in range(7)]
    keys = sorted(k.decode() for k in _valid(b, "key"))
    assert keys == [f"{i:09d}" for i in range(7)]
    (tmp_path / "bad.jsonl").write_text('{"image": "missing.jpg", "caption": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1.*does not exist"):
        make_shards.main(
            [
                "--images",
                str(images),
                "--captions",
                str(tmp_path / "bad.jsonl"),
                "--output",
                str(tmp_path / "out2"),
            ]
        )


def test_img2dataset_tfrecord_layout(tmp_path):
    """img2dataset's `--output_format tfrecord` writes `key`/`jpg`/`txt` (+ metadata features)."""
    import tensorflow as tf

    from clip_jax.data.pipeline import build_eval_dataset

    rng = np.random.default_rng(0)
    path = str(tmp_path / "00000.tfrecord")

    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    with tf.io.TFRecordWriter(path) as writer:
        for i in range(5):
            ex = {
                "key": feature(f"{i:09d}".encode()),
                "jpg": feature(jpeg_bytes(rng)),
                "txt": feature(f"caption {i}".encode()),
                "width": feature(28),
                "url": feature(b"http://example.invalid/x.jpg"),
            }
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=ex)).SerializeToString()
            )
    batches = list(
        build_eval_dataset(
            {"source": "tfrecord", "shards": path},
            image_size=8,
            tokenizer=FakeTokenizer(),
            context_length=16,
            batch_size=8,
        ).as_numpy_iterator()
    )
    captions = [c.decode() for c, m in zip(batches[0]["caption"], batches[0]["mask"]) if m]
    assert captions == [f"caption {i}" for i in range(5)]
    assert [k.decode() for k in batches[0]["key"][:5]] == [f"{i:09d}" for i in range(5)]
