"""Write image-caption(-label) shards the pipeline reads: WebDataset tar or TFRecord.

    python -m clip_jax.data.make_shards --images DIR --captions captions.jsonl \
        --format tar --shard-size 1000 --output OUT [--gzip] [--classnames classnames.txt]

captions.jsonl holds one JSON object per line: {"image": "relative/path.jpg", "caption": "...",
"label": 3}; "label" is optional (classification shards), field names are configurable.
Images are stored as they are (no re-encoding). Output: OUT/00000.tar, OUT/00001.tar, ... (or
.tar.gz / .tfrecord), samples keyed by their line number ("000000123").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from typing import Iterable, Iterator, NamedTuple, Optional

from clip_jax.data.sources import IMAGE_EXTENSIONS


class Sample(NamedTuple):
    """One sample to write: encoded image bytes and their format extension ("jpg", "png"...)."""

    key: str
    image: bytes
    image_ext: str
    caption: str
    label: Optional[int] = None


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar_shard(path: str, samples: Iterable[Sample]) -> int:
    """Writes one WebDataset tar shard (gzipped if `path` ends in .gz); returns the count."""
    mode = "w:gz" if path.endswith(".gz") else "w"
    count, mtime = 0, int(time.time())  # an int: a float mtime adds a PAX header per member
    with tarfile.open(path, mode) as tar:
        for s in samples:
            _add_member(tar, f"{s.key}.{s.image_ext}", s.image, mtime)
            _add_member(tar, f"{s.key}.txt", s.caption.encode("utf-8"), mtime)
            if s.label is not None:
                _add_member(tar, f"{s.key}.cls", str(int(s.label)).encode("ascii"), mtime)
            count += 1
    return count


def write_tfrecord_shard(path: str, samples: Iterable[Sample]) -> int:
    """Writes one TFRecord shard of `tf.train.Example`s; returns the count."""
    import tensorflow as tf

    from clip_jax.data.sources import make_tfrecord_example

    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for s in samples:
            writer.write(make_tfrecord_example(s.image, s.caption, s.label, s.key))
            count += 1
    return count


def write_shards(
    samples: Iterable[Sample],
    output: str,
    *,
    fmt: str = "tar",
    shard_size: int = 1000,
    gzip: bool = False,
) -> list[str]:
    """Splits `samples` into shards of `shard_size` under `output`; returns the shard paths."""
    if fmt not in ("tar", "tfrecord"):
        raise ValueError(f"format {fmt!r} unknown; use 'tar' or 'tfrecord'")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if gzip and fmt != "tar":
        raise ValueError("--gzip applies to tar shards only")
    os.makedirs(output, exist_ok=True)
    suffix = ".tfrecord" if fmt == "tfrecord" else (".tar.gz" if gzip else ".tar")
    writer = write_tfrecord_shard if fmt == "tfrecord" else write_tar_shard
    paths, chunk = [], []

    def flush():
        path = os.path.join(output, f"{len(paths):05d}{suffix}")
        writer(path, chunk)
        paths.append(path)
        chunk.clear()

    for sample in samples:
        chunk.append(sample)
        if len(chunk) == shard_size:
            flush()
    if chunk:
        flush()
    return paths


def read_caption_file(
    images_dir: str,
    captions: str,
    *,
    image_field: str = "image",
    caption_field: str = "caption",
    label_field: str = "label",
) -> Iterator[Sample]:
    """Yields samples from a captions.jsonl; errors name the offending line."""
    with open(captions, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{captions}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(row, dict) or image_field not in row or caption_field not in row:
                raise ValueError(f"{where}: needs fields {image_field!r} and {caption_field!r}")
            rel = row[image_field]
            ext = rel.rsplit(".", 1)[-1].lower() if "." in rel else ""
            if ext not in IMAGE_EXTENSIONS:
                raise ValueError(
                    f"{where}: image {rel!r} has extension {ext!r}, expected one of "
                    f"{IMAGE_EXTENSIONS}"
                )
            path = os.path.join(images_dir, rel)
            if not os.path.isfile(path):
                raise ValueError(f"{where}: image file {path!r} does not exist")
            label = row.get(label_field)
            if label is not None and not isinstance(label, int):
                raise ValueError(f"{where}: label {label!r} is not an integer")
            with open(path, "rb") as img:
                data = img.read()
            yield Sample(
                key=f"{lineno - 1:09d}",
                image=data,
                image_ext=ext,
                caption=str(row[caption_field]),
                label=label,
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder the image paths are relative to")
    parser.add_argument("--captions", required=True, help="captions.jsonl, one JSON per line")
    parser.add_argument("--format", choices=("tar", "tfrecord"), default="tar")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--gzip", action="store_true", help="write .tar.gz shards")
    parser.add_argument("--image-field", default="image")
    parser.add_argument("--caption-field", default="caption")
    parser.add_argument(
        "--label-field",
        default="label",
        help="JSON field with an integer class label (written as .cls / "
        "image/class/label when present)",
    )
    parser.add_argument(
        "--classnames", default=None, help="optional classnames.txt copied next to the shards"
    )
    args = parser.parse_args(argv)
    samples = read_caption_file(
        args.images,
        args.captions,
        image_field=args.image_field,
        caption_field=args.caption_field,
        label_field=args.label_field,
    )
    counter = {"n": 0}

    def counted(it):
        for s in it:
            counter["n"] += 1
            yield s

    paths = write_shards(
        counted(samples), args.output, fmt=args.format, shard_size=args.shard_size, gzip=args.gzip
    )
    if args.classnames:
        with open(args.classnames, encoding="utf-8") as src:
            names = src.read()
        with open(os.path.join(args.output, "classnames.txt"), "w", encoding="utf-8") as dst:
            dst.write(names)
    print(
        json.dumps(
            {
                "shards": len(paths),
                "samples": counter["n"],
                "output": args.output,
                "format": args.format,
            }
        )
    )


if __name__ == "__main__":
    main()
