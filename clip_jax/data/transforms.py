"""Image transforms: decoding, CLIP train/eval crops (TF, host side) and normalisation (JAX).

Host side works in uint8: images leave the input pipeline as `uint8 [B, H, W, 3]`, 4x less
host->device traffic than float32; `normalize_images` turns them into model inputs on device.

TensorFlow and JAX are imported inside the functions that need them, so importing this module
(e.g. for the constants from model code) stays cheap.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# OpenAI CLIP's RGB mean/std on [0, 1] pixels.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# tf.image.resize method names accepted by the config ("bicubic" matches OpenAI CLIP).
RESIZE_METHODS = ("bicubic", "bilinear", "area", "lanczos3", "nearest")


def normalize_images(images, dtype=None):
    """uint8 `[..., H, W, 3]` -> `(x / 255 - OPENAI_MEAN) / OPENAI_STD` as `dtype` (float32).

    Runs on device inside the jitted step; the arithmetic happens in float32 and is cast at the
    end so bf16 models do not lose precision in the subtraction.
    """
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    x = jnp.asarray(images).astype(jnp.float32) * (1.0 / 255.0)
    mean = jnp.asarray(OPENAI_MEAN, jnp.float32)
    std = jnp.asarray(OPENAI_STD, jnp.float32)
    return ((x - mean) / std).astype(dtype)


def normalize_images_np(images: np.ndarray) -> np.ndarray:
    """NumPy twin of `normalize_images` (float32), for tests and host-side tools."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(OPENAI_STD, np.float32)


def decode_image(encoded):
    """Decodes JPEG/PNG/WebP/GIF(first frame)/BMP bytes to `uint8 [h, w, 3]` (TF op).

    Raises InvalidArgumentError on undecodable bytes; the pipeline runs it under a per-sample
    error guard that drops and counts such samples (see `pipeline.guarded_map`).
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _resize_uint8(image, height, width, method: str):
    import tensorflow as tf

    resized = tf.image.resize(image, tf.stack([height, width]), method=method, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def random_resized_crop(image, key, size: int, *, scale: Sequence[float] = (0.9, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), method: str = "bicubic"):
    """CLIP train augmentation: random crop of `scale` area fraction and `ratio` aspect
    (width/height), resized to `uint8 [size, size, 3]`.

    `key` is a stateless RNG key (`int64 [2]`) derived from (seed, process, element index), so
    the crop of a given sample never depends on thread scheduling.
    """
    import tensorflow as tf

    shape = tf.shape(image)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key,
        min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    out = _resize_uint8(crop, size, size, method)
    out.set_shape([size, size, 3])
    return out


def resize_center_crop(image, size: int, *, method: str = "bicubic"):
    """Eval transform: resize the shorter side to `size` (aspect kept), center crop to
    `uint8 [size, size, 3]`."""
    import tensorflow as tf

    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    factor = tf.cast(size, tf.float32) / tf.minimum(h, w)
    # max(size, .) guards against rounding a side to size - 1.
    new_h = tf.maximum(size, tf.cast(tf.round(h * factor), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(w * factor), tf.int32))
    resized = _resize_uint8(image, new_h, new_w, method)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    out = tf.slice(resized, tf.stack([top, left, 0]), [size, size, 3])
    out.set_shape([size, size, 3])
    return out
