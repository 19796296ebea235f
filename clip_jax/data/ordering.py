"""Deterministic, exactly resumable record order: block shuffle, mixing, raw positions.

Why not `tf.data.Dataset.shuffle`: a sliding shuffle buffer's state after N records cannot be
rebuilt from N, so a resumed run would see a different order. Instead records are shuffled in
consecutive *blocks* of `block` raw records, block b permuted by a stateless permutation seeded
from (seed, b). Output position p then maps to a fixed raw record, and resuming after p records
means: skip the raw records of the p // block finished blocks (I/O only, nothing decoded),
rebuild the current block's permutation, and drop its first p % block entries. The memory cost
is that of a shuffle buffer of the same size (one block of encoded records, plus the next one
while it fills).

Positions: every element carries `position`, int64 `[num_sources + 1]`: for each source, how
many of its (shuffled) raw records have been consumed up to and including this element, and
last, how many mixed elements have been consumed. For a single source both numbers are equal.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

fold_in = tf.random.experimental.stateless_fold_in


def seed_key(seed: int, *salts: int) -> tf.Tensor:
    """A stateless-RNG key `int64 [2]` for `seed`, folded with `salts` (process, source, ...)."""
    key = tf.constant([seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF], tf.int64)
    for salt in salts:
        key = fold_in(key, tf.constant(salt, tf.int64))
    return key


def block_shuffle(raw: tf.data.Dataset, *, block: int, key: tf.Tensor, start: int = 0
                  ) -> tf.data.Dataset:
    """Shuffles `raw` within blocks of `block` records and skips the first `start` outputs.

    Adds `src_pos` (int64 scalar): 1-based position of each element in the shuffled order,
    i.e. the number of records of this source consumed once this element is taken.
    `block <= 1` keeps the raw order. Skipping happens before anything is decoded.
    """
    if start < 0:
        raise ValueError(f"start position must be >= 0, got {start}")
    if block <= 1:
        ds = raw.skip(start)
    else:
        first_block, within = divmod(start, block)

        def permute(block_index, records):
            n = tf.shape(records["key"])[0]
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n), fold_in(key, block_index))
            return {k: tf.gather(v, order) for k, v in records.items()}

        ds = raw.skip(first_block * block).batch(block)
        ds = ds.enumerate(start=first_block).map(permute).unbatch()
        ds = ds.skip(within)
    return ds.enumerate(start=start + 1).map(lambda pos, rec: {**rec, "src_pos": pos})


def mix(sources: Sequence[tf.data.Dataset], weights: Sequence[float], *, key: tf.Tensor,
        start: Sequence[int] | None = None) -> tf.data.Dataset:
    """Mixes endless per-source streams (from `block_shuffle`) and attaches `position`.

    Element i comes from source `categorical(weights)` drawn statelessly from (key, i), so the
    choice sequence is a pure function of the seed and can be restarted at any i.
    `start` is a previous `position` vector (per-source counts + mixed count); the sources must
    already have been skipped to their counts.

    Returns elements with `position` int64 [num_sources + 1] and `index` (int64, 0-based mixed
    element index, used to seed per-sample augmentation).
    """
    num = len(sources)
    start = list(start) if start is not None else [0] * (num + 1)
    if len(start) != num + 1:
        raise ValueError(f"start position has {len(start)} entries; expected {num + 1} "
                         f"({num} source counts + mixed count)")
    if num == 1:
        mixed = sources[0].map(lambda r: {**r, "source": tf.constant(0, tf.int64)})
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (num,) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixture weights {list(weights)} must be {num} non-negative "
                             "numbers with a positive sum")
        logits = tf.constant(np.log(np.maximum(w / w.sum(), 1e-30))[None, :], tf.float32)

        def choose(i):
            return tf.random.stateless_categorical(logits, 1, fold_in(key, i), dtype=tf.int64)[0, 0]

        choices = tf.data.Dataset.range(start[-1], tf.int64.max).map(choose)
        tagged = [s.map(lambda r, j=j: {**r, "source": tf.constant(j, tf.int64)})
                  for j, s in enumerate(sources)]
        mixed = tf.data.Dataset.choose_from_datasets(tagged, choices, stop_on_empty_dataset=True)

    init = (tf.constant(start[:num], tf.int64), tf.constant(start[-1], tf.int64))

    def track(state, rec):
        counts, n = state
        counts = tf.tensor_scatter_nd_update(counts, [[rec["source"]]], [rec["src_pos"]])
        out = {k: v for k, v in rec.items() if k not in ("src_pos", "source")}
        out["index"] = n
        out["position"] = tf.concat([counts, [n + 1]], axis=0)
        return (counts, n + 1), out

    return mixed.scan(init, track)


def normalize_start(start_position, num_sources: int) -> list[int] | None:
    """Accepts None, an int (single source) or a position vector; returns a list or None."""
    if start_position is None:
        return None
    arr = np.asarray(start_position, dtype=np.int64).reshape(-1)
    if arr.size == 1 and num_sources == 1:
        return [int(arr[0]), int(arr[0])]
    if arr.size != num_sources + 1:
        raise ValueError(f"start_position {arr.tolist()} has {arr.size} entries; this pipeline "
                         f"has {num_sources} source(s) and expects {num_sources + 1}")
    if np.any(arr < 0):
        raise ValueError(f"start_position {arr.tolist()} has negative entries")
    return [int(x) for x in arr]


def num_skipped(position, samples_delivered: int) -> int:
    """Bad (skipped) samples so far on this process: raw records consumed minus samples delivered.

    `position` is the last consumed batch's `position`; `samples_delivered` the number of samples
    this process has delivered in all batches up to it (steps * local batch size), including
    those before a resume.
    """
    consumed = int(np.asarray(position).reshape(-1)[-1])
    if samples_delivered > consumed:
        raise ValueError(f"{samples_delivered} samples delivered but only {consumed} consumed")
    return consumed - samples_delivered
