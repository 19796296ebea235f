"""Shared helpers for the data tests (a helper module, not collected: no tests here): tiny images,
shards, a fake tokenizer, a small data config."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

from clip_jax.data import config as config_lib
from clip_jax.data.make_shards import Sample, write_shards


class FakeTokenizer:
    """Reversible byte tokenizer with the project's tokenizer interface.

    Row = [sot=1, byte+3, ..., eot=2, 0...]; truncation keeps eot. `decode` inverts it, so
    tests can tell which caption reached a batch.
    """

    vocab_size = 259
    sot_id = 1
    eot_id = 2
    pad_id = 0

    def __call__(self, texts, context_length=77):
        out = np.zeros((len(texts), context_length), np.int32)
        for i, text in enumerate(texts):
            ids = [1] + [b + 3 for b in text.encode("utf-8")][: context_length - 2] + [2]
            out[i, : len(ids)] = ids
        return out

    @staticmethod
    def decode(row) -> str:
        ids = [int(t) for t in row if int(t) > 2]
        return bytes(i - 3 for i in ids).decode("utf-8")


def jpeg_bytes(rng, h=20, w=28, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=quality
    )
    return buf.getvalue()


def png_bytes(rng, h=20, w=28) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_samples(n, seed=0, prefix="s", labels=False):
    """`n` good samples with unique captions "<prefix> <i>" and varying tiny image sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(16, 33)), int(rng.integers(16, 33))
        out.append(
            Sample(
                key=f"{prefix}{i:06d}",
                image=jpeg_bytes(rng, h, w),
                image_ext="jpg",
                caption=f"{prefix} {i}",
                label=(i % 5) if labels else None,
            )
        )
    return out


def write_dataset(
    tmp_path,
    n=120,
    shard_size=30,
    fmt="tar",
    name="ds",
    seed=0,
    prefix="s",
    gzip=False,
    labels=False,
):
    """Writes `n` samples in shards; returns (pattern, captions)."""
    samples = make_samples(n, seed=seed, prefix=prefix, labels=labels)
    out = os.path.join(str(tmp_path), name)
    paths = write_shards(samples, out, fmt=fmt, shard_size=shard_size, gzip=gzip)
    ext = os.path.basename(paths[0]).split(".", 1)[1]
    last = len(paths) - 1
    return os.path.join(out, f"{{00000..{last:05d}}}.{ext}"), [s.caption for s in samples]


def add_members(tar: tarfile.TarFile, members):
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def data_config(**overrides):
    cfg = config_lib.get_default_config()
    cfg.shuffle_buffer = 16
    cfg.shard_cycle_length = 2
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def take(ds, n):
    return [{k: np.asarray(v) for k, v in b.items()} for b in ds.take(n).as_numpy_iterator()]


def captions_of(batches, tok=FakeTokenizer):
    return [tok.decode(row) for b in batches for row in b["text"]]
