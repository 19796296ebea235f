"""Image-text retrieval: recall@k in both directions, several captions per image.

Image -> text: an image query is correct at k when any of its captions is among the k texts
most similar to it. Text -> image: a caption query is correct at k when its image is among the
k most similar images. Ties are broken towards the lower index (as a stable sort), so results
never depend on the order of floating-point equal scores being the "lucky" one.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from clip_jax.embedder import Embedder
from clip_jax.evaluation import data as data_lib
from clip_jax.evaluation.result import EvalResult, get_option

# Image rows scored per block: bounds the [block, num_texts] similarity matrix in memory.
_BLOCK = 1024


def image_to_text_ranks(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray
) -> np.ndarray:
    """int [Ni]: 0-based rank of each image's best-ranked own caption among all texts.

    Args:
      image_emb: float32 [Ni, D]; text_emb: float32 [Nt, D] (unit norm);
      text_to_image: int [Nt], the image index of every caption (each image needs >= 1).
    """
    num_images = image_emb.shape[0]
    counts = np.bincount(text_to_image, minlength=num_images)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} images have no caption")
    order = np.arange(text_emb.shape[0])
    ranks = np.empty(num_images, np.int64)
    for start in range(0, num_images, _BLOCK):
        rows = np.arange(start, min(start + _BLOCK, num_images))
        sims = image_emb[rows] @ text_emb.T  # [b, Nt]
        own = text_to_image[None, :] == rows[:, None]  # [b, Nt]
        best = np.where(own, sims, -np.inf).max(axis=1)  # [b]
        # The first own caption (lowest index) holding the best score defines the tie-break.
        first = np.where(own & (sims == best[:, None]), order[None, :], order.size).min(axis=1)
        tied_before = (sims == best[:, None]) & (order[None, :] < first[:, None])
        ahead = (sims > best[:, None]) | tied_before
        ranks[rows] = ahead.sum(axis=1)
    return ranks


def text_to_image_ranks(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray
) -> np.ndarray:
    """int [Nt]: 0-based rank of each caption's own image among all images."""
    order = np.arange(image_emb.shape[0])
    ranks = np.empty(text_emb.shape[0], np.int64)
    for start in range(0, text_emb.shape[0], _BLOCK):
        cols = np.arange(start, min(start + _BLOCK, text_emb.shape[0]))
        sims = text_emb[cols] @ image_emb.T  # [b, Ni]
        target = text_to_image[cols]
        own = np.take_along_axis(sims, target[:, None], axis=1)  # [b, 1]
        ahead = (sims > own) | ((sims == own) & (order[None, :] < target[:, None]))
        ranks[cols] = ahead.sum(axis=1)
    return ranks


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> EvalResult:
    """Recall@k both ways: metrics `image_to_text_R@k`, `text_to_image_R@k`, `mean_recall`
    (mean over all of them), `num_images`, `num_texts`; details hold the chance levels
    (expected recall of a random ranking) and median ranks (1-based)."""
    text_to_image = np.asarray(text_to_image, np.int64)
    i2t = image_to_text_ranks(image_emb, text_emb, text_to_image)
    t2i = text_to_image_ranks(image_emb, text_emb, text_to_image)
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    metrics, chance = {}, {}
    caps = np.bincount(text_to_image, minlength=num_images)
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = float((i2t < k).mean())
        metrics[f"text_to_image_R@{k}"] = float((t2i < k).mean())
        # Random ranking: P(none of an image's c captions in the top k of Nt) = C(Nt-c,k)/C(Nt,k).
        chance[f"image_to_text_R@{k}"] = float(
            np.mean([_hit_chance(num_texts, c, k) for c in caps])
        )
        chance[f"text_to_image_R@{k}"] = min(k, num_images) / num_images
    metrics["mean_recall"] = float(np.mean(list(metrics.values())))
    metrics["num_images"] = float(num_images)
    metrics["num_texts"] = float(num_texts)
    details = {
        "chance": chance,
        "image_to_text_median_rank": float(np.median(i2t) + 1),
        "text_to_image_median_rank": float(np.median(t2i) + 1),
    }
    return EvalResult(metrics, details)


def _hit_chance(n: int, c: int, k: int) -> float:
    """P(at least one of c marked items among k drawn without replacement from n)."""
    miss = 1.0
    for i in range(min(k, n)):
        miss *= max(n - c - i, 0) / (n - i)
    return 1.0 - miss


def group_captions(keys: np.ndarray, captions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample rows (one caption each, images repeated per caption) -> (image_rows int [Ni],
    text_to_image int [Nt]) over the rows with a non-empty caption: the first row of every key
    is its image; every captioned row is a text pointing at its key's image."""
    image_of_key: dict[str, int] = {}
    image_rows, text_to_image = [], []
    for row, (key, caption) in enumerate(zip(keys, captions)):
        if not caption:
            continue
        if key not in image_of_key:
            image_of_key[key] = len(image_rows)
            image_rows.append(row)
        text_to_image.append(image_of_key[key])
    return np.asarray(image_rows, np.int64), np.asarray(text_to_image, np.int64)


def evaluate_retrieval(
    model, variables: dict[str, Any], tokenizer, mesh, config, embedder: Embedder | None = None
) -> EvalResult:
    """Recall@k on the image-caption source `config.data` (several captions of one image share
    its key; images are deduplicated by key). Options: data, ks, batch_size, resize_method."""
    spec = data_lib.source_spec(get_option(config, "data", {}), "retrieval.data")
    if spec.source == "image_folder":
        raise ValueError("retrieval needs captions; source 'image_folder' has none")
    ks = tuple(int(k) for k in get_option(config, "ks", (1, 5, 10)))
    if not ks or min(ks) < 1:
        raise ValueError(f"retrieval ks={ks!r} must be positive integers")
    embedder = embedder or Embedder(model, variables, mesh, get_option(config, "batch_size", 256))
    cfg = model.config
    data = embedder.embed_dataset(
        data_lib.eval_batches(
            spec,
            image_size=cfg.image_size,
            tokenizer=tokenizer,
            context_length=cfg.context_length,
            batch_size=embedder.batch_size,
            resize_method=get_option(config, "resize_method", "bicubic"),
        )
    )
    image_rows, text_to_image = group_captions(data["key"], data["caption"])
    if len(image_rows) == 0:
        raise ValueError(f"retrieval data {spec} has no captioned samples")
    captioned = np.asarray([bool(c) for c in data["caption"]])
    return retrieval_metrics(data["image"][image_rows], data["text"][captioned], text_to_image, ks)
