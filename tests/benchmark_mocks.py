"""Offline TFDS stand-ins for the zero-shot benchmarks (`tfds.testing.mock_data`, no download).

`mock_benchmarks(tmp_dir)` mocks every TFDS builder: `as_dataset` yields `NUM_IMAGES` small PNGs
per split with labels that cycle through the benchmark's classes (its `class_indices` for
ImageNet-A/-R), at the image feature's fixed shape and channel count when it has one (MNIST is
28x28x1). `prepare(name)` writes the builder's dataset_info.json where the mocked
`tfds.builder(...).data_dir` points, which is what makes a benchmark count as prepared.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from clip_jax.evaluation.benchmarks import benchmark, list_benchmarks

NUM_IMAGES = 5


def expected_labels(name: str) -> np.ndarray:
    """int [NUM_IMAGES] TFDS labels the mock yields for benchmark `name`."""
    b = benchmark(name)
    values = np.asarray(b.class_indices or range(b.num_classes))
    # A stride through the classes so that several, not only the first few, appear.
    return values[(np.arange(NUM_IMAGES) * 7 + 3) % len(values)]


def _builder_benchmark(builder) -> str:
    full = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
    for name in list_benchmarks():
        if benchmark(name).tfds_name in (full, builder.name):
            return name
    raise KeyError(f"no benchmark reads TFDS {full}")


def images(name: str, builder=None) -> list[np.ndarray]:
    """uint8 [H, W, C] images of the mock for benchmark `name` (C=1 for grayscale features)."""
    if builder is None:
        builder = tfds.builder(benchmark(name).tfds_name)
    shape = builder.info.features[benchmark(name).image_key].shape
    h, w, c = (d if d is not None else s for d, s in zip(shape, (20, 30, 3)))
    rng = np.random.default_rng(len(name))
    return [rng.integers(0, 256, (h, w, c), dtype=np.uint8) for _ in range(NUM_IMAGES)]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    """FileReaderBuilder._as_dataset: encoded images (the pipeline skips decoding) + labels."""
    del split, decoders, kwargs
    name = _builder_benchmark(self)
    b = benchmark(name)
    ds = tf.data.Dataset.from_tensor_slices(
        {
            b.image_key: [_png(im) for im in images(name, self)],
            b.label_key: expected_labels(name).astype(np.int64),
        }
    )
    if read_config is not None and read_config.add_tfds_id:
        ds = ds.enumerate().map(lambda i, ex: {**ex, "tfds_id": tf.strings.as_string(i)})
    return ds


@contextlib.contextmanager
def mock_benchmarks(tmp_dir: str) -> Iterator[None]:
    """Inside: every TFDS builder's data_dir is under `tmp_dir`, nothing is prepared yet."""
    with tfds.testing.mock_data(data_dir=tmp_dir, as_dataset_fn=_as_dataset):
        yield


def prepare(name: str) -> None:
    """Marks benchmark `name` as prepared (inside `mock_benchmarks`)."""
    builder = tfds.builder(benchmark(name).tfds_name)
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


def unprepare(name: str) -> None:
    """Undoes `prepare(name)` (inside `mock_benchmarks`)."""
    builder = tfds.builder(benchmark(name).tfds_name)
    os.remove(os.path.join(builder.data_dir, "dataset_info.json"))
