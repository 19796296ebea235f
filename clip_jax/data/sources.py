"""Raw-record readers: tar shards (WebDataset layout), TFRecords, TFDS, image folders.

Every reader yields the same *raw record* structure (see `RAW_SIGNATURE`): still-encoded image
bytes, the caption string, an integer label and a key. Nothing here decodes an image, so raw
records are cheap to skip when a run resumes (see `clip_jax.data.ordering`).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import posixpath
import tarfile
import zlib
from typing import Iterator, Sequence

import tensorflow as tf

from clip_jax.data import shards as shards_lib

# One raw record. Missing members are empty strings / label -1, so that every sample reaches
# the (counted) filter instead of breaking the reader.
RAW_SIGNATURE = {
    "key": tf.TensorSpec([], tf.string),    # sample key, e.g. "00012/000123456"
    "image": tf.TensorSpec([], tf.string),  # encoded JPEG/PNG/WebP/GIF/BMP bytes, b"" if missing
    "text": tf.TensorSpec([], tf.string),   # utf-8 caption, stripped, b"" if missing
    "label": tf.TensorSpec([], tf.int64),   # class label, -1 if missing
}

# Member extensions that hold the image, in order of preference when a key has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")

# TFRecord feature names (`tf.train.Example`), fixed by the project interface. "key" is an
# optional extra that `make_shards` writes so that eval outputs can name their samples.
TFRECORD_IMAGE = "image/encoded"
TFRECORD_TEXT = "text"
TFRECORD_LABEL = "image/class/label"
TFRECORD_KEY = "key"


# --------------------------------------------------------------------------------------------
# Tar shards
# --------------------------------------------------------------------------------------------
def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _record_from_members(key: str, members: dict[str, bytes], caption_field: str) -> dict:
    """Builds one raw record from the members of one key (`{"jpg": b"...", "txt": b"..."}`)."""
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), b"")
    text = b""
    if "txt" in members:
        text = members["txt"].strip()
    elif "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            logging.debug("sample %s: unreadable json (%s); counted as missing caption", key, err)
            meta = {}
        caption = meta.get(caption_field) if isinstance(meta, dict) else None
        if isinstance(caption, str):
            text = caption.strip().encode("utf-8")
    label = -1
    if "cls" in members:
        try:
            label = int(members["cls"].strip())
        except ValueError:
            logging.debug("sample %s: .cls member %r is not an integer", key, members["cls"][:20])
    return {"key": key.encode("utf-8"), "image": image, "text": text, "label": label}


def iter_tar_records(path, caption_field="caption") -> Iterator[dict]:
    """Yields raw records from one (optionally gzipped) WebDataset-style tar shard.

    Members are grouped by key = member path up to the first '.' of its basename; consecutive
    members with the same key form one sample (img2dataset writes them next to each other).
    A truncated or corrupt shard is logged and read up to the damage, not raised, so a single
    bad download neither stops training nor loses the samples before it.
    """
    path, caption_field = _as_str(path), _as_str(caption_field)
    current_key, members = None, {}
    with tf.io.gfile.GFile(path, "rb") as f:
        # "r|*": streaming read, transparent gzip; no seeking, so remote files stream too.
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    dirname, base = posixpath.split(member.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = posixpath.join(dirname, stem)
                    if key != current_key:
                        if current_key is not None:
                            yield _record_from_members(current_key, members, caption_field)
                        current_key, members = key, {}
                    members[ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
            logging.warning("tar shard %s is truncated or corrupt after sample %r (%s: %s); "
                            "the rest of this shard is skipped", path, current_key,
                            type(err).__name__, err)
    if current_key is not None:
        yield _record_from_members(current_key, members, caption_field)


def tar_shard_dataset(path: tf.Tensor, caption_field: str = "caption") -> tf.data.Dataset:
    """Raw records of one tar shard; `path` may be a scalar string tensor (inside interleave)."""
    return tf.data.Dataset.from_generator(
        iter_tar_records, args=(path, caption_field), output_signature=RAW_SIGNATURE)


# --------------------------------------------------------------------------------------------
# TFRecords
# --------------------------------------------------------------------------------------------
_TFRECORD_FEATURES = {
    TFRECORD_IMAGE: tf.io.FixedLenFeature([], tf.string, default_value=""),
    TFRECORD_TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
    TFRECORD_LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    TFRECORD_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def parse_tfrecord(serialized: tf.Tensor) -> dict:
    """Parses one serialized `tf.train.Example` into a raw record (no image decoding)."""
    ex = tf.io.parse_single_example(serialized, _TFRECORD_FEATURES)
    return {"key": ex[TFRECORD_KEY], "image": ex[TFRECORD_IMAGE],
            "text": tf.strings.strip(ex[TFRECORD_TEXT]), "label": ex[TFRECORD_LABEL]}


def tfrecord_shard_dataset(path: tf.Tensor) -> tf.data.Dataset:
    """Raw records of one TFRecord shard."""
    return tf.data.TFRecordDataset(path).map(parse_tfrecord)


def make_tfrecord_example(image: bytes, text: str, label: int | None = None,
                          key: str | None = None) -> bytes:
    """Serializes one sample as the project's `tf.train.Example` layout."""
    feature = {
        TFRECORD_IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        TFRECORD_TEXT: tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode("utf-8")])),
    }
    if label is not None:
        feature[TFRECORD_LABEL] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    if key is not None:
        feature[TFRECORD_KEY] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# --------------------------------------------------------------------------------------------
# Shard streams (which file is read when)
# --------------------------------------------------------------------------------------------
def shard_path_stream(files: Sequence[str], *, seed_key: tf.Tensor | None, repeat: bool,
                      resample: bool) -> tf.data.Dataset:
    """Dataset of shard paths, in the order they are opened.

    - `repeat=False`: every file once, in the given order (evaluation).
    - `repeat=True, resample=False`: endless epochs; epoch e visits every file once in an order
      shuffled statelessly from (seed_key, e), so the order is a pure function of the seed.
    - `resample=True`: endless draws with replacement, draw i from (seed_key, i).
    """
    paths = tf.constant(list(files), dtype=tf.string)
    n = len(files)
    if not repeat:
        return tf.data.Dataset.from_tensor_slices(paths)
    if seed_key is None:
        raise ValueError("an endless shard stream needs a seed")
    if resample:
        def draw(i):
            idx = tf.random.stateless_uniform(
                [], tf.random.experimental.stateless_fold_in(seed_key, i), 0, n, dtype=tf.int64)
            return tf.gather(paths, idx)
        return tf.data.Dataset.range(tf.int64.max).map(draw)

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), tf.random.experimental.stateless_fold_in(seed_key, e))
        return tf.data.Dataset.from_tensor_slices(tf.gather(paths, order))
    return tf.data.Dataset.range(tf.int64.max).flat_map(epoch)


def interleave_shards(path_stream: tf.data.Dataset, reader, cycle_length: int,
                      num_parallel_calls: int) -> tf.data.Dataset:
    """Reads `cycle_length` shards at once, one record from each in turn (deterministic order)."""
    return path_stream.interleave(
        reader, cycle_length=max(1, cycle_length), block_length=1,
        num_parallel_calls=num_parallel_calls, deterministic=True)


# --------------------------------------------------------------------------------------------
# TFDS
# --------------------------------------------------------------------------------------------
def _nested_get(features: dict, key: str):
    value = features
    for part in key.split("/"):
        value = value[part]
    return value


def tfds_records(*, name: str, split: str, data_dir: str, image_key: str, text_key: str,
                 label_key: str, label_template: str, shuffle_files: bool, seed: int,
                 process_index: int, process_count: int, repeat: bool) -> tf.data.Dataset:
    """Raw records from a prepared TFDS dataset; never downloads.

    `name` empty means `data_dir` is a prepared dataset version folder read with
    `tfds.builder_from_directory`. The split is sliced per process with
    `tfds.split_for_jax_process`. An image-label dataset without a text feature gets captions
    from its class names through `label_template` (e.g. "a photo of a {}.").
    """
    import tensorflow_datasets as tfds  # slow import; only paid when TFDS is used

    if not data_dir:
        raise ValueError("data.tfds_data_dir is required for source 'tfds' (no downloads here)")
    if not tf.io.gfile.exists(data_dir):
        raise ValueError(f"data.tfds_data_dir {data_dir!r} does not exist")
    if name:
        builder = tfds.builder(name, data_dir=data_dir)
        if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
            raise ValueError(f"TFDS dataset {name!r} is not prepared in {data_dir!r} "
                             f"(looked for {builder.data_dir}/dataset_info.json); prepare it "
                             "offline first, this pipeline never downloads")
    else:
        builder = tfds.builder_from_directory(data_dir)
    features = builder.info.features
    for what, key in (("image", image_key), ("text", text_key), ("label", label_key)):
        if key:
            try:
                _nested_get(features, key)
            except KeyError as err:
                raise ValueError(f"TFDS {name or data_dir}: no {what} feature {key!r}; features "
                                 f"are {list(features.keys())}") from err
    if not text_key and not label_key:
        raise ValueError("TFDS source needs data.text_key or data.label_key")

    decoders = None
    image_feature = _nested_get(features, image_key)
    if isinstance(image_feature, tfds.features.Image):
        # Keep the encoded bytes: decoding happens later (and only for records not skipped).
        decoders = {image_key: tfds.decode.SkipDecoding()}
        for part in reversed(image_key.split("/")[:-1]):
            decoders = {part: decoders}
    read_config = tfds.ReadConfig(
        shuffle_seed=seed if shuffle_files else None,
        shuffle_reshuffle_each_iteration=True if shuffle_files else None,
        try_autocache=False,  # caching would change the file order between epochs
        add_tfds_id=True)
    subsplit = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)
    ds = builder.as_dataset(split=subsplit, shuffle_files=shuffle_files, decoders=decoders,
                            read_config=read_config)
    if repeat:
        ds = ds.repeat()

    class_names = None
    if label_key and not text_key:
        label_feature = _nested_get(features, label_key)
        class_names = tf.constant([label_template.format(n.replace("_", " "))
                                   for n in label_feature.names])

    def to_raw(ex):
        text = tf.constant(b"")
        label = tf.constant(-1, tf.int64)
        if label_key:
            label = tf.cast(_nested_get(ex, label_key), tf.int64)
        if text_key:
            text = tf.strings.strip(_nested_get(ex, text_key))
        elif class_names is not None:
            text = tf.gather(class_names, label)
        return {"key": ex["tfds_id"], "image": _nested_get(ex, image_key), "text": text,
                "label": label}
    return ds.map(to_raw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# --------------------------------------------------------------------------------------------
# Image folder (evaluation)
# --------------------------------------------------------------------------------------------
def list_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """Lists `root/<class>/**/<image>`: (paths, labels, sorted class names)."""
    if not tf.io.gfile.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist or is not a directory")
    classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                     if tf.io.gfile.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class subfolders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, filenames in tf.io.gfile.walk(os.path.join(root, name)):
            for fname in sorted(filenames):
                if fname.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    paths.append(os.path.join(dirpath, fname))
                    labels.append(label)
    if not paths:
        raise ValueError(f"image folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, classes


def image_folder_records(root: str) -> tuple[tf.data.Dataset, list[str]]:
    """Raw records (no captions) for an image folder, plus the sorted class names."""
    paths, labels, classes = list_image_folder(root)
    keys = [os.path.relpath(p, root) for p in paths]
    ds = tf.data.Dataset.from_tensor_slices(
        {"path": paths, "key": keys, "label": tf.constant(labels, tf.int64)})

    def to_raw(ex):
        return {"key": ex["key"], "image": tf.io.read_file(ex["path"]),
                "text": tf.constant(b""), "label": ex["label"]}
    return ds.map(to_raw), classes


def demo_files(split: str) -> list[str]:
    """Paths of the shipped demo shards (`source: "demo"`)."""
    return shards_lib.demo_shards(split)
