"""A few helper threads for host work that releases the GIL.

``os.urandom``, numpy's integer reductions and large ``bytes.join`` calls all
run without the GIL, so a large piece of such work split over a few cores
finishes sooner. One small pool serves the process (made anew in a forked
child, where threads do not survive); the calling thread always does the
first part itself, so a split in two costs one hand-off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

#: at most this many parts run at once (the calling thread's included)
MAX_PARTS = 4

_T = TypeVar("_T")
_R = TypeVar("_R")

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: a container's CPU
    set), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def parts_for(total: int, min_part: int) -> int:
    """How many parts to split ``total`` units of work into: each at least
    ``min_part``, at most :data:`MAX_PARTS` and at most one per usable core."""
    return max(1, min(MAX_PARTS, usable_cpus(), total // max(min_part, 1)))


def _helpers() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(MAX_PARTS - 1, thread_name_prefix="qr-sampler-split")
            _pool_pid = os.getpid()
        return _pool


def run_split(fn: Callable[[_T], _R], parts: Sequence[_T]) -> list[_R]:
    """``[fn(p) for p in parts]``, with every part after the first on a helper
    thread while the calling thread does the first. Results in ``parts``'
    order; the first exception raised is re-raised after every part ended."""
    if len(parts) <= 1:
        return [fn(p) for p in parts]
    if len(parts) > MAX_PARTS:
        raise ValueError(f"at most {MAX_PARTS} parts, got {len(parts)}")
    rest = [_helpers().submit(fn, p) for p in parts[1:]]
    try:
        first = fn(parts[0])
    finally:
        errors = [f.exception() for f in rest]  # waits for each: nothing is left running
    for exc in errors:
        if exc is not None:
            raise exc
    return [first, *(f.result() for f in rest)]


__all__ = ["MAX_PARTS", "parts_for", "run_split", "usable_cpus"]
