"""`clip_jax.load` on a random-init tiny model saved like converted weights: shapes, norms,
batching/padding, resizing, error messages."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from clip_jax import model_store
from clip_jax.checkpoint import CheckpointError
from clip_jax.inference import load, preprocess_images
from clip_jax.models import create_model, get_model_config


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    config = get_model_config("tiny-vit")
    variables = jax.jit(create_model(config).init_variables)(jax.random.key(0))
    return str(
        model_store.save_converted(tmp_path_factory.mktemp("tiny") / "conv", config, variables)
    )


@pytest.fixture(scope="module")
def model(converted_dir):
    return load(converted_dir, batch_size=8)


def _images(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_encode_shapes_norms_and_padding(model):
    images = _images(11)  # 11 rows with batch 8: two calls, the second padded
    emb = model.encode_image(images)
    assert emb.shape == (11, model.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # Padding rows never leak into real rows: the same images embedded alone agree.
    np.testing.assert_allclose(model.encode_image(images[8:9]), emb[8:9], atol=1e-5)
    np.testing.assert_allclose(model.encode_image(images[:3]), emb[:3], atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    txt = model.encode_text(["a photo of a dog", "a drawing of a cat"])
    assert txt.shape == (2, model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.encode_text("a photo of a dog"), txt[:1], atol=1e-6)


def test_classify_probabilities(model):
    probs = model.classify(_images(3), ["dog", "cat", "car"], templates="openai7")
    assert probs.shape == (3, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # Same as computing it by hand from the embeddings.
    img = model.encode_image(_images(3))
    cls = model.classifier(["dog", "cat", "car"], "openai7")
    logits = model.logit_scale * img @ cls.T
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    assert model.logit_scale == pytest.approx(np.exp(2.6592600369644165), rel=1e-5)


def test_images_of_any_size_are_resized_and_center_cropped(model):
    # A 96x64 image: shorter side is 64 already, the center crop keeps rows 16..80.
    tall = np.random.default_rng(1).integers(0, 256, (96, 64, 3), dtype=np.uint8)
    out = preprocess_images([tall], 64)
    np.testing.assert_array_equal(out[0], tall[16:80])
    # A 128x128 image is downscaled; a mixed list works; a PIL image is accepted.
    from PIL import Image

    big = np.full((128, 128, 3), 200, np.uint8)
    emb = model.encode_image([tall, big, Image.fromarray(big)])
    assert emb.shape == (3, model.embed_dim)
    np.testing.assert_allclose(emb[1], emb[2], atol=1e-6)
    np.testing.assert_allclose(emb[0], model.encode_image(tall[None, 16:80])[0], atol=1e-5)
    np.testing.assert_array_equal(preprocess_images(big[None], 64)[0], np.full((64, 64, 3), 200))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros((2, 64, 64, 3), np.float32), TypeError, "dtype float32; expected uint8"),
        (np.zeros((64, 64, 3), np.uint8), ValueError, r"use images\[None\]"),
        (np.zeros((2, 64, 64), np.uint8), ValueError, r"expected uint8 \[N, H, W, 3\]"),
        (np.zeros((2, 64, 64, 4), np.uint8), ValueError, "expected uint8"),
        ([np.zeros((64, 64), np.uint8)], ValueError, r"image 0 has shape \(64, 64\)"),
        ([np.zeros((8, 8, 3), np.int64)], TypeError, "image 0 has dtype int64"),
        (np.zeros((0, 64, 64, 3), np.uint8), ValueError, "empty"),
    ],
)
def test_bad_images_give_clear_errors(model, bad, error, match):
    with pytest.raises(error, match=match):
        model.encode_image(bad)


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither a training workdir"):
        load(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load(tmp_path)


def test_converted_dir_has_no_steps(converted_dir):
    with pytest.raises(CheckpointError, match="no steps"):
        load(converted_dir, step=3)
