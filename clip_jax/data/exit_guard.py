"""Python called from tf.data's threads, stopped before the interpreter exits.

A tf.data iterator still alive when Python exits (say `it = iter(ds)` at module level) is
destroyed during interpreter finalization, and its destructor waits for its worker threads. A
worker that is inside one of our Python callbacks with the GIL released (a native tokenizer, a
file read, a sleep) or about to enter one can never take the GIL back at that point: CPython
ends such threads and pyo3 (HF `tokenizers`) parks them forever, so the destructor waits
forever. Measured: a script holding a busy train pipeline's iterator at exit hung in 4 of 6 runs
(and in 5 of 5 with only the tokenising map).

`atexit` hooks run before finalization, while threads can still take the GIL. The hook here
makes every guarded callback fail at once from then on (the pipeline's buffers fill with errors
and its threads go idle) and waits, briefly, for the callbacks already running to return.
Callbacks are guarded with `guarded` (functions run by `tf.numpy_function`/`tf.py_function`)
and `guarded_iter` (generators behind `Dataset.from_generator`).
"""

from __future__ import annotations

import atexit
import functools
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

# Seconds the exit hook waits for running callbacks, and how long none must have run before
# the pipelines count as idle (a parallel map starts its next call within microseconds).
EXIT_WAIT_S = 10.0
IDLE_S = 0.2


class InterpreterExiting(RuntimeError):
    """Raised by a guarded callback called after the exit hook ran."""


_closing = threading.Event()
_lock = threading.Lock()
_in_flight = 0
_last_activity = 0.0


def _enter() -> None:
    global _in_flight, _last_activity
    if _closing.is_set():
        raise InterpreterExiting("the Python interpreter is exiting; input pipeline stopped")
    with _lock:
        _in_flight += 1
        _last_activity = time.monotonic()


def _leave() -> None:
    global _in_flight, _last_activity
    with _lock:
        _in_flight -= 1
        _last_activity = time.monotonic()


def guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, failing at once after the exit hook ran and counted while it runs.

    Call it outside functions that tf.data traces (or from one marked
    `tf.autograph.experimental.do_not_convert`): called inside, AutoGraph converts the wrapper,
    and the converted wrapper converts `fn` at every call (a batched tokeniser: 20.4 instead of
    16.0 us per text). This module does not import TensorFlow (`clip_jax.data.config` uses it
    through `text_shorten` without TensorFlow).
    """

    @functools.wraps(fn)
    def call(*args, **kwargs):
        _enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _leave()

    return call


def guarded_iter(items: Iterable[T]) -> Iterator[T]:
    """`items`, ending (with InterpreterExiting) at the next item after the exit hook ran."""
    iterator = iter(items)
    while True:
        _enter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            _leave()
        yield item


def quiesce(timeout_s: float = EXIT_WAIT_S, idle_s: float = IDLE_S) -> bool:
    """Stops guarded callbacks and waits until none ran for `idle_s` (True) or `timeout_s`
    passed (False). Registered with atexit; irreversible."""
    _closing.set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _lock:
            idle = _in_flight == 0 and time.monotonic() - _last_activity >= idle_s
        if idle:
            return True
        time.sleep(0.01)
    return False


atexit.register(quiesce)
