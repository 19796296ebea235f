"""Input-pipeline throughput and resume cost: clip_jax's `build_train_dataset` against a plain
tf.data reference doing the same work on the same TFRecords.

Prints JSON lines (one run, one process):
- `setup`: cores, CPU, load average, the datasets (generated or reused) and their sizes.
- `throughput`, one per pipeline and case: samples/s (median of `--rounds` timed rounds, min,
  max, every round), per core, ratio to the reference; process CPU ms per sample and its
  ratio to the reference (steadier than samples/s on a shared machine), cores kept busy; time
  to the first batch, the largest RSS growth over its rounds, the process's peak RSS so far.
  Pipelines of one case are timed alternately, round by round (rotating which goes first), so
  machine load hits them alike. Each round builds the pipeline afresh, warms it up (first
  block, a few batches, then batches that come back prefetched) and drops it after timing, so
  only the timed pipeline is alive and the process CPU of a round is its own.
  Pipelines: `clip_jax_tar`, `clip_jax_tfrecord`, `clip_jax_tfds` (the same TFRecords as a
  prepared TFDS dataset) (`build_train_dataset`, default data config),
  `clip_jax_mix` (a weighted mixture of the two, equal weights),
  `reference` (plain tf.data on the TFRecords: files interleaved (cycle 16) -> shuffle(10k) ->
  parse -> decode_jpeg -> random crop (area 0.9-1.0, aspect 3/4-4/3) + antialiased bicubic
  resize -> batch -> CLIP BPE in a parallel tf.numpy_function -> prefetch) and
  `reference_notok` (the same without tokenising). tar has no plain tf.data reader, so both
  clip_jax rows are compared with the same TFRecord reference.
- `resume`: time from `build_train_dataset(..., start_position=[p, p])` to its first batch, for
  p = 0, 100k, 400k on 500k 16 px records (tar, TFRecord, then the TFRecords as TFDS), and the
  ratio to p = 0.

Cases (`--cases`, comma-separated): 16px (16x16 JPEGs -> 16 px, batch 256: almost no pixel work,
so this measures reading, shuffling, per-sample overhead and tokenising), 256px (256x256 ->
224, batch 128), 480x360 (480x360 -> 224, batch 128), resume. Captions have 12 words. Images
come from a pool of distinct photo-like JPEGs (`synthetic_photo`) reused across samples, which
keeps generation fast; every record is still read and decoded.

    python benchmarks/input_pipeline.py [--data-dir DIR] [--cases 16px,256px,480x360,resume]
        [--threads N] [--rounds 3] [--quick]

`--data-dir` keeps the generated shards for the next run (generating 500k 16 px records takes
~1 min). `--threads N` pins the process to N cores and sizes the tf.data thread pools to N.
`--quick` is a seconds-long smoke run at toy sizes (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from typing import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

WORDS = (
    "a photo of the red dog cat sitting on green grass near blue car house tree with "
    "small large old young man woman city beach mountain sky sunset bird flower"
).split()
CAPTION_WORDS = 12
CONTEXT_LENGTH = 77
RESUME_RATIO_GOAL = 2.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One throughput case: the stored images and what the pipelines make of them."""

    name: str
    width: int  # stored JPEG size
    height: int
    image_size: int  # pipeline output: uint8 [batch, image_size, image_size, 3]
    batch_size: int
    records: int  # samples on disk, per format
    shard_size: int
    pool: int  # distinct JPEGs reused across the records
    round_batches: int  # timed batches per round


# 16 px: a round of 40 x 256 = 10,240 samples spans one 10k shuffle block, so every round sees
# one refill of clip_jax's block shuffle (a stall) and the median is not flattered. 224 px: a
# round of 16 x 128 samples, ~3 s (decoding dominates; a block refill is ~5% of a block's
# time). Rounds of 6 x 128 spread 0.82-1.22 around the median here.
# The 16 px dataset is also the resume dataset: 50 shards of 10k (p = 400k inside epoch one).
FULL_CASES = {
    "16px": Case("16px", 16, 16, 16, 256, 500_000, 10_000, 256, 40),
    "256px": Case("256px", 256, 256, 224, 128, 16_000, 1_000, 64, 16),
    "480x360": Case("480x360", 480, 360, 224, 128, 16_000, 1_000, 64, 16),
}
QUICK_CASES = {
    "16px": Case("16px", 16, 16, 16, 32, 2_048, 128, 32, 4),
    "256px": Case("256px", 256, 256, 224, 8, 128, 16, 4, 2),
    "480x360": Case("480x360", 480, 360, 224, 8, 128, 16, 4, 2),
}
FULL_RESUME_POSITIONS = (0, 100_000, 400_000)
QUICK_RESUME_POSITIONS = (0, 512, 1_536)
ALL_CASES = ("16px", "256px", "480x360", "resume")


def synthetic_photo(rng: np.random.Generator, width=480, height=360) -> bytes:
    """A JPEG (quality 90) with smooth structure plus noise, sized like a typical web photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            (x / width) * rng.uniform(80, 255),
            (y / height) * rng.uniform(80, 255),
            np.full_like(x, rng.uniform(0, 255)),
        ],
        -1,
    )
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


# --------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------
def _ustar_template() -> bytearray:
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = 0, 1_700_000_000, 0o644
    return bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))


_USTAR = _ustar_template()


def _ustar_header(name: bytes, size: int) -> bytes:
    """A 512-byte ustar header (regular file, fixed mtime/mode) for `name` of `size` bytes.

    Patching a template is 5x faster than `TarInfo.tobuf` (~30 us vs ~150 us per sample
    measured here), which matters for 500k samples. Integer mtime and ustar format: no PAX
    extended header per member (make_shards' float mtime adds one: 4.6 KB vs 2.6 KB per
    16 px sample).
    """
    h = _USTAR[:]
    h[0:100] = name.ljust(100, b"\0")
    h[124:136] = b"%011o\0" % size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def write_tar_shard(path: str, members: Iterator[tuple[bytes, bytes]]) -> None:
    """Writes (name, data) members as one uncompressed tar file (same layout tarfile writes)."""
    with open(path, "wb") as f:
        for name, data in members:
            f.write(_ustar_header(name, len(data)))
            f.write(data)
            f.write(b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)  # end-of-archive marker: two zero blocks


def _dataset_dir(root: str, case: Case) -> str:
    return os.path.join(
        root, f"{case.width}x{case.height}-{case.records}r-{case.shard_size}s-{case.pool}p"
    )


def _caption_pool(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, CAPTION_WORDS)) for _ in range(n)]


def ensure_dataset(root: str, case: Case) -> dict:
    """Writes (or reuses) `case`'s tar and TFRecord shards; returns their file patterns + sizes.

    Sample i: image `pool[i % P]`, caption `captions[(i * 7 + i // P) % C]` (C = 4096 distinct
    12-word captions), key "%09d" % i. A `.complete` marker makes reuse safe after a crash.
    """
    from clip_jax.data.make_shards import Sample, write_shards

    base = _dataset_dir(root, case)
    out = {"dir": base, "generate_s": 0.0}
    rng = np.random.default_rng(0)
    photos = captions = None
    for fmt, ext in (("tar", "tar"), ("tfrecord", "tfrecord")):
        folder = os.path.join(base, fmt)
        marker = os.path.join(folder, ".complete")
        out[fmt] = os.path.join(folder, f"*.{ext}")
        if not os.path.exists(marker):
            start = time.perf_counter()
            if photos is None:
                photos = [synthetic_photo(rng, case.width, case.height) for _ in range(case.pool)]
                captions = _caption_pool(rng, 4096)
            logging.info(
                "writing %d %dx%d samples as %s to %s",
                case.records,
                case.width,
                case.height,
                fmt,
                folder,
            )
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            P, C = len(photos), len(captions)

            def caption(i, P=P, C=C):
                return captions[(i * 7 + i // P) % C]

            if fmt == "tar":
                for s in range(0, case.records, case.shard_size):
                    stop = min(s + case.shard_size, case.records)
                    members = (
                        m
                        for i in range(s, stop)
                        for m in (
                            (b"%09d.jpg" % i, photos[i % P]),
                            (b"%09d.txt" % i, caption(i).encode()),
                        )
                    )
                    write_tar_shard(
                        os.path.join(folder, f"{s // case.shard_size:05d}.tar"), members
                    )
            else:
                write_shards(
                    (
                        Sample(f"{i:09d}", photos[i % P], "jpg", caption(i))
                        for i in range(case.records)
                    ),
                    folder,
                    fmt="tfrecord",
                    shard_size=case.shard_size,
                )
            with open(marker, "w"):
                pass
            out["generate_s"] += time.perf_counter() - start
        files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext)]
        out[f"{fmt}_mb"] = round(sum(os.path.getsize(f) for f in files) / 2**20, 1)
        out[f"{fmt}_shards"] = len(files)
    out["mean_jpeg_kb"] = _mean_jpeg_kb(os.path.join(base, "tar", "00000.tar"))
    start = time.perf_counter()
    out["tfds"] = ensure_tfds_view(os.path.join(base, "tfrecord"))
    out["generate_s"] = round(out["generate_s"] + time.perf_counter() - start, 1)
    return out


def ensure_tfds_view(tfrecord_dir: str) -> str:
    """The case's TFRecords as a prepared TFDS dataset (for source "tfds"), without copying:
    symlinks named as TFDS names shards, plus its metadata (features `image/encoded` and
    `text`, the keys our TFRecords already use; split sizes counted once). Returns the version
    folder, read with `tfds.builder_from_directory`."""
    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.core import naming

    folder = os.path.join(os.path.dirname(tfrecord_dir), "tfds", "bench", "1.0.0")
    if os.path.exists(os.path.join(folder, "dataset_info.json")):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    files = sorted(f for f in os.listdir(tfrecord_dir) if f.endswith(".tfrecord"))
    for i, name in enumerate(files):
        os.symlink(
            os.path.join(tfrecord_dir, name),
            os.path.join(folder, f"bench-train.tfrecord-{i:05d}-of-{len(files):05d}"),
        )
    template = naming.ShardedFileTemplate(
        data_dir=epath.Path(folder),
        template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name="bench",
        filetype_suffix="tfrecord",
    )
    features = tfds.features.FeaturesDict(
        {
            "image": {"encoded": tfds.features.Image(shape=(None, None, 3))},
            "text": tfds.features.Text(),
        }
    )
    # TFDS prints its progress; stdout carries only this benchmark's JSON lines.
    with contextlib.redirect_stdout(sys.stderr):
        tfds.folder_dataset.write_metadata(
            data_dir=folder,
            features=features,
            split_infos=tfds.folder_dataset.compute_split_info(filename_template=template),
            filename_template=template,
        )
    return folder


def _mean_jpeg_kb(tar_path: str) -> float:
    """Mean JPEG size over the first shard (the pool repeats, so one shard is representative)."""
    with tarfile.open(tar_path) as tar:
        sizes = [m.size for m in tar.getmembers() if m.name.endswith(".jpg")]
    return round(float(np.mean(sizes)) / 1024, 2)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------
def reference_dataset(
    files: list[str],
    *,
    image_size: int,
    batch_size: int,
    shuffle_buffer: int,
    tokenizer,
    threads: int,
    seed: int = 0,
):
    """Plain tf.data on TFRecords, the same work as clip_jax's train pipeline.

    Yields {"image": uint8 [B, image_size, image_size, 3], "text": int32 [B, 77] (or the raw
    string [B] when `tokenizer` is None)}. Random crop: area 0.9-1.0 of the image, aspect
    3/4-4/3 (clip_jax's default `aug_scale` / `aug_ratio`), then antialiased bicubic resize and
    round/clip to uint8 like `clip_jax.data.transforms`. tf.data defaults otherwise
    (deterministic order, AUTOTUNE parallelism).
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "text": tf.io.FixedLenFeature([], tf.string),
    }
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed).repeat()
    ds = ds.interleave(
        tf.data.TFRecordDataset, cycle_length=min(16, len(files)), num_parallel_calls=autotune
    )
    ds = ds.shuffle(shuffle_buffer, seed=seed)

    def prepare(serialized):
        ex = tf.io.parse_single_example(serialized, features)
        image = tf.io.decode_jpeg(ex["image/encoded"], channels=3)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.zeros([1, 0, 4]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.9, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        crop = tf.slice(image, begin, size)
        resized = tf.image.resize(crop, [image_size, image_size], method="bicubic", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
        return {"image": image, "text": ex["text"]}

    ds = ds.map(prepare, num_parallel_calls=autotune)
    ds = ds.batch(batch_size, drop_remainder=True)
    if tokenizer is not None:

        def tokenize(texts):
            return tokenizer(list(texts), context_length=CONTEXT_LENGTH)

        def tokenize_batch(batch):
            tokens = tf.numpy_function(tokenize, [batch["text"]], tf.int32, stateful=False)
            tokens.set_shape([batch_size, CONTEXT_LENGTH])
            return {"image": batch["image"], "text": tokens}

        ds = ds.map(tokenize_batch, num_parallel_calls=autotune)
    ds = ds.prefetch(autotune)
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        ds = ds.with_options(options)
    return ds


def clip_jax_dataset(
    pattern: str,
    source: str,
    *,
    image_size: int,
    batch_size: int,
    shuffle_buffer: int,
    tokenizer,
    threads: int,
    start_position=None,
    index_dir: str = "",
):
    """`build_train_dataset` with the default data config on one tar / TFRecord source."""
    from clip_jax.data import config as config_lib
    from clip_jax.data.pipeline import build_train_dataset

    cfg = config_lib.get_default_config()
    if source == "tfds":  # `pattern`: a prepared dataset folder (`ensure_tfds_view`)
        cfg.source = "tfds"
        cfg.tfds_data_dir = pattern
        cfg.image_key, cfg.text_key = "image/encoded", "text"
    elif source == "mix":  # `pattern`: {source: shards}, mixed with equal weights
        cfg.sources = tuple({"source": s, "shards": p, "weight": 1.0} for s, p in pattern.items())
    else:
        cfg.source = source
        cfg.shards = pattern
    cfg.shuffle_buffer = shuffle_buffer
    cfg.threadpool_size = threads
    return build_train_dataset(
        cfg,
        image_size=image_size,
        tokenizer=tokenizer,
        context_length=CONTEXT_LENGTH,
        local_batch_size=batch_size,
        seed=0,
        start_position=start_position,
        index_dir=index_dir,
    )


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size of this process (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS line in /proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (getrusage; KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def emit(row: dict) -> None:
    print(json.dumps({"benchmark": "input_pipeline", **row}), flush=True)


@dataclasses.dataclass
class Timed:
    """One pipeline under measurement: how to build it and what was measured on it."""

    name: str
    source: str
    make: Callable
    first_batch_s: float = 0.0
    rss_growth_mb: float = 0.0
    rounds: list = dataclasses.field(default_factory=list)
    drained: int = 0
    cpu_ms: list = dataclasses.field(default_factory=list)  # process CPU ms per sample
    busy: list = dataclasses.field(default_factory=list)  # process CPU s per wall s


def pull_times(it: Iterator, n: int) -> list[float]:
    """Seconds each of the next `n` batches took to come back."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - start)
    return times


def drain_prefetched(it: Iterator, minimum: int, batch_s: float, cap: int) -> int:
    """Pulls `minimum` batches, then more while each comes back in under a third of the
    pipeline's own per-batch time `batch_s` (it was prefetched while other pipelines ran), plus
    the first slow one, at most `cap`; returns how many were pulled.

    Without this a pipeline's first timed batches after a switch are free: tf.data's AUTOTUNE
    prefetch and parallel-map buffers held 6+ batches of 128 at 224 px here, which made a
    6-batch round read 33k samples/s. A fixed time threshold does not work: a prefetched
    19 MB batch can take a few ms to come back on a loaded machine.
    """
    pulled = minimum
    pull_times(it, minimum)
    while pulled < cap:
        pulled += 1
        if pull_times(it, 1)[0] > batch_s / 3:
            break
    return pulled


def run_case(
    case: Case,
    data: dict,
    *,
    tokenizer,
    shuffle_buffer: int,
    threads: int,
    rounds: int,
    drain: int,
    cores: int,
) -> None:
    """Times the pipelines of `case` alternately and prints one JSON line for each."""
    import tensorflow as tf

    tfrecords = sorted(tf.io.gfile.glob(data["tfrecord"]))
    common = dict(
        image_size=case.image_size,
        batch_size=case.batch_size,
        shuffle_buffer=shuffle_buffer,
        threads=threads,
    )
    pipes = [
        Timed(
            "reference",
            "tfrecord",
            lambda: reference_dataset(tfrecords, tokenizer=tokenizer, **common),
        ),
        Timed(
            "reference_notok",
            "tfrecord",
            lambda: reference_dataset(tfrecords, tokenizer=None, **common),
        ),
        Timed(
            "clip_jax_tar",
            "tar",
            lambda: clip_jax_dataset(data["tar"], "tar", tokenizer=tokenizer, **common),
        ),
        Timed(
            "clip_jax_tfrecord",
            "tfrecord",
            lambda: clip_jax_dataset(data["tfrecord"], "tfrecord", tokenizer=tokenizer, **common),
        ),
        Timed(  # the same TFRecords read as a TFDS dataset
            "clip_jax_tfds",
            "tfds",
            lambda: clip_jax_dataset(data["tfds"], "tfds", tokenizer=tokenizer, **common),
        ),
        Timed(  # a weighted mixture: the same records as tar and as TFRecord, half each
            "clip_jax_mix",
            "tar+tfrecord",
            lambda: clip_jax_dataset(
                {"tar": data["tar"], "tfrecord": data["tfrecord"]},
                "mix",
                tokenizer=tokenizer,
                **common,
            ),
        ),
    ]
    warmup = min(case.round_batches, 4)
    samples = case.round_batches * case.batch_size
    # Each round builds a fresh iterator and drops it after timing: a pipeline left alive
    # between its rounds keeps working in the background (clip_jax reads its next shuffle block
    # ahead, tf.data refills its buffers), and that work would be charged to whichever pipeline
    # is being timed. With one pipeline alive at a time, the process CPU during a round is its.
    for r in range(rounds):
        for p in pipes[r % len(pipes) :] + pipes[: r % len(pipes)]:
            logging.info("%s round %d: starting %s", case.name, r, p.name)
            before = rss_mb()
            start = time.perf_counter()
            it = p.make().as_numpy_iterator()
            batch = next(it)
            if r == 0:
                p.first_batch_s = time.perf_counter() - start
                expected = (case.batch_size, case.image_size, case.image_size, 3)
                if batch["image"].shape != expected:
                    raise RuntimeError(
                        f"{p.name}: image batch {batch['image'].shape}, want {expected}"
                    )
            # Its own per-batch time tells prefetched batches from produced ones.
            batch_s = statistics.median(pull_times(it, warmup))
            p.drained += drain_prefetched(it, drain, batch_s, cap=2 * case.round_batches + 4)
            cpu_start = time.process_time()
            times = pull_times(it, case.round_batches)
            cpu = time.process_time() - cpu_start
            p.rounds.append(samples / sum(times))
            p.cpu_ms.append(1000 * cpu / samples)
            p.busy.append(cpu / sum(times))
            p.rss_growth_mb = max(p.rss_growth_mb, round(rss_mb() - before, 1))
            del it, batch
            gc.collect()
        logging.info(
            "%s round %d: %s",
            case.name,
            r,
            ", ".join(f"{p.name} {p.rounds[-1]:.0f}/s" for p in pipes),
        )
    reference = pipes[0]
    ref_median = statistics.median(reference.rounds)
    ref_cpu = statistics.median(reference.cpu_ms)
    for p in pipes:
        median = statistics.median(p.rounds)
        emit(
            {
                "kind": "throughput",
                "case": case.name,
                "pipeline": p.name,
                "source": p.source,
                "source_image": f"{case.width}x{case.height}",
                "image_size": case.image_size,
                "batch_size": case.batch_size,
                "samples_per_s": round(median, 1),
                "samples_per_s_min": round(min(p.rounds), 1),
                "samples_per_s_max": round(max(p.rounds), 1),
                "round_samples_per_s": [round(v, 1) for v in p.rounds],
                "samples_per_s_per_core": round(median / cores, 1),
                "cores": cores,
                "ratio_to_reference": round(median / ref_median, 3),
                "round_ratios_to_reference": [
                    round(a / b, 3) for a, b in zip(p.rounds, reference.rounds)
                ],
                # CPU cost holds up under machine load better than samples/s (one pipeline is
                # alive at a time, so the process CPU time during a round is this pipeline's).
                "cpu_ms_per_sample": round(statistics.median(p.cpu_ms), 3),
                "cpu_ratio_to_reference": round(statistics.median(p.cpu_ms) / ref_cpu, 3),
                "cores_busy": round(statistics.median(p.busy), 2),
                "rounds": rounds,
                "round_samples": samples,
                "drained_batches": p.drained,
                "first_batch_s": round(p.first_batch_s, 2),
                "rss_growth_mb": p.rss_growth_mb,
                "rss_mb": rss_mb(),
                "peak_rss_mb": peak_rss_mb(),
                "loadavg_1m": loadavg(),
                "shuffle_buffer": shuffle_buffer,
                "records": case.records,
                "mean_jpeg_kb": data["mean_jpeg_kb"],
                "threads": threads or None,
            }
        )


def run_resume(
    case: Case, data: dict, positions, *, tokenizer, shuffle_buffer: int, threads: int
) -> None:
    """Time to the first batch of `build_train_dataset` started at each raw position.

    Each source is resumed twice per position: with an empty shard-count cache (the one-time
    header scan of the shards before the position is included: a fresh machine) and with the
    cache a training run leaves in its workdir (`index_dir`; the usual restart).
    """
    for source in ("tar", "tfrecord", "tfds"):
        index_dir = tempfile.mkdtemp(prefix="clip_jax_bench_index_")
        base_s = None
        for p in positions:
            for cache in ("cold", "warm"):
                if cache == "warm" and p == 0:
                    continue  # a fresh start counts nothing
                logging.info("resume: %s from position %d (%s count cache)", source, p, cache)
                start, cpu_start = time.perf_counter(), time.process_time()
                ds = clip_jax_dataset(
                    data[source],
                    source,
                    image_size=case.image_size,
                    batch_size=case.batch_size,
                    shuffle_buffer=shuffle_buffer,
                    tokenizer=tokenizer,
                    threads=threads,
                    start_position=[p, p],
                    index_dir=index_dir,
                )
                it = ds.as_numpy_iterator()
                batch = next(it)
                seconds = time.perf_counter() - start
                cpu_s = time.process_time() - cpu_start
                base_s = seconds if base_s is None else base_s
                ratio = seconds / base_s
                emit(
                    {
                        "kind": "resume",
                        "source": source,
                        "start_position": p,
                        "count_cache": cache,
                        "first_batch_s": round(seconds, 2),
                        "first_batch_cpu_s": round(cpu_s, 2),
                        "ratio_to_p0": round(ratio, 2),
                        "within_goal": bool(ratio <= RESUME_RATIO_GOAL),
                        "goal_ratio": RESUME_RATIO_GOAL,
                        # After one batch of a clean dataset this is p + batch size.
                        "first_batch_position": int(np.asarray(batch["position"]).reshape(-1)[-1]),
                        "records": case.records,
                        "shard_size": case.shard_size,
                        "batch_size": case.batch_size,
                        "shuffle_buffer": shuffle_buffer,
                        "rss_mb": rss_mb(),
                        "peak_rss_mb": peak_rss_mb(),
                        "loadavg_1m": loadavg(),
                        "threads": threads or None,
                    }
                )
                del it, ds, batch
                gc.collect()
        shutil.rmtree(index_dir, ignore_errors=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", default=None, help="keep/reuse generated shards here (default: a temp dir)"
    )
    parser.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma-separated subset of {','.join(ALL_CASES)}",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="pin to this many cores and size tf.data thread pools to it",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per pipeline")
    parser.add_argument(
        "--drain",
        type=int,
        default=1,
        help="untimed batches at the start of every round, before those that "
        "come back prefetched (see drain_prefetched)",
    )
    parser.add_argument(
        "--shuffle-buffer",
        type=int,
        default=None,
        help="shuffle buffer / block (default 10000, --quick 256)",
    )
    parser.add_argument(
        "--resume-positions",
        default=None,
        help="comma-separated start positions (default 0,100000,400000)",
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown or not cases:
        parser.error(f"--cases {args.cases!r}: unknown {unknown}; choose from {ALL_CASES}")
    if args.rounds < 1 or args.drain < 0 or args.threads < 0:
        parser.error("--rounds must be >= 1, --drain and --threads >= 0")
    if args.threads:
        # Before TensorFlow starts any thread pool: they size themselves from the affinity.
        available = sorted(os.sched_getaffinity(0))
        if args.threads > len(available):
            parser.error(f"--threads {args.threads}: only {len(available)} cores available")
        os.sched_setaffinity(0, available[: args.threads])
    table = QUICK_CASES if args.quick else FULL_CASES
    shuffle_buffer = args.shuffle_buffer or (256 if args.quick else 10_000)
    positions = (
        tuple(int(p) for p in args.resume_positions.split(","))
        if args.resume_positions
        else QUICK_RESUME_POSITIONS
        if args.quick
        else FULL_RESUME_POSITIONS
    )

    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    from clip_jax import tokenizers

    tokenizer = tokenizers.get("clip-bpe")
    cores = len(os.sched_getaffinity(0))
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="input_pipeline_bench_")
        root = tmp.name
    try:
        needed = [c for c in ("16px", "256px", "480x360") if c in cases]
        if "resume" in cases and "16px" not in needed:
            needed.insert(0, "16px")
        datasets = {name: ensure_dataset(root, table[name]) for name in needed}
        emit(
            {
                "kind": "setup",
                "cores": cores,
                "cpu": _cpu_model(),
                "loadavg_1m": loadavg(),
                "threads": args.threads or None,
                "quick": args.quick,
                "cases": cases,
                "tensorflow": tf.__version__,
                "shuffle_buffer": shuffle_buffer,
                "rounds": args.rounds,
                "tokenizer": "clip_jax clip-bpe",
                "caption_words": CAPTION_WORDS,
                "datasets": datasets,
            }
        )
        for name in needed:
            if name in cases:
                run_case(
                    table[name],
                    datasets[name],
                    tokenizer=tokenizer,
                    shuffle_buffer=shuffle_buffer,
                    threads=args.threads,
                    rounds=args.rounds,
                    drain=args.drain,
                    cores=cores,
                )
        if "resume" in cases:
            run_resume(
                table["16px"],
                datasets["16px"],
                positions,
                tokenizer=tokenizer,
                shuffle_buffer=shuffle_buffer,
                threads=args.threads,
            )
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
