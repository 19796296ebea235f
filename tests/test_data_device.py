"""Transforms (decode, crops, normalisation) and device-side global batches / prefetch."""
from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from clip_jax.data import device, transforms


def _encode(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_formats():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (9, 13, 3), dtype=np.uint8)
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {})):
        out = transforms.decode_image(_encode(arr, fmt, **kw)).numpy()
        np.testing.assert_array_equal(out, arr, err_msg=fmt)
    gray = transforms.decode_image(_encode(arr[..., 0], "PNG")).numpy()
    assert gray.shape == (9, 13, 3) and np.array_equal(gray[..., 1], arr[..., 0])
    data = _encode(arr, "JPEG", quality=95, subsampling=0)  # 4:4:4: no chroma upsampling
    jpeg = transforms.decode_image(data).numpy()
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # same bytes, PIL's libjpeg
    diff = np.abs(jpeg.astype(int) - ref)  # TF uses a fast integer IDCT: small differences
    assert jpeg.shape == (9, 13, 3) and diff.mean() < 3 and diff.max() <= 12


def test_resize_center_crop():
    # Left half red, right half blue, 20x40: shorter side 20 -> 10 gives 10x20, center crop
    # keeps columns 5..14: 5 red columns then 5 blue ones.
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20, 0] = 255
    img[:, 20:, 2] = 255
    for method in ("bilinear", "bicubic"):
        out = transforms.resize_center_crop(tf.constant(img), 10, method=method).numpy()
        assert out.shape == (10, 10, 3) and out.dtype == np.uint8
        assert (out[:, :4, 0] > 240).all() and (out[:, :4, 2] < 15).all()
        assert (out[:, 6:, 2] > 240).all() and (out[:, 6:, 0] < 15).all()
    tall = transforms.resize_center_crop(tf.zeros([50, 17, 3], tf.uint8), 16).numpy()
    assert tall.shape == (16, 16, 3)


def test_random_resized_crop_stateless():
    rng = np.random.default_rng(1)
    img = tf.constant(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    key = tf.constant([3, 4], tf.int64)
    a = transforms.random_resized_crop(img, key, 24).numpy()
    b = transforms.random_resized_crop(img, key, 24).numpy()
    c = transforms.random_resized_crop(img, tf.constant([3, 5], tf.int64), 24).numpy()
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # scale (1, 1) with ratio fixed to the image's aspect keeps the whole image.
    whole = transforms.random_resized_crop(img, key, 24, scale=(1.0, 1.0), ratio=(1.25, 1.25),
                                           method="bilinear").numpy()
    ref = transforms._resize_uint8(img, 24, 24, "bilinear").numpy()
    np.testing.assert_array_equal(whole, ref)


def test_normalize_images():
    x = np.random.default_rng(2).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    out = transforms.normalize_images(x)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out), transforms.normalize_images_np(x), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(out)[..., 0].max(),
                               (x[..., 0].max() / 255 - 0.48145466) / 0.26862954, rtol=1e-5)
    assert transforms.normalize_images(x, jnp.bfloat16).dtype == jnp.bfloat16


def _sharding():
    devices = np.array(jax.devices())
    assert devices.size == 8, "conftest forces 8 CPU devices"
    return NamedSharding(Mesh(devices, ("data",)), P("data"))


def test_make_global_batch():
    sharding = _sharding()
    batch = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3),
             "text": np.arange(16 * 5, dtype=np.int32).reshape(16, 5),
             "position": np.array([32, 32]), "caption": np.array([b"x"] * 16)}
    out = device.make_global_batch(batch, sharding)
    assert isinstance(out["image"], jax.Array) and out["image"].sharding == sharding
    assert len(out["image"].addressable_shards) == 8
    assert out["image"].addressable_shards[1].data.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(np.asarray(out["text"]), batch["text"])
    assert isinstance(out["position"], np.ndarray) and isinstance(out["caption"], np.ndarray)


def test_prefetch_to_device_order_and_lookahead():
    sharding = _sharding()
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"image": np.full((8, 2, 2, 3), i, np.uint8), "position": np.array([i, i])}

    it = device.prefetch_to_device(source(), 2, sharding)
    first = next(it)
    assert int(first["image"][0, 0, 0, 0]) == 0 and first["position"].tolist() == [0, 0]
    assert pulled == [0, 1, 2]  # two batches already on the devices
    rest = list(it)
    assert [int(b["position"][0]) for b in rest] == [1, 2, 3, 4]
    assert [int(b["image"][3, 0, 0, 0]) for b in rest] == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        next(device.prefetch_to_device(source(), -1, sharding))
