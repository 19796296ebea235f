"""Image transforms: decoding, resize, CLIP train/eval crops, the one-step JPEG window decoders
(`decode_random_resized_crop`, `decode_resize_center_crop`) against the two-step path, and
normalisation."""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFilter

from clip_jax.data import transforms


def _encode(arr, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _photo_array(rng, width, height) -> np.ndarray:
    """uint8 [height, width, 3]: gradients, shapes, blur and sensor-like noise (like
    benchmarks/input_pipeline.py `synthetic_photo`)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            (x / width) * rng.uniform(80, 255),
            (y / height) * rng.uniform(80, 255),
            np.full_like(x, rng.uniform(0, 255)),
        ],
        -1,
    )
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(20, 200), y0 + rng.integers(20, 150)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5))).astype(np.int16)
    arr = arr + rng.normal(0, 6, arr.shape).astype(np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _photo_jpeg(rng, width, height, subsampling=2, mode="RGB") -> bytes:
    """JPEG quality 90; PIL subsampling 2 = 4:2:0, 1 = 4:2:2, 0 = 4:4:4."""
    img = Image.fromarray(_photo_array(rng, width, height)).convert(mode)
    kw = {} if mode == "L" else {"subsampling": subsampling}
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _key(i: int):
    return tf.constant([11, i], tf.int64)


def _two_step_train(data, key, size, **kw):
    return transforms.random_resized_crop(transforms.decode_image(data), key, size, **kw).numpy()


def _two_step_eval(data, size, **kw):
    return transforms.resize_center_crop(transforms.decode_image(data), size, **kw).numpy()


# --- existing transforms -----------------------------------------------------------------------


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


def test_resize_is_tf_image_resize():
    """`_resize_uint8` filters both axes as rows (faster); it must give tf.image.resize's
    pixels exactly, down and up, for every method (small images take one op: both sides of
    `_ONE_OP_MAX_PIXELS` are covered; `small_images=True` forces one op at any size)."""
    rng = np.random.default_rng(1)
    assert 12 * 20 <= transforms._ONE_OP_MAX_PIXELS < 101 * 100
    for h, w in ((12, 20), (101, 100), (37, 300), (256, 256), (480, 360)):
        img = tf.constant(_photo_array(rng, w, h))
        for method in transforms.RESIZE_METHODS:
            for oh, ow in ((224, 224), (50, 81), (2 * h, w + 3)):
                ref = tf.image.resize(img, [oh, ow], method=method, antialias=True)
                if ref.dtype != tf.uint8:
                    ref = tf.cast(tf.clip_by_value(tf.round(ref), 0.0, 255.0), tf.uint8)
                for small in (False, True):
                    out = transforms._resize_uint8(img, oh, ow, method, small_images=small)
                    np.testing.assert_array_equal(
                        out.numpy(), ref.numpy(), err_msg=f"{h}x{w}->{oh}x{ow} {method} {small}"
                    )


def test_scale_translate_matches_op():
    # With a translation: the same floats as one ScaleAndTranslate op, so the same uint8.
    rng = np.random.default_rng(2)
    img = tf.constant(_photo_array(rng, 150, 110))
    for kernel, method in (("keyscubic", "bicubic"), ("triangle", "bilinear")):
        scale, translation = tf.constant([0.61, 1.7]), tf.constant([-3.25, 2.5])
        ref = tf.raw_ops.ScaleAndTranslate(
            images=img[None],
            size=[64, 200],
            scale=scale,
            translation=translation,
            kernel_type=kernel,
            antialias=True,
        )[0]
        ref = tf.cast(tf.clip_by_value(tf.round(ref), 0.0, 255.0), tf.uint8)
        out = transforms._scale_translate_uint8(
            img, tf.constant([64, 200]), scale, translation, method
        )
        np.testing.assert_array_equal(out.numpy(), ref.numpy())


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
    whole = transforms.random_resized_crop(
        img, key, 24, scale=(1.0, 1.0), ratio=(1.25, 1.25), method="bilinear"
    ).numpy()
    ref = transforms._resize_uint8(img, 24, 24, "bilinear").numpy()
    np.testing.assert_array_equal(whole, ref)
    # "nearest" returns uint8 from tf.image.resize (it used to fail in the rounding step).
    near = transforms.random_resized_crop(img, key, 24, method="nearest").numpy()
    assert near.shape == (24, 24, 3) and near.dtype == np.uint8


def test_normalize_images():
    x = np.random.default_rng(2).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    out = transforms.normalize_images(x)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_allclose(
        np.asarray(out), transforms.normalize_images_np(x), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(out)[..., 0].max(), (x[..., 0].max() / 255 - 0.48145466) / 0.26862954, rtol=1e-5
    )
    assert transforms.normalize_images(x, jnp.bfloat16).dtype == jnp.bfloat16


# --- JPEG window decoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subsampling,mode", [(2, "RGB"), (1, "RGB"), (0, "RGB"), (0, "L"), (0, "CMYK")]
)
def test_jpeg_window_is_full_decode_slice(subsampling, mode):
    """`_decode_jpeg_window` at every DCT scale equals full decode (same scale) + slice,
    including windows starting on iMCU boundaries (x % 16 == 0), where a plain
    decode_and_crop_jpeg gets the first column's chroma wrong with 4:2:0 / 4:2:2."""
    rng = np.random.default_rng(3)
    data = _photo_jpeg(rng, 257, 201, subsampling, mode)
    for d in (1, 2, 4, 8):
        full = tf.io.decode_jpeg(data, channels=3, ratio=d).numpy()
        hs, ws = full.shape[:2]
        assert (hs, ws) == (-(-201 // d), -(-257 // d))  # ceil(h / d) x ceil(w / d)
        windows = [(0, 0, hs, ws), (1, 16 // d, hs - 1, ws - 16 // d), (3, 5, 7, 9)]
        for _ in range(8):
            y0, x0 = rng.integers(0, hs), rng.integers(0, ws)
            windows.append((y0, x0, rng.integers(y0 + 1, hs + 1), rng.integers(x0 + 1, ws + 1)))
        for y0, x0, y1, x1 in windows:
            y0, x0, y1, x1 = (int(v) for v in (y0, x0, y1, x1))
            out = transforms._decode_jpeg_window(tf.constant(data), d, (hs, ws), y0, x0, y1, x1)
            np.testing.assert_array_equal(
                out.numpy(), full[y0:y1, x0:x1], err_msg=f"d={d} window {(y0, x0, y1, x1)}"
            )


@pytest.mark.parametrize("width,height", [(256, 256), (480, 360), (300, 449)])
def test_train_identical_below_2x(width, height):
    """Crop windows under 2x the output on a side: pixel-identical to the two-step path."""
    rng = np.random.default_rng(4)
    data = _photo_jpeg(rng, width, height)
    for i, scale in enumerate(((0.9, 1.0), (0.08, 1.0), (0.3, 0.5))):
        for j in range(4):
            key = _key(10 * i + j)
            out = transforms.decode_random_resized_crop(data, key, 224, scale=scale).numpy()
            np.testing.assert_array_equal(out, _two_step_train(data, key, 224, scale=scale))
    # Other methods too (no DCT scaling for area / nearest at any size).
    for method in ("bilinear", "lanczos3", "area", "nearest"):
        out = transforms.decode_random_resized_crop(data, _key(99), 224, method=method)
        np.testing.assert_array_equal(
            out.numpy(), _two_step_train(data, _key(99), 224, method=method)
        )


def _centroid(image: np.ndarray, background: float) -> np.ndarray:
    a = np.clip(image.astype(np.float64).mean(-1) - background, 0, None)
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    return np.array([(a * yy).sum(), (a * xx).sum()]) / a.sum()


def _disks_jpeg(rng, width, height) -> bytes:
    img = Image.new("L", (width, height), 40)
    draw = ImageDraw.Draw(img)
    r = width / 60
    for _ in range(12):
        x, y = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        draw.ellipse([x - r, y - r, x + r, y + r], fill=220)
    img = img.filter(ImageFilter.GaussianBlur(width / 400)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("width,height", [(1024, 768), (1024, 1024), (2000, 1500)])
def test_dct_scaled_close_to_two_step(width, height):
    """Windows >= 2x the output: DCT-scaled decode. Photo-like content: mean |difference| to
    the two-step path <= 1.5 grey levels (measured 0.5-1.07, mostly the two-step path's fast
    IDCT being ~0.8 darker); geometry: centroids of blurred disks within 0.1 output px
    (measured <= 0.03)."""
    rng = np.random.default_rng(5)
    photo = _photo_jpeg(rng, width, height)
    disks = _disks_jpeg(rng, width, height)
    mads = []
    for j in range(3):
        key = _key(j)
        out = transforms.decode_random_resized_crop(photo, key, 224).numpy().astype(int)
        mads.append(np.abs(out - _two_step_train(photo, key, 224)).mean())
        out = transforms.decode_random_resized_crop(disks, key, 224).numpy()
        shift = _centroid(out, 40) - _centroid(_two_step_train(disks, key, 224), 40)
        assert np.abs(shift).max() < 0.1, shift
    assert 0 < max(mads) <= 1.5, mads  # > 0: the DCT path ran
    out = transforms.decode_resize_center_crop(photo, 224).numpy().astype(int)
    assert 0 < np.abs(out - _two_step_eval(photo, 224)).mean() <= 1.5
    shift = _centroid(transforms.decode_resize_center_crop(disks, 224).numpy(), 40) - _centroid(
        _two_step_eval(disks, 224), 40
    )
    assert np.abs(shift).max() < 0.1, shift


@pytest.mark.parametrize("width,height", [(256, 256), (480, 360), (200, 700), (64, 40)])
def test_eval_matches_two_step_below_2x(width, height):
    """Eval window without DCT scaling: the two-step path's pixels up to float rounding in the
    resize weights (measured: ~1 value in 50k one grey level off)."""
    rng = np.random.default_rng(6)
    data = _photo_jpeg(rng, width, height)
    for method in ("bicubic", "bilinear", "lanczos3"):
        out = transforms.decode_resize_center_crop(data, 224, method=method).numpy().astype(int)
        diff = np.abs(out - _two_step_eval(data, 224, method=method))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (method, diff.max())
    for method in ("area", "nearest"):  # two-step path
        out = transforms.decode_resize_center_crop(data, 100, method=method).numpy()
        np.testing.assert_array_equal(out, _two_step_eval(data, 100, method=method))


def test_other_formats_and_channels():
    """PNG / WebP / BMP / GIF take the two-step path: identical output. Grayscale and CMYK
    JPEGs give 3 channels, like the two-step path."""
    rng = np.random.default_rng(7)
    arr = _photo_array(rng, 300, 260)
    cases = {
        fmt: _encode(arr, fmt, **kw)
        for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("GIF", {}))
    }
    cases["gray PNG"] = _encode(arr[..., 0], "PNG")
    cases["gray JPEG"] = _photo_jpeg(rng, 500, 470, mode="L")  # >= 2x: DCT path
    cases["CMYK JPEG"] = _photo_jpeg(rng, 260, 300, mode="CMYK")
    for name, data in cases.items():
        train = transforms.decode_random_resized_crop(data, _key(1), 224).numpy()
        evals = transforms.decode_resize_center_crop(data, 224).numpy()
        assert train.shape == evals.shape == (224, 224, 3), name
        if name == "gray JPEG":
            continue
        np.testing.assert_array_equal(train, _two_step_train(data, _key(1), 224), err_msg=name)
        if "JPEG" in name:  # eval window: float rounding as in test_eval_matches_two_step
            diff = np.abs(evals.astype(int) - _two_step_eval(data, 224))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, name
        else:
            np.testing.assert_array_equal(evals, _two_step_eval(data, 224), err_msg=name)
    gray = transforms.decode_random_resized_crop(cases["gray JPEG"], _key(1), 224).numpy()
    assert np.array_equal(gray[..., 0], gray[..., 2])  # grey stays grey


def test_determinism():
    rng = np.random.default_rng(8)
    for data in (_photo_jpeg(rng, 480, 360), _photo_jpeg(rng, 1024, 768)):
        a = transforms.decode_random_resized_crop(data, _key(5), 224).numpy()
        b = transforms.decode_random_resized_crop(data, _key(5), 224).numpy()
        c = transforms.decode_random_resized_crop(data, _key(6), 224).numpy()
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_errors():
    """Undecodable bytes raise InvalidArgumentError, like decode_image; so do truncated
    JPEGs even when the crop lies above the missing part (decode_and_crop_jpeg alone accepts
    those)."""
    rng = np.random.default_rng(9)
    tall = _photo_jpeg(rng, 256, 1200)
    cut = tall[: int(len(tall) * 0.8)]  # rows below ~900 missing
    with pytest.raises(tf.errors.InvalidArgumentError):
        transforms.decode_image(cut)
    # The center crop needs rows ~470-730 only, which decode_and_crop_jpeg alone returns.
    assert tf.io.decode_and_crop_jpeg(cut, [470, 0, 260, 256]).shape == (260, 256, 3)
    bad = [
        b"",
        b"not an image",
        b"\xff\xd8\xff" + b"garbage" * 20,
        cut,
        tall[:-1],
        _encode(_photo_array(rng, 40, 30), "PNG")[:-30],
    ]
    for data in bad:
        with pytest.raises(tf.errors.InvalidArgumentError):
            transforms.decode_random_resized_crop(data, _key(0), 64, scale=(0.04, 0.05))
        with pytest.raises(tf.errors.InvalidArgumentError):
            transforms.decode_resize_center_crop(data, 64)


def test_in_tf_data_graph():
    """Inside a tf.data map (graph mode) the outputs equal eager ones and bad samples are
    dropped by ignore_errors, as the pipeline's error guard does."""
    rng = np.random.default_rng(10)
    items = [
        _photo_jpeg(rng, 256, 256),
        _encode(_photo_array(rng, 100, 90), "PNG"),
        b"corrupt",
        _photo_jpeg(rng, 1000, 900),
    ]
    ds = tf.data.Dataset.from_tensor_slices(items).enumerate()
    ds = ds.map(
        lambda i, e: (
            transforms.decode_random_resized_crop(e, _key(0) + i, 96),
            transforms.decode_resize_center_crop(e, 96),
        )
    )
    got = list(ds.ignore_errors().as_numpy_iterator())
    assert len(got) == 3
    for (train, evals), i in zip(got, (0, 1, 3)):
        key = _key(0) + tf.constant(i, tf.int64)
        np.testing.assert_array_equal(
            train, transforms.decode_random_resized_crop(items[i], key, 96).numpy()
        )
        np.testing.assert_array_equal(
            evals, transforms.decode_resize_center_crop(items[i], 96).numpy()
        )


def test_random_flip_is_stateless_and_follows_its_probability():
    img = tf.constant(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    mirrored = img.numpy()[:, ::-1]
    flips = []
    for i in range(400):
        key = tf.constant([7, i], tf.int64)
        out = transforms.random_flip(img, key, 0.3).numpy()
        np.testing.assert_array_equal(out, transforms.random_flip(img, key, 0.3).numpy())
        flipped = np.array_equal(out, mirrored)
        assert flipped or np.array_equal(out, img.numpy())
        flips.append(flipped)
    assert 0.22 < np.mean(flips) < 0.38  # 0.3 +- 3.5 standard deviations
    never = transforms.random_flip(img, tf.constant([7, 0], tf.int64), 0.0).numpy()
    np.testing.assert_array_equal(never, img.numpy())
    always = transforms.random_flip(img, tf.constant([7, 0], tf.int64), 1.0).numpy()
    np.testing.assert_array_equal(always, mirrored)
