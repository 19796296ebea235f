"""Evaluation metrics on hand-made inputs with exact expected values (no model involved)."""

from __future__ import annotations

import numpy as np
import pytest

from clip_jax.evaluation import config as eval_config
from clip_jax.evaluation.linear_probe import (
    LogisticRegression,
    few_shot_indices,
    hash_fraction,
    linear_probe_metrics,
)
from clip_jax.evaluation.retrieval import (
    group_captions,
    image_to_text_ranks,
    retrieval_metrics,
    text_to_image_ranks,
)
from clip_jax.evaluation.templates import IMAGENET80, TEMPLATE_SETS, format_prompts, get_templates
from clip_jax.evaluation.zeroshot import class_embeddings, topk_correct, zeroshot_metrics

# Retrieval fixture: 3 images, 5 captions (image 0 and 2 have two each). With identity image
# embeddings, similarity[i, t] = TEXT[t, i], i.e. the matrix below read row = image.
SIMS = np.array(
    [
        [0.1, 0.9, 0.8, 0.0, 0.2],  # image 0, own captions t0, t1: best t1 ranks 0
        [0.7, 0.6, 0.5, 0.3, 0.1],  # image 1, own caption t2 (0.5): two texts ahead -> rank 2
        [0.9, 0.2, 0.95, 0.4, 0.3],  # image 2, own t3 (0.4), t4: t0 and t2 ahead -> rank 2
    ]
)
TEXT_TO_IMAGE = np.array([0, 0, 1, 2, 2])


def _retrieval_inputs():
    return np.eye(3, dtype=np.float32), SIMS.T.astype(np.float32).copy()


def test_recall_at_k_with_several_captions_per_image():
    images, texts = _retrieval_inputs()
    np.testing.assert_array_equal(image_to_text_ranks(images, texts, TEXT_TO_IMAGE), [0, 2, 2])
    # Per caption, the rank of its image in its column: t0 -> 2, t1 -> 0, t2 -> 2, t3, t4 -> 0.
    np.testing.assert_array_equal(
        text_to_image_ranks(images, texts, TEXT_TO_IMAGE), [2, 0, 2, 0, 0]
    )
    m = retrieval_metrics(images, texts, TEXT_TO_IMAGE, ks=(1, 2, 3)).metrics
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@3"] == 1.0
    assert m["text_to_image_R@1"] == pytest.approx(3 / 5)
    assert m["text_to_image_R@2"] == pytest.approx(3 / 5)
    assert m["text_to_image_R@3"] == 1.0
    assert m["num_images"] == 3 and m["num_texts"] == 5
    assert m["mean_recall"] == pytest.approx(np.mean([1 / 3, 1 / 3, 1, 3 / 5, 3 / 5, 1]))


def test_retrieval_chance_levels():
    images, texts = _retrieval_inputs()
    chance = retrieval_metrics(images, texts, TEXT_TO_IMAGE, ks=(1,)).details["chance"]
    # Image query: 2 of 5 captions own for images 0, 2; 1 of 5 for image 1.
    assert chance["image_to_text_R@1"] == pytest.approx((2 / 5 + 1 / 5 + 2 / 5) / 3)
    assert chance["text_to_image_R@1"] == pytest.approx(1 / 3)


def test_retrieval_ties_go_to_the_lower_index():
    images = np.eye(2, dtype=np.float32)
    texts = np.array([[1.0, 1.0], [1.0, 1.0]], np.float32)  # every score equal
    # Image 0 owns t0 (first in a tie: rank 0); image 1 owns t1 (t0 is ahead: rank 1).
    np.testing.assert_array_equal(image_to_text_ranks(images, texts, np.array([0, 1])), [0, 1])
    np.testing.assert_array_equal(text_to_image_ranks(images, texts, np.array([0, 1])), [0, 1])


def test_image_without_caption_is_an_error():
    images, texts = _retrieval_inputs()
    with pytest.raises(ValueError, match="1 images have no caption"):
        image_to_text_ranks(images, texts[:3], np.array([0, 0, 2]))


def test_group_captions_deduplicates_images_by_key():
    keys = np.array(["a", "a", "b", "c", "c", "d"], dtype=object)
    captions = np.array(["a1", "a2", "b1", "c1", "c2", ""], dtype=object)
    image_rows, text_to_image = group_captions(keys, captions)
    np.testing.assert_array_equal(image_rows, [0, 2, 3])  # "d" has no caption
    np.testing.assert_array_equal(text_to_image, [0, 0, 1, 2, 2])


def test_zeroshot_accuracy_on_hand_made_embeddings():
    class_emb = np.eye(6, dtype=np.float32)  # score of class c = image_emb[:, c]
    image_emb = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 1: rank 1 (top-5 hit)
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 5 (top-5 miss)
            [0.2, 0.3, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1 (top-5 hit)
        ],
        np.float32,
    )
    labels = np.array([0, 1, 5, 0])
    names = ["a", "b", "c", "d", "e", "f"]
    result = zeroshot_metrics(image_emb, labels, class_emb, names)
    assert result.metrics["top1"] == 0.25
    assert result.metrics["top5"] == 0.75
    assert result.metrics["mean_per_class"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert result.metrics["num_examples"] == 4
    d = result.details
    assert d["per_class_top1"] == {"a": 0.5, "b": 0.0, "c": None, "d": None, "e": None, "f": 0.0}
    assert d["class_counts"]["a"] == 2 and d["majority_baseline_top1"] == 0.5
    assert d["chance_top1"] == pytest.approx(1 / 6)
    assert d["predicted_counts"] == {"a": 3, "b": 1, "c": 0, "d": 0, "e": 0, "f": 0}


def test_zeroshot_without_top5_below_five_classes_and_label_check():
    class_emb = np.eye(3, dtype=np.float32)
    metrics = zeroshot_metrics(np.eye(3, dtype=np.float32), np.array([0, 1, 2]), class_emb).metrics
    assert metrics["top1"] == 1.0 and "top5" not in metrics
    with pytest.raises(ValueError, match="labels must lie in"):
        zeroshot_metrics(np.eye(3, dtype=np.float32), np.array([0, 1, 3]), class_emb)


def test_topk_tie_break_matches_argmax():
    scores = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    np.testing.assert_array_equal(topk_correct(scores, np.array([0, 1]), 1), [True, False])
    np.testing.assert_array_equal(topk_correct(scores, np.array([0, 1]), 2), [True, True])


def test_class_embeddings_average_templates_and_renormalise():
    rows = {"x 0": [1.0, 0.0], "y 0": [0.0, 1.0], "x 1": [1.0, 0.0], "y 1": [1.0, 0.0]}
    emb = class_embeddings(
        lambda prompts: np.array([rows[p] for p in prompts]), ["0", "1"], ["x {}", "y {}"]
    )
    np.testing.assert_allclose(emb, [[2**-0.5, 2**-0.5], [1.0, 0.0]], rtol=1e-6)


def test_templates():
    assert len(IMAGENET80) == 80 and len(set(IMAGENET80)) == 80
    for name, templates in TEMPLATE_SETS.items():
        assert all(t.count("{}") == 1 for t in templates), name
    assert get_templates(["a {} b"]) == ("a {} b",)
    assert format_prompts(["cat", "dog"], ["a {}", "b {}"]) == ["a cat", "b cat", "a dog", "b dog"]
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("imagenet81")
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(["no placeholder"])


def _blobs(n_per_class: int, num_classes: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)) * 3
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return centers[labels] + rng.normal(size=(len(labels), dim)), labels


def test_linear_probe_beats_chance_on_separable_features():
    x, y = _blobs(40, 4, 16, seed=0)
    xt, yt = _blobs(20, 4, 16, seed=0)  # same centers (same seed), fresh noise below
    xt = xt + np.random.default_rng(1).normal(size=xt.shape)
    keys = [f"{i:05d}" for i in range(len(y))]
    result = linear_probe_metrics(x, y, keys, xt, yt, 4, max_iters=300, l2_grid=(1e-4, 1e-2, 1.0))
    assert result.metrics["top1"] >= 0.95, result.metrics  # chance: 0.25
    assert result.metrics["num_train"] == 160 and result.metrics["num_test"] == 80
    assert set(result.details["val_top1_by_l2"]) == {"0.0001", "0.01", "1"}
    few = linear_probe_metrics(x, y, keys, xt, yt, 4, max_iters=300, l2_grid=(1e-2,), few_shot=5)
    assert few.metrics["num_train"] == 20 and few.metrics["top1"] >= 0.8


def test_linear_probe_fails_on_random_labels():
    """Negative control: with labels unrelated to the features it stays near chance."""
    x, _ = _blobs(50, 4, 16, seed=0)
    y = np.random.default_rng(3).integers(0, 4, len(x))
    keys = [str(i) for i in range(len(y))]
    result = linear_probe_metrics(
        x[:150], y[:150], keys[:150], x[150:], y[150:], 4, max_iters=300, l2_grid=(1e-2, 1.0)
    )
    assert result.metrics["top1"] < 0.5


def test_logistic_regression_fits_training_data():
    x, y = _blobs(30, 3, 8, seed=2)
    probe = LogisticRegression(l2=1e-4, max_iters=500).fit(x, y, 3)
    assert (probe.predict(x) == y).mean() == 1.0
    assert probe.decision_function(x).shape == (90, 3)


def test_hash_splits_are_independent_and_stable():
    keys = [f"{i:06d}" for i in range(0, 4000, 9)]
    test = hash_fraction(keys, "test0") < 0.3
    val = hash_fraction([k for k, t in zip(keys, test) if not t], "val0") < 0.2
    assert 0.2 < test.mean() < 0.4 and 0.1 < val.mean() < 0.3
    np.testing.assert_array_equal(hash_fraction(keys, "test0"), hash_fraction(keys, "test0"))


def test_few_shot_indices_take_k_per_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    idx = few_shot_indices(labels, [str(i) for i in range(6)], k=2, seed=0)
    assert np.bincount(labels[idx]).tolist() == [2, 2, 1]


def test_default_eval_config_validates_and_rejects_bad_types():
    c = eval_config.get_default_config()
    eval_config.validate(c)
    assert sorted(c.evaluators) == ["linear_probe", "retrieval", "zeroshot"]
    assert c.evaluators.zeroshot.data.split == "classify"
    assert c.evaluators.retrieval.data.split == "heldout"
    c.evaluators.zeroshot.type = "zero-shot"
    with pytest.raises(ValueError, match=r"eval.evaluators.zeroshot.type='zero-shot'"):
        eval_config.validate(c)
    c = eval_config.get_default_config()
    c.evaluators.retrieval.data.split = "validation"
    with pytest.raises(ValueError, match=r"eval.evaluators.retrieval.data.split='validation'"):
        eval_config.validate(c)
    c = eval_config.get_default_config()
    c.evaluators.zeroshot.templates = "imagenet"
    with pytest.raises(ValueError, match=r"zeroshot.templates: unknown template set"):
        eval_config.validate(c)
    c = eval_config.get_default_config()
    c.evaluators.extra = eval_config.retrieval_block(source="image_folder", image_folder="/x")
    with pytest.raises(ValueError, match="retrieval needs captions"):
        eval_config.validate(c)


def test_summary_puts_each_evaluator_next_to_chance_and_majority():
    from clip_jax.evaluation.summary import summarize

    result = retrieval_metrics(np.eye(4), np.eye(4)[[0, 1, 3, 2]], np.arange(4), ks=(1, 2))
    metrics = {f"retrieval/{k}": v for k, v in result.metrics.items()}
    metrics.update({"zeroshot/top1": 0.38, "zeroshot/top5": 0.7, "probe/top1": 0.1})
    details = {
        "zeroshot": {"type": "zeroshot", "chance_top1": 1 / 18, "majority_baseline_top1": 0.0935},
        "retrieval": dict(result.details, type="retrieval"),
        "probe": {"type": "linear_probe", "chance_top1": 0.5, "majority_baseline_top1": 0.6},
    }
    assert summarize(metrics, details) == [
        "zeroshot: top-1 38.0% vs chance 5.6% and majority class 9.3% (6.8x chance); top-5 70.0%",
        "retrieval: image->text R@1/2 50.0/50.0% vs chance 25.0/50.0%; "
        "text->image R@1/2 50.0/50.0% vs chance 25.0/50.0%",
        "probe: top-1 10.0% vs chance 50.0% and majority class 60.0% (0.2x chance)",
    ]
