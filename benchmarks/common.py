"""Shared helpers for the benchmarks: bounded timing loops, a fast in-memory
entropy source, machine facts and the one-line verdict each target prints.

Benchmarks are not tests: they print numbers and ratios against a baseline
measured in the same run, and never fail a build on speed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from qr_sampler.entropy.base import EntropyChunk, EntropySource


def median_ms(
    fn: Callable[[], Any],
    *,
    setup: Callable[[], Any] | None = None,
    iters: int = 30,
    warmup: int = 3,
    budget_s: float = 10.0,
) -> float:
    """Median wall time of ``fn`` in milliseconds, ``setup`` (untimed) before each
    call; bounded by ``iters`` calls and ``budget_s`` seconds (at least 3 calls)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    deadline = time.monotonic() + budget_s
    for i in range(iters):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.monotonic() > deadline:
            break
    return statistics.median(times)


def interleaved_ms(
    fns: dict[str, Callable[[], Any]],
    *,
    setup: Callable[[], Any] | None = None,
    iters: int = 30,
    warmup: int = 3,
    budget_s: float = 20.0,
) -> dict[str, float]:
    """Median wall time (ms) of each function, measured round-robin so that a
    baseline and its candidate share the machine's noise; ``setup`` (untimed)
    runs before every call. Bounded by ``iters`` rounds and ``budget_s`` seconds
    (at least 3 rounds)."""
    for _ in range(warmup):
        for fn in fns.values():
            if setup is not None:
                setup()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.monotonic() + budget_s
    for i in range(iters):
        for name, fn in fns.items():
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.monotonic() > deadline:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


class PoolSource(EntropySource):
    """Fast in-memory entropy: slices of one pre-drawn random pool (benchmarks only,
    so that a step measures the sampling math, not an entropy transport).

    The pool is cut once per chunk size into ready ``bytes`` objects, which
    fetches hand out in turn: a fetch costs a list slice, not a copy of every
    row's bytes (256 rows x 20,480 bytes took 0.8 ms to slice and copy)."""

    name: ClassVar[str] = "bench_pool"

    def __init__(self, pool_bytes: int = 16 << 20, seed: int = 0) -> None:
        import numpy as np

        self._pool = np.random.default_rng(seed).integers(0, 256, pool_bytes, np.uint8).tobytes()
        self._cut: dict[int, list[EntropyChunk]] = {}
        self._next: dict[int, int] = {}

    def _chunks(self, n: int) -> list[EntropyChunk]:
        cut = self._cut.get(n)
        if cut is None:
            count = max(1, len(self._pool) // max(n, 1))
            pool = self._pool if n <= len(self._pool) else self._pool * (n // len(self._pool) + 1)
            cut = [
                EntropyChunk(
                    data=pool[i * n : (i + 1) * n], source=self.name, generation_timestamp_ns=0
                )
                for i in range(count)
            ]
            self._cut[n] = cut
        return cut

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        out: list[EntropyChunk] = []
        at = 0
        while at < len(sizes):  # runs of equal sizes (a batch is usually one run)
            n, end = sizes[at], at + 1
            while end < len(sizes) and sizes[end] == n:
                end += 1
            cut, k = self._chunks(n), end - at
            while k:
                i = self._next.get(n, 0)
                take = cut[i : i + k]
                self._next[n] = (i + len(take)) % len(cut)
                out.extend(take)
                k -= len(take)
            at = end
        return out


def machine() -> str:
    """One line: CPU model, cores, Python, torch (and GPU when used)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [cpu, f"{os.cpu_count()} cores", f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    return ", ".join(parts)


def verdict(name: str, value: float, target: float, *, higher_is_better: bool) -> str:
    """``name: value (target ...) -> met / MISSED``."""
    ok = value >= target if higher_is_better else value <= target
    rel = ">=" if higher_is_better else "<="
    return f"{name}: {value:.2f} (target {rel} {target:g}) -> {'met' if ok else 'MISSED'}"
