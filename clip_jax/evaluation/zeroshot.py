"""Zero-shot classification: class names x prompt templates -> text classifier -> accuracy.

As in the CLIP paper: each class's prompts are embedded and L2-normalised, averaged, and the
mean re-normalised (prompt ensembling); an image is assigned the class whose embedding has the
highest cosine similarity with it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from clip_jax.embedder import Embedder
from clip_jax.evaluation import data as data_lib
from clip_jax.evaluation.result import EvalResult, get_option
from clip_jax.evaluation.templates import format_prompts, get_templates


def class_embeddings(
    embed_texts: Callable[[list[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str],
    cache: dict[tuple[tuple[str, ...], str], np.ndarray] | None = None,
) -> np.ndarray:
    """float32 [C, D] unit-norm class embeddings.

    `embed_texts`: strings -> float32 [N, D] unit-norm embeddings (e.g. `Embedder.embed_texts`
    with a tokenizer bound). `cache`: {(templates, classname): [D] row} shared between calls
    with the same model; only classes not in it are embedded (ImageNet-V2/-Sketch/-A/-R reuse
    ImageNet's 1,000 x 80 prompts instead of embedding them again).
    """
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    templates = tuple(templates)
    cache = {} if cache is None else cache
    missing = list(dict.fromkeys(c for c in classnames if (templates, c) not in cache))
    if missing:
        prompts = format_prompts(missing, templates)
        emb = np.asarray(embed_texts(prompts), np.float32)
        emb = emb.reshape(len(missing), len(templates), -1).mean(axis=1)
        emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        cache.update(((templates, c), row) for c, row in zip(missing, emb))
    return np.stack([cache[(templates, c)] for c in classnames])


def remap_labels(labels: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
    """int [N] source labels -> int [N] classifier rows: label `class_indices[i]` becomes i.

    For benchmarks that classify among a subset of the source's label space (ImageNet-A/-R:
    200 of the 1,000 ImageNet labels). Raises ValueError when a label is not in the subset.
    """
    labels = np.asarray(labels, np.int64)
    indices = np.asarray(class_indices, np.int64)
    if indices.ndim != 1 or len(np.unique(indices)) != len(indices) or indices.min() < 0:
        raise ValueError("class_indices must be distinct non-negative labels")
    lookup = np.full(max(int(indices.max()), int(labels.max(initial=0))) + 1, -1, np.int64)
    lookup[indices] = np.arange(len(indices))
    rows = lookup[labels]
    if (rows < 0).any():
        bad = sorted(set(labels[rows < 0].tolist()))
        raise ValueError(
            f"{int((rows < 0).sum())} image(s) have labels outside the "
            f"{len(indices)} classes of class_indices (e.g. {bad[:5]})"
        )
    return rows


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: the label is among the k highest scores of its row (scores float [N, C]).

    Ties are broken towards the lower class index, as `argmax` does, so top-1 agrees with
    `scores.argmax(1) == labels` exactly.
    """
    n = np.arange(scores.shape[1])[None, :]
    label_scores = np.take_along_axis(scores, labels[:, None], axis=1)
    ahead = (scores > label_scores) | ((scores == label_scores) & (n < labels[:, None]))
    return ahead.sum(axis=1) < k


def zeroshot_metrics(
    image_emb: np.ndarray,
    labels: np.ndarray,
    class_emb: np.ndarray,
    classnames: Sequence[str] | None = None,
) -> EvalResult:
    """Accuracy of nearest-class-embedding predictions.

    Args:
      image_emb: float32 [N, D] unit-norm image embeddings.
      labels: int [N] in [0, C).
      class_emb: float32 [C, D] unit-norm class embeddings.
    Returns metrics top1, top5 (only with >= 5 classes), mean_per_class (balanced accuracy
    over the classes present), num_examples; details hold per-class accuracy and counts, the
    chance level (1/C) and the majority-class baseline.
    """
    labels = np.asarray(labels, np.int64)
    num_classes = class_emb.shape[0]
    if len(labels) == 0:
        raise ValueError("zero-shot evaluation got no labelled images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got {labels.min()}.."
            f"{labels.max()} (do the class names match the data?)"
        )
    scores = image_emb @ class_emb.T
    correct1 = topk_correct(scores, labels, 1)
    metrics = {"top1": float(correct1.mean())}
    if num_classes >= 5:
        metrics["top5"] = float(topk_correct(scores, labels, 5).mean())
    counts = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=correct1, minlength=num_classes)
    present = counts > 0
    per_class = np.where(present, hits / np.maximum(counts, 1), np.nan)
    metrics["mean_per_class"] = float(np.mean(per_class[present]))
    metrics["num_examples"] = float(len(labels))
    names = list(classnames) if classnames is not None else [str(i) for i in range(num_classes)]
    predictions = scores.argmax(axis=1)
    details = {
        "num_classes": int(num_classes),
        "chance_top1": 1.0 / num_classes,
        "majority_baseline_top1": float(counts.max() / len(labels)),
        "per_class_top1": {
            n: (None if np.isnan(a) else float(a)) for n, a in zip(names, per_class)
        },
        "class_counts": {n: int(c) for n, c in zip(names, counts)},
        "predicted_counts": {
            n: int(c) for n, c in zip(names, np.bincount(predictions, minlength=num_classes))
        },
    }
    return EvalResult(metrics, details)


def evaluate_zeroshot(
    model,
    variables: dict[str, Any],
    tokenizer,
    mesh,
    config,
    embedder: Embedder | None = None,
    class_cache: dict | None = None,
) -> EvalResult:
    """Zero-shot accuracy on the labelled source `config.data`.

    `config` (an evaluator block of `clip_jax.evaluation.config`): data, classnames, templates,
    batch_size, resize_method, and optionally class_indices (the source labels the class names
    stand for, when they are a subset; see `remap_labels`). `embedder` reuses compiled
    embedding functions if given; `class_cache` reuses class embeddings (`class_embeddings`).
    """
    spec = data_lib.source_spec(get_option(config, "data", {}), "zeroshot.data")
    classnames = data_lib.classnames_for(spec, get_option(config, "classnames", None))
    templates = get_templates(get_option(config, "templates", "generic"))
    class_indices = tuple(get_option(config, "class_indices", ()))
    if class_indices and len(class_indices) != len(classnames):
        raise ValueError(
            f"zero-shot: {len(class_indices)} class_indices for {len(classnames)} class names"
        )
    embedder = embedder or Embedder(model, variables, mesh, get_option(config, "batch_size", 256))
    class_emb = class_embeddings(
        lambda t: embedder.embed_texts(t, tokenizer), classnames, templates, class_cache
    )
    cfg = model.config
    data = embedder.embed_dataset(
        data_lib.eval_batches(
            spec,
            image_size=cfg.image_size,
            tokenizer=None,
            context_length=cfg.context_length,
            batch_size=embedder.batch_size,
            resize_method=get_option(config, "resize_method", "bicubic"),
            with_text=False,
        ),
        with_text=False,
    )
    labelled = data["label"] >= 0
    if not labelled.all():
        logging.warning(
            "zero-shot: %d of %d samples have no label and are skipped",
            int((~labelled).sum()),
            len(labelled),
        )
    labels = data["label"][labelled]
    if class_indices:
        labels = remap_labels(labels, class_indices)
    result = zeroshot_metrics(data["image"][labelled], labels, class_emb, classnames)
    result.details["num_templates"] = len(templates)
    return result
