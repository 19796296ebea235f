"""Synthetic in-memory training data: a deterministic pool of random images and token rows.

Two uses: benchmarks that must not be limited by decoding ("synthetic-from-memory input"), and
tests that compare runs with different process counts. Global sample `g` is always pool item
`g % pool_size`, and process `p` of `P` takes rows `[p*b, (p+1)*b)` of every global batch of
`P*b` rows, so the global batch is the same whatever the number of processes.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def make_pool(
    pool_size: int, image_size: int, context_length: int, vocab_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, S, S, 3] images and int32 [N, L] token rows (random length, EOT-terminated,
    zero-padded). Images are smooth colour fields so they compress and resize like photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (pool_size, 4, 4, 3), dtype=np.uint8)
    repeat = -(-image_size // 4)
    images = coarse.repeat(repeat, axis=1).repeat(repeat, axis=2)[:, :image_size, :image_size]
    lengths = rng.integers(2, context_length + 1, pool_size)
    tokens = rng.integers(1, vocab_size - 1, (pool_size, context_length)).astype(np.int32)
    positions = np.arange(context_length)[None, :]
    tokens = np.where(positions < lengths[:, None] - 1, tokens, 0)
    tokens[np.arange(pool_size), lengths - 1] = vocab_size - 1  # end-of-text: the last id
    return np.ascontiguousarray(images), tokens


def synthetic_train_dataset(
    *,
    pool_size: int,
    image_size: int,
    context_length: int,
    vocab_size: int,
    local_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    start_position: int = 0,
) -> tf.data.Dataset:
    """Endless batches {image, text, position}; position counts this process's samples, as
    for the real sources (so resume works the same way)."""
    images, tokens = make_pool(pool_size, image_size, context_length, vocab_size, seed)
    images, tokens = tf.constant(images), tf.constant(tokens)
    if start_position % local_batch_size:
        raise ValueError(
            f"synthetic start position {start_position} is not a multiple of the "
            f"local batch size {local_batch_size}"
        )
    first_batch = start_position // local_batch_size
    global_batch = local_batch_size * process_count

    def batch_at(k):
        rows = (
            k * global_batch
            + process_index * local_batch_size
            + tf.range(local_batch_size, dtype=tf.int64)
        )
        rows = rows % pool_size
        consumed = (k + 1) * local_batch_size
        return {
            "image": tf.gather(images, rows),
            "text": tf.gather(tokens, rows),
            "position": tf.stack([consumed, consumed]),
        }

    ds = tf.data.Dataset.range(first_batch, np.iinfo(np.int64).max).map(
        batch_at, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return ds.prefetch(2)
