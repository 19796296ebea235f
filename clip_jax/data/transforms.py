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


def _sample_crop(image_shape, key, scale: Sequence[float], ratio: Sequence[float]):
    """The train crop window for an image of `image_shape` (`int32 [3]`, h, w, channels):
    `(begin, size)`, each `int32 [3]` as `tf.slice` takes them (`size[2]` is -1)."""
    import tensorflow as tf

    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key,
        min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, crop_size


def random_resized_crop(image, key, size: int, *, scale: Sequence[float] = (0.9, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), method: str = "bicubic"):
    """CLIP train augmentation: random crop of `scale` area fraction and `ratio` aspect
    (width/height), resized to `uint8 [size, size, 3]`.

    `key` is a stateless RNG key (`int64 [2]`) derived from (seed, process, element index), so
    the crop of a given sample never depends on thread scheduling.
    """
    import tensorflow as tf

    begin, crop_size = _sample_crop(tf.shape(image), key, scale, ratio)
    crop = tf.slice(image, begin, crop_size)
    out = _resize_uint8(crop, size, size, method)
    out.set_shape([size, size, 3])
    return out


def _center_crop_geometry(h, w, size: int):
    """Eval geometry for an `h` x `w` image (int32 scalars): the whole image is resized to
    `(new_h, new_w)` (shorter side `size`) and `[top:top+size, left:left+size]` is kept."""
    import tensorflow as tf

    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    factor = tf.cast(size, tf.float32) / tf.minimum(hf, wf)
    # max(size, .) guards against rounding a side to size - 1.
    new_h = tf.maximum(size, tf.cast(tf.round(hf * factor), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(wf * factor), tf.int32))
    return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2


def resize_center_crop(image, size: int, *, method: str = "bicubic"):
    """Eval transform: resize the shorter side to `size` (aspect kept), center crop to
    `uint8 [size, size, 3]`."""
    import tensorflow as tf

    shape = tf.shape(image)
    new_h, new_w, top, left = _center_crop_geometry(shape[0], shape[1], size)
    resized = _resize_uint8(image, new_h, new_w, method)
    out = tf.slice(resized, tf.stack([top, left, 0]), [size, size, 3])
    out.set_shape([size, size, 3])
    return out


# --- Decoding only what is used (JPEG) -------------------------------------------------------
#
# For JPEG bytes the functions below read the header (`extract_jpeg_shape`), choose the window
# the transform will use, and let libjpeg-turbo decode only that window
# (`decode_and_crop_jpeg`), at 1/2, 1/4 or 1/8 scale in the DCT domain when the window is at
# least that many times larger than the output on both sides. Facts measured with TF 2.21's
# libjpeg-turbo (see tests/test_transforms.py):
# - A crop window is given in the coordinates of the downscaled image, which is
#   ceil(h / d) x ceil(w / d) at scale 1/d.
# - With chroma subsampling (4:2:0, 4:2:2) the first column of a window that starts on an
#   iMCU boundary and the last column of any window lose their chroma neighbours (fancy
#   upsampling replicates the edge): up to 30 grey levels off. Decoding one more column on
#   each side makes the window pixel-identical to full decode + slice, at every scale.
#   Rows need no margin (`jpeg_skip_scanlines` keeps the vertical context).
# - A truncated baseline JPEG fails `decode_image`, but a window above the truncation point
#   decodes without error (the skip over the unread tail does not notice missing data). The
#   window therefore always runs to the image's last row, so truncated files fail as before;
#   for the default aug_scale (0.9, 1) that decodes ~2.5% more rows on average.

_JPEG_MAGIC = b"\xff\xd8\xff"  # what tf.io.decode_image itself checks to pick its JPEG decoder
# tf.image.resize(antialias=True) runs ScaleAndTranslate with these kernels (radius in input
# pixels at scale 1). Only these methods can be reproduced on a sub-window at a sub-pixel
# offset; "area" and "nearest" keep full-scale decoding (and full decode for eval).
_WINDOW_KERNELS = {"bicubic": ("keyscubic", 2.0), "bilinear": ("triangle", 1.0),
                   "lanczos3": ("lanczos3", 3.0)}
_DCT_SCALES = (1, 2, 4, 8)  # libjpeg's decode ratios


def _is_jpeg(encoded):
    import tensorflow as tf

    return tf.equal(tf.strings.substr(encoded, 0, 3), _JPEG_MAGIC)


def _dct_scale_index(short_side, size: int, method: str):
    """Index into `_DCT_SCALES`: the largest d with `short_side >= d * size` (int32 scalar)."""
    import tensorflow as tf

    if method not in _WINDOW_KERNELS:
        return tf.constant(0)
    steps = tf.constant([2 * size, 4 * size, 8 * size])
    return tf.reduce_sum(tf.cast(short_side >= steps, tf.int32))


def _ceil_div(a, d: int):
    return (a + (d - 1)) // d


def _decode_jpeg_window(encoded, d: int, scaled_hw, y0, x0, y1, x1):
    """Pixels `[y0:y1, x0:x1]` of the JPEG decoded at scale 1/`d` (`scaled_hw`: that image's
    size): `uint8 [y1 - y0, x1 - x0, 3]`, identical to full decode + slice (see above)."""
    import tensorflow as tf

    hs, ws = scaled_hw
    wx0, wx1 = tf.maximum(x0 - 1, 0), tf.minimum(x1 + 1, ws)
    window = tf.stack([y0, wx0, hs - y0, wx1 - wx0])
    decoded = tf.io.decode_and_crop_jpeg(encoded, window, channels=3, ratio=d)
    return tf.slice(decoded, tf.stack([0, x0 - wx0, 0]), tf.stack([y1 - y0, x1 - x0, 3]))


def _scale_translate_uint8(image, size: int, scale, translation, method: str):
    """`image` `[h, w, 3]` -> `uint8 [size, size, 3]` where output = input * scale +
    translation (continuous pixel-edge coordinates, per axis `(y, x)`), antialiased with the
    kernel `tf.image.resize` uses for `method`."""
    import tensorflow as tf

    out = tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=tf.constant([size, size]), scale=tf.stack(scale),
        translation=tf.stack(translation), kernel_type=_WINDOW_KERNELS[method][0],
        antialias=True)[0]
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def decode_random_resized_crop(encoded, key, size: int, *,
                               scale: Sequence[float] = (0.9, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3),
                               method: str = "bicubic"):
    """`decode_image` + `random_resized_crop` in one step that decodes only the crop:
    encoded image (scalar string) -> `uint8 [size, size, 3]`.

    JPEG: same crop window as `random_resized_crop` samples for `key` (same call on the same
    shape, read from the header). Below 2x `size` on either side the result is identical to
    the two-step path; a window >= d * `size` on both sides (d = 2, 4, 8, the largest) is
    decoded at 1/d in libjpeg's DCT domain and then resized at the exact sub-pixel geometry of
    the window (mean difference to the two-step path < 1 grey level, see the tests).
    Other formats run the two-step path. Undecodable or truncated bytes raise
    InvalidArgumentError, like `decode_image`.
    """
    import tensorflow as tf

    def jpeg():
        hwc = tf.image.extract_jpeg_shape(encoded)
        h, w = hwc[0], hwc[1]
        begin, crop_size = _sample_crop(tf.stack([h, w, 3]), key, scale, ratio)
        y, x, ch, cw = begin[0], begin[1], crop_size[0], crop_size[1]

        def at_scale(d: int):
            def branch():
                if d == 1:
                    crop = _decode_jpeg_window(encoded, 1, (h, w), y, x, y + ch, x + cw)
                    out = _resize_uint8(crop, size, size, method)
                else:
                    # Decoded pixels that the window touches (partly at odd offsets); the
                    # translation puts the window's exact edges at the output's edges.
                    y0, x0 = y // d, x // d
                    region = _decode_jpeg_window(
                        encoded, d, (_ceil_div(h, d), _ceil_div(w, d)), y0, x0,
                        _ceil_div(y + ch, d), _ceil_div(x + cw, d))
                    sy = float(size * d) / tf.cast(ch, tf.float32)
                    sx = float(size * d) / tf.cast(cw, tf.float32)
                    ty = -tf.cast(y - y0 * d, tf.float32) / d * sy
                    tx = -tf.cast(x - x0 * d, tf.float32) / d * sx
                    out = _scale_translate_uint8(region, size, (sy, sx), (ty, tx), method)
                out.set_shape([size, size, 3])
                return out
            return branch

        index = _dct_scale_index(tf.minimum(ch, cw), size, method)
        return tf.switch_case(index, [at_scale(d) for d in _DCT_SCALES])

    def other():
        return random_resized_crop(decode_image(encoded), key, size, scale=scale, ratio=ratio,
                                   method=method)

    out = tf.cond(_is_jpeg(encoded), jpeg, other)
    out.set_shape([size, size, 3])
    return out


def _support(start, size: int, scale, radius: float, n):
    """Input pixels `[lo, hi)` (clipped to `[0, n)`) that can weigh on output pixels
    `[start, start + size)` of an antialiased resize by `scale` with a kernel of `radius`."""
    import tensorflow as tf

    reach = radius * tf.maximum(1.0, 1.0 / scale) + 1.0  # +1: float slack
    lo = tf.cast(tf.floor(tf.cast(start, tf.float32) / scale - reach), tf.int32)
    hi = tf.cast(tf.math.ceil(tf.cast(start + size, tf.float32) / scale + reach), tf.int32)
    return tf.clip_by_value(lo, 0, n), tf.clip_by_value(hi, 0, n)


def decode_resize_center_crop(encoded, size: int, *, method: str = "bicubic"):
    """`decode_image` + `resize_center_crop` in one step that decodes only the pixels the
    center crop uses: encoded image (scalar string) -> `uint8 [size, size, 3]`.

    JPEG with a windowed method (bicubic, bilinear, lanczos3): decodes the rows/columns that
    weigh on the kept center (at 1/d scale when the shorter side is >= d * `size`, d = 2, 4,
    8) and resizes that window with the geometry of the full resize. Without DCT scaling the
    result equals the two-step path up to float rounding in the resize weights (a few pixels
    one grey level off); with it, within ~1 grey level on average (see the tests). Other
    formats and methods run the two-step path. Errors as `decode_image`.
    """
    import tensorflow as tf

    def two_step():
        return resize_center_crop(decode_image(encoded), size, method=method)

    if method not in _WINDOW_KERNELS:
        return two_step()
    radius = _WINDOW_KERNELS[method][1]

    def jpeg():
        hwc = tf.image.extract_jpeg_shape(encoded)
        h, w = hwc[0], hwc[1]
        new_h, new_w, top, left = _center_crop_geometry(h, w, size)
        # The scales tf.image.resize uses for the full resize (output px per input px).
        scale_y = tf.cast(new_h, tf.float32) / tf.cast(h, tf.float32)
        scale_x = tf.cast(new_w, tf.float32) / tf.cast(w, tf.float32)

        def at_scale(d: int):
            def branch():
                hs, ws = _ceil_div(h, d), _ceil_div(w, d)
                sy, sx = scale_y * d, scale_x * d  # output px per decoded px (exact: d = 2^k)
                y0, y1 = _support(top, size, sy, radius, hs)
                x0, x1 = _support(left, size, sx, radius, ws)
                region = _decode_jpeg_window(encoded, d, (hs, ws), y0, x0, y1, x1)
                ty = tf.cast(y0, tf.float32) * sy - tf.cast(top, tf.float32)
                tx = tf.cast(x0, tf.float32) * sx - tf.cast(left, tf.float32)
                out = _scale_translate_uint8(region, size, (sy, sx), (ty, tx), method)
                out.set_shape([size, size, 3])
                return out
            return branch

        index = _dct_scale_index(tf.minimum(h, w), size, method)
        return tf.switch_case(index, [at_scale(d) for d in _DCT_SCALES])

    out = tf.cond(_is_jpeg(encoded), jpeg, two_step)
    out.set_shape([size, size, 3])
    return out
