"""Decode + crop + resize throughput at 224 px, three ways, in the same process:

  main:     full decode, crop, `tf.image.resize` (the code before this change)
  two_step: full decode, crop, `transforms._resize_uint8` (same pixels, faster resize)
  one_step: `decode_random_resized_crop` / `decode_resize_center_crop` (decode only the JPEG
            window used, DCT-scaled when >= 2x the output)

For each source size, a pool of synthetic photo-like JPEGs (`input_pipeline.synthetic_photo`,
quality 90) is mapped in a plain tf.data pipeline with a fixed `num_parallel_calls` and a
private thread pool of the same size (one intra-op thread per call). Two per-core rates:
samples per CPU second of the process (`cpu`, robust to other load on a shared machine) and
samples per wall second / num_parallel_calls (`wall`, right on an idle machine). The variants
alternate within each round (order rotated); medians over rounds, and per-round ratios to
`main` with their spread (min, max). One JSON line per (source size, transform):

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

VARIANTS = ("main", "two_step", "one_step")


def _main_resize(image, height, width, method):
    """The resize before this change: tf.image.resize, rounded to uint8."""
    resized = tf.image.resize(image, tf.stack([height, width]), method=method, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _functions(kind: str, size: int, method: str):
    """variant -> fn(encoded, index) -> uint8 [size, size, 3]."""

    def key(index):
        return tf.stack([tf.constant(17, tf.int64), index])

    if kind == "train":

        def main(e, i):
            image = transforms.decode_image(e)
            begin, crop_size = transforms._sample_crop(
                tf.shape(image), key(i), (0.9, 1.0), (3 / 4, 4 / 3)
            )
            return _main_resize(tf.slice(image, begin, crop_size), size, size, method)

        return {
            "main": main,
            "two_step": lambda e, i: transforms.random_resized_crop(
                transforms.decode_image(e), key(i), size, method=method
            ),
            "one_step": lambda e, i: transforms.decode_random_resized_crop(
                e, key(i), size, method=method
            ),
        }

    def main_eval(e, i):
        image = transforms.decode_image(e)
        shape = tf.shape(image)
        new_h, new_w, top, left = transforms._center_crop_geometry(shape[0], shape[1], size)
        resized = _main_resize(image, new_h, new_w, method)
        return tf.slice(resized, tf.stack([top, left, 0]), [size, size, 3])

    return {
        "main": main_eval,
        "two_step": lambda e, i: transforms.resize_center_crop(
            transforms.decode_image(e), size, method=method
        ),
        "one_step": lambda e, i: transforms.decode_resize_center_crop(e, size, method=method),
    }


def _dataset(pool: list[bytes], fn, samples: int, parallel: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(pool).repeat().take(samples).enumerate()
    ds = ds.map(
        lambda i, e: tf.reduce_sum(tf.cast(fn(e, i), tf.int32)),
        num_parallel_calls=parallel,
        deterministic=False,
    )
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
    parser.add_argument(
        "--sizes",
        default="16x16,256x256,480x360,1024x768",
        help="source JPEG sizes, WxH, comma separated",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=400, help="samples per timed run")
    parser.add_argument("--parallel", type=int, default=1, help="num_parallel_calls = threads")
    parser.add_argument("--pool", type=int, default=32, help="distinct JPEGs per size")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-method", default="bicubic")
    parser.add_argument("--only", default="train,eval", help="transforms to run")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    for spec in args.sizes.split(","):
        width, height = (int(v) for v in spec.split("x"))
        pool = [synthetic_photo(rng, width, height) for _ in range(args.pool)]
        for kind in args.only.split(","):
            fns = _functions(kind, args.image_size, args.resize_method)
            datasets = {n: _dataset(pool, fns[n], args.samples, args.parallel) for n in VARIANTS}
            warm = max(args.samples // 8, 1)
            for n in VARIANTS:  # warm-up: traces the functions, fills caches
                _rate(datasets[n].take(warm), warm)
            wall: dict[str, list[float]] = {n: [] for n in VARIANTS}
            cpu: dict[str, list[float]] = {n: [] for n in VARIANTS}
            for r in range(args.rounds):
                for n in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
                    w, c = _rate(datasets[n], args.samples)
                    wall[n].append(w)
                    cpu[n].append(c)
            line = {
                "source": f"{width}x{height}",
                "transform": kind,
                "image_size": args.image_size,
                "method": args.resize_method,
                "parallel": args.parallel,
                "rounds": args.rounds,
                "mean_jpeg_kb": round(sum(map(len, pool)) / len(pool) / 1024, 1),
            }
            for label, rates, per in (("cpu", cpu, 1), ("wall", wall, args.parallel)):
                line[f"{label}_per_core"] = {
                    n: round(statistics.median(rates[n]) / per, 1) for n in VARIANTS
                }
                for n in VARIANTS[1:]:
                    ratios = [b / a for a, b in zip(rates["main"], rates[n])]
                    line[f"{label}_{n}_vs_main"] = [
                        round(statistics.median(ratios), 2),
                        round(min(ratios), 2),
                        round(max(ratios), 2),
                    ]
                ratios = [b / a for a, b in zip(rates["two_step"], rates["one_step"])]
                line[f"{label}_one_vs_two_step"] = [
                    round(statistics.median(ratios), 2),
                    round(min(ratios), 2),
                    round(max(ratios), 2),
                ]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
