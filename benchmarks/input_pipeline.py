"""Input-pipeline throughput: decode + CLIP train augmentation + tokenisation at 224 px.

Writes tar shards of synthetic photo-like JPEGs (480x360, quality 90: smooth gradients, shapes
and sensor-like noise, ~60-90 KB each like web images) to a temp dir, runs
`build_train_dataset` for a warm-up and then a fixed number of batches, and prints one JSON line:
images/s, images/s per core and the core count.

    python benchmarks/input_pipeline.py [--batches 20 --batch-size 128 --resize-method bicubic]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

WORDS = ("a photo of the red dog cat sitting on green grass near blue car house tree with "
         "small large old young man woman city beach mountain sky sunset bird flower").split()


def synthetic_photo(rng: np.random.Generator, width=480, height=360) -> bytes:
    """A JPEG (quality 90) with smooth structure plus noise, sized like a typical web photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(x / width) * rng.uniform(80, 255), (y / height) * rng.uniform(80, 255),
                     np.full_like(x, rng.uniform(0, 255))], -1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(20, 200), y0 + rng.integers(20, 150)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def get_tokenizer():
    """The project's CLIP BPE if present, else open_clip's (same BPE), else a byte tokenizer."""
    try:
        from clip_jax import tokenizers
        return tokenizers.get("clip-bpe"), "clip_jax clip-bpe"
    except (ImportError, AttributeError):
        pass
    try:
        from open_clip.tokenizer import SimpleTokenizer

        bpe = SimpleTokenizer()

        def tok(texts, context_length=77):
            return bpe(texts, context_length=context_length).numpy().astype(np.int32)
        return tok, "open_clip SimpleTokenizer (clip_jax.tokenizers not available)"
    except ImportError:
        def tok(texts, context_length=77):
            out = np.zeros((len(texts), context_length), np.int32)
            for i, t in enumerate(texts):
                ids = [b + 3 for b in t.encode()][: context_length - 1] + [2]
                out[i, : len(ids)] = ids
            return out
        return tok, "byte fallback"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches first")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--resize-method", default="bicubic")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    args = parser.parse_args()

    from clip_jax.data import config as config_lib
    from clip_jax.data.make_shards import Sample, write_shards
    from clip_jax.data.pipeline import build_train_dataset

    rng = np.random.default_rng(0)
    photos = [synthetic_photo(rng) for _ in range(64)]  # reused: decode cost is what counts
    samples = [Sample(key=f"{i:09d}", image=photos[i % len(photos)], image_ext="jpg",
                      caption=" ".join(rng.choice(WORDS, int(rng.integers(5, 16)))))
               for i in range(args.shards * args.per_shard)]
    tokenizer, tokenizer_name = get_tokenizer()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(samples, tmp, fmt="tar", shard_size=args.per_shard)
        cfg = config_lib.get_default_config()
        cfg.source = "tar"
        cfg.shards = os.path.join(tmp, "*.tar")
        cfg.resize_method = args.resize_method
        cfg.shuffle_buffer = args.shuffle_buffer
        ds = build_train_dataset(cfg, image_size=args.size, tokenizer=tokenizer,
                                 context_length=77, local_batch_size=args.batch_size, seed=0)
        it = ds.as_numpy_iterator()
        for _ in range(args.warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        elapsed = time.perf_counter() - start
    assert batch["image"].shape == (args.batch_size, args.size, args.size, 3)
    images_per_s = args.batches * args.batch_size / elapsed
    print(json.dumps({
        "benchmark": "input_pipeline", "images_per_s": round(images_per_s, 1),
        "images_per_s_per_core": round(images_per_s / cores, 1), "cores": cores,
        "image_size": args.size, "source_image": "480x360 JPEG q90",
        "mean_jpeg_kb": round(float(np.mean([len(p) for p in photos])) / 1024, 1),
        "resize_method": args.resize_method, "batch_size": args.batch_size,
        "timed_batches": args.batches, "tokenizer": tokenizer_name}))


if __name__ == "__main__":
    main()
