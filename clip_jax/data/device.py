"""Host batches -> global `jax.Array`s, and keeping batches ahead on the devices.

Each process feeds its local slice of the global batch (`local_batch_size` rows, the rows its
addressable devices hold under `sharding`); `jax.make_array_from_process_local_data` assembles
the global array without any cross-host copy.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

# Fields that stay on the host as NumPy (resume position; strings cannot go to devices anyway).
DEFAULT_HOST_KEYS = ("position",)


def _is_device_array(value: np.ndarray) -> bool:
    return value.dtype.kind in "biuf"  # bool, signed/unsigned int, float


def make_global_batch(
    local_batch: Mapping[str, Any], sharding, host_keys: Sequence[str] = DEFAULT_HOST_KEYS
) -> dict:
    """Builds global arrays from this process's rows.

    Args:
      local_batch: dict of NumPy arrays (e.g. image uint8 [b, H, W, 3], text int32 [b, L]),
        `b` = this process's share of the global batch.
      sharding: a `jax.sharding.NamedSharding` used for every array (its spec shards the
        leading batch axis), or a dict field name -> sharding.
      host_keys: fields returned unchanged as NumPy; string/object arrays are kept on the host
        as well.
    Returns:
      dict with `jax.Array`s of global shape [b * process_count, ...] for array fields.
    """
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        if name in host_keys or not _is_device_array(value):
            out[name] = value
            continue
        field_sharding = sharding[name] if isinstance(sharding, Mapping) else sharding
        out[name] = jax.make_array_from_process_local_data(field_sharding, value)
    return out


class _End:
    """Queue marker: the host iterator ended (or raised `error`)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def _fetch_in_background(iterator: Iterable, size: int) -> "queue.Queue":
    """Pulls from `iterator` in a daemon thread into a bounded queue (ends with an `_End`).

    tf.data's `next()` blocks inside C++ holding no Python frame the interpreter can interrupt,
    so a main thread waiting there would not run signal handlers (SIGTERM) until a batch came.
    """
    out: queue.Queue = queue.Queue(maxsize=max(1, size))

    def work():
        try:
            for item in iterator:
                out.put(item)
        except BaseException as err:  # handed to the consumer, which re-raises it
            out.put(_End(err))
            return
        out.put(_End())

    threading.Thread(target=work, name="clip_jax-input", daemon=True).start()
    return out


def prefetch_to_device(
    iterator: Iterable[Mapping[str, Any]],
    size: int,
    sharding,
    host_keys: Sequence[str] = DEFAULT_HOST_KEYS,
    poll: Callable[[], None] | None = None,
    poll_interval_s: float = 1.0,
) -> Iterator[dict]:
    """Yields `make_global_batch(batch)` for each host batch, keeping `size` batches ahead.

    Transfers are asynchronous, so while the step runs on batch i the next `size` batches are
    already being copied to the devices. Host fields (`position`) travel with their batch, so
    the position a consumer sees always belongs to the batch it just received — not to the
    batches pulled ahead (those must not be counted as consumed when checkpointing).
    `size=0` converts batches without prefetching.

    With `poll`, host batches are fetched in a background thread and `poll()` is called every
    `poll_interval_s` while the consumer waits for data; it may raise to stop waiting (e.g. on
    SIGTERM, or when the input pipeline can never deliver).
    """
    if size < 0:
        raise ValueError(f"prefetch size must be >= 0, got {size}")
    if poll is None:
        source = iter(iterator)
    else:
        source = _polled(_fetch_in_background(iterator, size + 1), poll, poll_interval_s)
    pending: collections.deque = collections.deque()
    for batch in source:
        pending.append(make_global_batch(batch, sharding, host_keys))
        if len(pending) > size:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def _polled(items: "queue.Queue", poll: Callable[[], None], interval: float) -> Iterator:
    while True:
        try:
            item = items.get(timeout=interval)
        except queue.Empty:
            poll()
            continue
        if isinstance(item, _End):
            if item.error is not None:
                raise item.error
            return
        yield item
