"""Records per shard: what makes resuming a constant-time computation instead of a re-read.

A resume position is a count of raw records; turning it into (shard group, offset in each
shard) needs the record count of every shard read before it. Counts come, cheapest first, from
this process's memory, a JSON cache in `index_dir` (the trainer uses `<workdir>/data_index`, so a
restarted run finds the counts its predecessor wrote), img2dataset's `<shard>_stats.json`
beside a remote tar shard (`successes`), or a header scan of the shard: tar headers with data seeked
over (`tar_shards.count_records`), TFRecord length prefixes with data seeked over.

Cache entries are keyed by path, size and modification time, so a rewritten shard is recounted.
A tar shard counted by a header scan or read through from its start also leaves the byte offsets
of every `tar_shards.SEEK_EVERY`-th sample, so that a resume inside it seeks to the nearest one
(`ShardCounter.seek_hint`) instead of walking the headers before its position.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading

from clip_jax.data import tar_shards

_CACHE_FILE = "shard_counts.jsonl"


def _stat_key(path: str) -> str:
    """`path|size|mtime_ns` for local files; remote paths use tf.io.gfile.stat."""
    if "://" in path:
        import tensorflow as tf

        st = tf.io.gfile.stat(path)
        return f"{path}|{st.length}|{st.mtime_nsec}"
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def count_tfrecord_records(path: str) -> int:
    """Complete records of a TFRecord file (8-byte length, 4-byte CRC, data, 4-byte CRC).

    Reads only the length prefixes and seeks over the data. A file cut inside a record counts
    the complete records before the cut (what the reader then reads, see `sources`).
    """
    if "://" in path:
        import tensorflow as tf

        f = tf.io.gfile.GFile(path, "rb")
        size = tf.io.gfile.stat(path).length
    else:
        f = open(path, "rb", buffering=1 << 16)  # closed below
        size = os.fstat(f.fileno()).st_size
    count, offset = 0, 0
    with f:
        while offset + 12 <= size:
            head = f.read(12)
            if len(head) < 12:
                break
            (length,) = struct.unpack("<Q", head[:8])
            end = offset + 12 + length + 4
            if end > size:
                break
            f.seek(end)
            offset = end
            count += 1
    if offset != size:
        logging.warning(
            "tfrecord shard %s is truncated after %d records (%d of %d bytes are "
            "whole records); the rest of it is skipped",
            path,
            count,
            offset,
            size,
        )
    return count


def _img2dataset_count(path: str) -> int | None:
    """`successes` from img2dataset's `<shard>_stats.json` beside a remote `<shard>.tar` or
    `<shard>.tfrecord`.

    Used for remote shards only, where a header scan costs one request per member; local
    shards are scanned, which is exact even for a shard damaged after its stats were written.
    """
    if "://" not in path or not path.endswith((".tar", ".tfrecord")):
        return None
    import tensorflow as tf

    stats = path.rsplit(".", 1)[0] + "_stats.json"
    if not tf.io.gfile.exists(stats):
        return None
    try:
        with tf.io.gfile.GFile(stats, "r") as f:
            value = json.load(f).get("successes")
    except (OSError, ValueError, tf.errors.OpError) as err:
        logging.warning("ignoring unreadable img2dataset stats %s (%s)", stats, err)
        return None
    return int(value) if isinstance(value, int) and value >= 0 else None


class ShardCounter:
    """Record counts of shards of one format, cached in memory and in `index_dir` (optional).

    The cache is an append-only JSON-lines file (`{"key": "path|size|mtime", "count": n}` per
    line, plus `"offsets"` for tar shards; the last line for a key wins): each new count costs
    one small append, several processes may share it, and a torn last line is ignored.
    Thread-safe: the input pipeline asks from tf.data worker threads.
    """

    def __init__(self, fmt: str, index_dir: str = ""):
        if fmt not in ("tar", "tfrecord"):
            raise ValueError(f"cannot count records of format {fmt!r}")
        self.fmt = fmt
        self.index_dir = index_dir
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._offsets: dict[str, list[int]] = {}  # tar: byte offsets of samples 0, K, 2K, ...
        self._seen: dict[str, int] = {}  # path -> count, for the shards of this run
        if index_dir:
            self._load()

    def _cache_path(self) -> str:
        return os.path.join(self.index_dir, _CACHE_FILE)

    def _load(self) -> None:
        path = self._cache_path()
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    key = str(entry["key"])
                    self._counts[key] = int(entry["count"])
                    offsets = [int(o) for o in entry.get("offsets") or []]
                    if offsets:
                        self._offsets[key] = offsets
                    else:
                        self._offsets.pop(key, None)
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash mid-append: that shard is recounted

    def _store(self, key: str, n: int, offsets: list[int] | None = None) -> None:
        """Caches `n` (and the sample `offsets`, when given) for `key` (lock held)."""
        if self._counts.get(key) == n and (not offsets or self._offsets.get(key) == offsets):
            return
        self._counts[key] = n
        entry = {"key": key, "count": n}
        if offsets:
            self._offsets[key] = entry["offsets"] = list(offsets)
        elif key in self._offsets:
            entry["offsets"] = self._offsets[key]  # same count: the offsets still hold
        if self.index_dir:
            os.makedirs(self.index_dir, exist_ok=True)
            with open(self._cache_path(), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def record(self, path: str, n: int, offsets: list[int] | None = None) -> None:
        """Notes that reading `path` from its first record yielded `n` records (and, for a tar
        shard, the sample `offsets` that read collected, see `tar_shards.iter_samples`)."""
        key = _stat_key(path)
        with self._lock:
            self._seen[path] = n
            self._store(key, n, offsets)

    def seek_hint(self, path: str, start: int) -> tuple[int, int] | None:
        """`(sample index, byte offset)` of the known sample offset nearest before record
        `start` of tar shard `path`, or None (no offsets known, or `start` in the first
        `SEEK_EVERY` samples)."""
        if start < tar_shards.SEEK_EVERY:
            return None
        key = _stat_key(path)
        with self._lock:
            offsets = self._offsets.get(key)
        if not offsets:
            return None
        i = min(start // tar_shards.SEEK_EVERY, len(offsets) - 1)
        return (i * tar_shards.SEEK_EVERY, offsets[i]) if i > 0 else None

    def all_known_empty(self, num_files: int) -> bool:
        """True when `num_files` distinct shards (all of a source's) were counted or read
        through and none holds a record."""
        with self._lock:
            return len(self._seen) >= num_files and not any(self._seen.values())

    def count(self, path: str) -> int:
        """Records of `path` (what the shard reader yields from it)."""
        key = _stat_key(path)
        with self._lock:
            if key in self._counts:
                self._seen[path] = self._counts[key]
                return self._counts[key]
        offsets: list[int] = []
        n = _img2dataset_count(path)
        if n is None:
            if self.fmt == "tar":
                n = tar_shards.count_records(path, offsets)
            else:
                n = count_tfrecord_records(path)
        with self._lock:
            self._seen[path] = n
            self._store(key, n, offsets)
        return n
