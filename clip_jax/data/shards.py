"""Shard lists: brace/glob expansion, existence checks, per-process split, demo shard lookup.

Shard lists are given as WebDataset/img2dataset-style brace patterns (``data/{00000..00099}.tar``),
globs (``data/*.tar``), or lists of those. Expansion goes through ``tf.io.gfile`` so that the same
patterns work for local paths and remote filesystems TensorFlow knows (``gs://``).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
from typing import Sequence, Union

import tensorflow as tf

PatternSpec = Union[str, Sequence[str]]

# `{a..b}` numeric ranges (zero padding kept from the wider bound) or `{x,y,z}` alternatives.
_BRACE = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = set("*?[")

# Demo split name -> file pattern inside the package's `data/demo` folder.
DEMO_SPLITS = {
    "train": "train-*.tar.gz",
    "heldout": "heldout-*.tar.gz",
    "classify": "classify-*.tar.gz",
}


def split_patterns(spec: PatternSpec) -> list[str]:
    """Turns a pattern spec into a list of patterns.

    A string may hold several patterns separated by whitespace or ';' (commas are NOT separators
    because brace alternatives `{a,b}` use them). A list/tuple is taken element by element, each
    element split the same way.
    """
    if isinstance(spec, str):
        items = [spec]
    else:
        items = list(spec)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"shard pattern must be a string, got {item!r}")
        out.extend(p for p in re.split(r"[;\s]+", item) if p)
    return out


def expand_braces(pattern: str) -> list[str]:
    """Expands brace groups: ``a{00..02}.tar`` -> ``a00.tar a01.tar a02.tar``; ``{x,y}`` too.

    Groups are expanded left to right (cartesian product), nested braces are not supported.
    A numeric range keeps the zero padding of its wider bound, as img2dataset names shards.
    """
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"unbalanced or nested braces in shard pattern {pattern!r}")
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo_s, hi_s = range_match.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"empty brace range {{{body}}} in shard pattern {pattern!r}")
        width = max(len(lo_s), len(hi_s)) if (lo_s.startswith("0") or hi_s.startswith("0")) else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(
            f"brace group {{{body}}} in shard pattern {pattern!r} is neither a range "
            "{A..B} nor a list {a,b}"
        )
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def _check_readable(path: str, what: str, pattern: str) -> None:
    """One-line errors for a shard that is a directory or cannot be read (local paths; remote
    filesystems report such problems when read)."""
    if tf.io.gfile.isdir(path):
        raise ValueError(
            f"{what} {path!r} is a directory, not a shard file (from {pattern!r}); "
            "give a pattern of files, e.g. 'dir/*.tar'"
        )
    if "://" not in path and not os.access(path, os.R_OK):
        raise ValueError(f"permission denied: {what} file {path!r} cannot be read")


def _glob(path: str, what: str) -> list[str]:
    matches = sorted(tf.io.gfile.glob(path))
    if matches:
        return matches
    parent = os.path.dirname(path) or "."
    if "://" not in path and not (_GLOB_CHARS & set(parent)):
        blocked = _unreachable_ancestor(parent) or (
            parent if os.path.isdir(parent) and not os.access(parent, os.R_OK | os.X_OK) else None
        )
        if blocked:
            raise ValueError(f"permission denied: cannot list {blocked!r} for {what} glob {path!r}")
    raise ValueError(f"{what} glob {path!r} matches no file")


def _unreachable_ancestor(path: str) -> str | None:
    """The first directory on the way to a local `path` this process cannot search, if any
    (so that an unreadable location is not reported as a missing file)."""
    if "://" in path:
        return None
    current = os.path.abspath(path)
    ancestors = []
    while os.path.dirname(current) != current:
        current = os.path.dirname(current)
        ancestors.append(current)
    for directory in reversed(ancestors):
        if not os.path.isdir(directory):
            return None
        if not os.access(directory, os.X_OK):
            return directory
    return None


def resolve_files(spec: PatternSpec, *, what: str = "shards") -> list[str]:
    """Expands patterns to an ordered, de-duplicated list of existing, readable files.

    Raises:
      ValueError (one line): when the spec is empty, a glob matches nothing, a named file is
        missing, a directory or unreadable — at pipeline build time, so a typo never turns into
        an empty or hanging input pipeline.
    """
    patterns = split_patterns(spec)
    if not patterns:
        raise ValueError(f"no {what} given (empty shard pattern)")
    files: list[str] = []
    for pattern in patterns:
        for path in expand_braces(pattern):
            if _GLOB_CHARS & set(path):
                for match in _glob(path, what):
                    _check_readable(match, what, pattern)
                    files.append(match)
            else:
                if not tf.io.gfile.exists(path):
                    blocked = _unreachable_ancestor(path)
                    if blocked:
                        raise ValueError(
                            f"permission denied: cannot reach {what} file "
                            f"{path!r} (directory {blocked!r} is not searchable)"
                        )
                    raise ValueError(f"{what} file {path!r} does not exist (from {pattern!r})")
                _check_readable(path, what, pattern)
                files.append(path)
    seen = set()
    unique = [f for f in files if not (f in seen or seen.add(f))]
    if len(unique) != len(files):
        logging.warning(
            "%d duplicate %s removed from the shard list", len(files) - len(unique), what
        )
    return unique


def split_for_process(files: Sequence[str], process_index: int, process_count: int) -> list[str]:
    """Returns this process's shards: every `process_count`-th file starting at `process_index`.

    Each process reads only its own shards, so the union over processes is every shard exactly
    once. Raises ValueError when there are fewer shards than processes (some process would have
    no data at all, which would stall a synchronous multi-host training step).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if len(files) < process_count:
        raise ValueError(
            f"{len(files)} shard(s) for {process_count} processes: every process needs at least "
            "one shard; write more, smaller shards (make_shards --shard-size) or use fewer hosts"
        )
    return list(files[process_index::process_count])


def demo_dir():
    """The folder holding the shipped demo shards (``clip_jax/data/demo``)."""
    return importlib.resources.files("clip_jax.data") / "demo"


def demo_shards(split: str) -> list[str]:
    """Sorted paths of the shipped demo shards for `split` ("train", "heldout" or "classify")."""
    if split not in DEMO_SPLITS:
        raise ValueError(f"demo split {split!r} unknown; choose one of {sorted(DEMO_SPLITS)}")
    folder = demo_dir()
    pattern = DEMO_SPLITS[split]
    prefix = pattern.split("*")[0]
    try:
        names = sorted(
            entry.name
            for entry in folder.iterdir()
            if entry.name.startswith(prefix) and entry.name.endswith(".tar.gz")
        )
    except FileNotFoundError as err:
        raise ValueError(
            f"demo data folder {folder} is missing from the installed package"
        ) from err
    if not names:
        raise ValueError(f"no demo shards {pattern} in {folder}; is the package data installed?")
    return [str(folder / name) for name in names]


def demo_classnames() -> list[str]:
    """Class names of the demo classification split (line i = label i)."""
    path = demo_dir() / "classnames.txt"
    if not path.is_file():
        raise ValueError(f"demo class names file {path} is missing")
    return read_classnames(str(path))


def read_classnames(path: str) -> list[str]:
    """Reads a `classnames.txt` (one class name per line, line i = label i)."""
    with tf.io.gfile.GFile(path, "r") as f:
        names = [line.rstrip("\n") for line in f]
    while names and not names[-1].strip():
        names.pop()
    return names
