"""Decode + crop + resize throughput: two-step (full decode, then crop/resize) vs one-step
(`decode_random_resized_crop` / `decode_resize_center_crop`, which decode only the window used).

For each source size, a pool of synthetic photo-like JPEGs (`input_pipeline.synthetic_photo`)
is mapped in a plain tf.data pipeline with a fixed `num_parallel_calls` and a private thread
pool of the same size (one intra-op thread per call). Two per-core rates: samples per CPU
second of the process (`cpu_*`, robust to other load on a shared machine) and samples per wall
second / num_parallel_calls (`wall_*`, right on an idle machine). Old and new alternate within
each round, in the same process; medians over rounds, the ratio of medians and the spread
(min, max) of the per-round ratios. One JSON line per (source size, transform):

    python benchmarks/decode.py [--sizes 16x16,256x256,480x360,1024x768 --rounds 5 \
        --samples 400 --parallel 1 --image-size 224 --resize-method bicubic]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from input_pipeline import synthetic_photo  # noqa: E402

from clip_jax.data import transforms  # noqa: E402


def _variants(size: int, method: str):
    """name -> fn(encoded, index) -> uint8 [size, size, 3]; (old, new) pairs by prefix."""
    def key(index):
        return tf.stack([tf.constant(17, tf.int64), index])

    return {
        "train_old": lambda e, i: transforms.random_resized_crop(
            transforms.decode_image(e), key(i), size, method=method),
        "train_new": lambda e, i: transforms.decode_random_resized_crop(
            e, key(i), size, method=method),
        "eval_old": lambda e, i: transforms.resize_center_crop(
            transforms.decode_image(e), size, method=method),
        "eval_new": lambda e, i: transforms.decode_resize_center_crop(e, size, method=method),
    }


def _dataset(pool: list[bytes], fn, samples: int, parallel: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(pool).repeat().take(samples).enumerate()
    ds = ds.map(lambda i, e: tf.reduce_sum(tf.cast(fn(e, i), tf.int32)),
                num_parallel_calls=parallel, deterministic=False)
    options = tf.data.Options()
    options.threading.private_threadpool_size = parallel
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return ds.with_options(options)


def _rate(ds: tf.data.Dataset, samples: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in ds:
        pass
    return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16x16,256x256,480x360,1024x768",
                        help="source JPEG sizes, WxH, comma separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=400, help="samples per timed run")
    parser.add_argument("--parallel", type=int, default=1, help="num_parallel_calls = threads")
    parser.add_argument("--pool", type=int, default=32, help="distinct JPEGs per size")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-method", default="bicubic")
    parser.add_argument("--only", default="train,eval", help="transforms to run")
    args = parser.parse_args()

    variants = _variants(args.image_size, args.resize_method)
    rng = np.random.default_rng(0)
    for spec in args.sizes.split(","):
        width, height = (int(v) for v in spec.split("x"))
        pool = [synthetic_photo(rng, width, height) for _ in range(args.pool)]
        for kind in args.only.split(","):
            names = (f"{kind}_old", f"{kind}_new")
            datasets = {n: _dataset(pool, variants[n], args.samples, args.parallel)
                        for n in names}
            for n in names:  # warm-up: traces the functions, fills caches
                _rate(datasets[n].take(max(args.samples // 8, 1)), max(args.samples // 8, 1))
            wall: dict[str, list[float]] = {n: [] for n in names}
            cpu: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    w, c = _rate(datasets[n], args.samples)
                    wall[n].append(w)
                    cpu[n].append(c)
            line = {"source": f"{width}x{height}", "transform": kind,
                    "image_size": args.image_size, "method": args.resize_method,
                    "parallel": args.parallel,
                    "mean_jpeg_kb": round(sum(map(len, pool)) / len(pool) / 1024, 1)}
            for label, rates, per in (("cpu", cpu, 1), ("wall", wall, args.parallel)):
                old, new = (statistics.median(rates[n]) for n in names)
                ratios = [b / a for a, b in zip(rates[names[0]], rates[names[1]])]
                line.update({
                    f"{label}_old_per_core": round(old / per, 1),
                    f"{label}_new_per_core": round(new / per, 1),
                    f"{label}_ratio_of_medians": round(new / old, 2),
                    f"{label}_ratio_spread": [round(min(ratios), 2), round(max(ratios), 2)]})
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
