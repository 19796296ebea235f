"""Evaluators on non-demo sources (tar with classnames.txt, image folder, TFRecord with several
captions per image), checked against the same metrics computed from directly embedded inputs.
A random-init tiny model is enough: the point is data plumbing, not accuracy."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
from PIL import Image

from clip_jax import evaluation, tokenizers
from clip_jax import sharding as sharding_lib
from clip_jax.data.make_shards import Sample, write_tar_shard, write_tfrecord_shard
from clip_jax.embedder import Embedder
from clip_jax.evaluation.config import linear_probe_block, retrieval_block, zeroshot_block
from clip_jax.models import create_model, get_model_config

CLASSES = ["red", "green", "blue"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _image(color, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.asarray(color, np.int16)[None, None, :]
    noise = rng.integers(-30, 30, (64, 64, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # lossless: pixels survive exactly
    return buf.getvalue()


@pytest.fixture(scope="module")
def env():
    config = get_model_config("tiny-vit")
    model = create_model(config)
    variables = jax.jit(model.init_variables)(jax.random.key(1))
    mesh = sharding_lib.create_mesh()
    embedder = Embedder(model, variables, mesh, batch_size=8)
    return model, variables, tokenizers.get("clip-bpe"), mesh, embedder


def _labelled_images(n_per_class=3):
    return [
        (c, label, _image(COLORS[c], 10 * label + i))
        for label, c in enumerate(CLASSES)
        for i in range(n_per_class)
    ]


def _expected_zeroshot(embedder, tokenizer, images, labels, templates):
    class_emb = evaluation.class_embeddings(
        lambda t: embedder.embed_texts(t, tokenizer), CLASSES, evaluation.get_templates(templates)
    )
    return evaluation.zeroshot_metrics(
        embedder.embed_images(np.stack(images)), np.asarray(labels), class_emb, CLASSES
    )


def test_zeroshot_on_tar_with_classnames_file(env, tmp_path):
    model, variables, tok, mesh, embedder = env
    items = _labelled_images()
    samples = [
        Sample(f"{i:04d}", _png(im), "png", f"a {c} square", label)
        for i, (c, label, im) in enumerate(items)
    ]
    write_tar_shard(str(tmp_path / "00000.tar"), samples)
    (tmp_path / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    block = zeroshot_block(source="tar", shards=str(tmp_path / "*.tar"))
    block.templates = "photo"
    result = evaluation.evaluate_zeroshot(model, variables, tok, mesh, block, embedder=embedder)
    expected = _expected_zeroshot(
        embedder, tok, [im for _, _, im in items], [label for _, label, _ in items], "photo"
    )
    assert result.metrics == pytest.approx(expected.metrics)
    assert result.details["per_class_top1"] == expected.details["per_class_top1"]
    assert result.metrics["num_examples"] == 9 and "top5" not in result.metrics


def test_zeroshot_and_linear_probe_on_image_folder(env, tmp_path):
    model, variables, tok, mesh, embedder = env
    items = _labelled_images(4)
    for i, (c, _, im) in enumerate(items):
        (tmp_path / c).mkdir(exist_ok=True)
        Image.fromarray(im).save(tmp_path / c / f"{i}.png")
    block = zeroshot_block(source="image_folder", image_folder=str(tmp_path))
    result = evaluation.evaluate_zeroshot(model, variables, tok, mesh, block, embedder=embedder)
    # Folder names sort as blue, green, red: labels follow that order.
    order = sorted(CLASSES)
    assert list(result.details["per_class_top1"]) == order
    assert result.details["class_counts"] == {c: 4 for c in order}
    probe = linear_probe_block(source="image_folder", image_folder=str(tmp_path))
    probe.test_data = evaluation.config.data_block(
        source="image_folder", image_folder=str(tmp_path)
    )
    probe.val_fraction = 0.5
    probe.max_iters = 200
    out = evaluation.evaluate_linear_probe(model, variables, tok, mesh, probe, embedder=embedder)
    # Colours are trivially separable even for random features; test = train here.
    assert out.metrics["num_train"] == 12 and out.metrics["top1"] == 1.0


def test_retrieval_on_tfrecord_with_several_captions_per_image(env, tmp_path):
    model, variables, tok, mesh, embedder = env
    images = [_image(COLORS[c], s) for s, c in enumerate(["red", "green", "blue", "red"])]
    captions = {
        0: ["a red square", "red noise"],
        1: ["green"],
        2: ["blue", "a blue tile", "sky"],
        3: ["crimson"],
    }
    samples, text_to_image, texts = [], [], []
    # Captions of one image are not adjacent: grouping must go by key, not by position.
    for round_ in range(3):
        for i, caps in captions.items():
            if round_ < len(caps):
                samples.append(Sample(f"img{i}", _png(images[i]), "png", caps[round_]))
                texts.append(caps[round_])
    write_tfrecord_shard(str(tmp_path / "a.tfrecord"), samples)
    first_seen = list(dict.fromkeys(s.key for s in samples))
    text_to_image = [first_seen.index(s.key) for s in samples]
    block = retrieval_block(source="tfrecord", shards=str(tmp_path / "a.tfrecord"))
    block.ks = (1, 2)
    result = evaluation.evaluate_retrieval(model, variables, tok, mesh, block, embedder=embedder)
    assert result.metrics["num_images"] == 4 and result.metrics["num_texts"] == 7
    image_emb = embedder.embed_images(np.stack([images[int(k[3:])] for k in first_seen]))
    expected = evaluation.retrieval_metrics(
        image_emb, embedder.embed_texts(texts, tok), np.asarray(text_to_image), ks=(1, 2)
    )
    assert result.metrics == pytest.approx(expected.metrics)
