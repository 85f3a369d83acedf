"""Circuit breaker with an adaptive timeout — a pure class with an injectable clock.

States::

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(recovery wait elapsed; the next caller is the one probe)──▶ half_open
    half_open ──(probe succeeds)──▶ closed      (recovery wait back to its start)
    half_open ──(probe fails)──▶ open           (recovery wait doubled, up to its cap)

Adaptive timeout: the last ``window_size`` call latencies are kept (a call that
timed out enters with the deadline it was given, so the timeout can learn
upward); the deadline for the next call is
``clamp(p99 × timeout_multiplier, min_timeout_s, max_timeout_s)``, and
``max_timeout_s`` while the window is empty. p99 is the nearest-rank
percentile.

Defaults (the ``QR_CB_*`` / ``QR_GRPC_TIMEOUT_MS`` settings): window 100
latencies, multiplier 1.5, minimum 50 ms, maximum 5 s, opens after 3
consecutive failures, first recovery wait 5 s doubling up to 300 s.

The breaker never sleeps and never reads the wall clock itself: ``clock`` (a
monotonic seconds counter) is injected, which is how the tests drive it.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from qr_sampler.config import QRSettings

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Circuit-breaker parameters (seconds)."""

    window_size: int = 100
    timeout_multiplier: float = 1.5
    min_timeout_s: float = 0.05
    max_timeout_s: float = 5.0
    failure_threshold: int = 3
    recovery_s: float = 5.0
    max_recovery_s: float = 300.0

    def __post_init__(self) -> None:
        checks = (
            (self.window_size >= 1, "window_size must be >= 1"),
            (self.timeout_multiplier >= 1.0, "timeout_multiplier must be >= 1"),
            (self.min_timeout_s > 0, "min_timeout_s must be > 0"),
            (self.max_timeout_s >= self.min_timeout_s, "max_timeout_s must be >= min_timeout_s"),
            (self.failure_threshold >= 1, "failure_threshold must be >= 1"),
            (self.recovery_s > 0, "recovery_s must be > 0"),
            (self.max_recovery_s >= self.recovery_s, "max_recovery_s must be >= recovery_s"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_settings(cls, settings: QRSettings) -> BreakerConfig:
        max_timeout_s = settings.grpc_timeout_ms / 1000.0
        return cls(
            window_size=settings.cb_window_size,
            timeout_multiplier=settings.cb_timeout_multiplier,
            min_timeout_s=min(settings.cb_min_timeout_ms / 1000.0, max_timeout_s),
            max_timeout_s=max_timeout_s,
            failure_threshold=settings.cb_failure_threshold,
            recovery_s=settings.cb_recovery_s,
            max_recovery_s=settings.cb_max_recovery_s,
        )


class CircuitBreaker:
    """Thread-safe breaker; see the module docstring for the rules.

    Use: ``if breaker.allow(): ...call with timeout=breaker.timeout_s()...``,
    then :meth:`record_success` or :meth:`record_failure`.
    """

    def __init__(
        self,
        config: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=self.config.window_size)
        self._ordered: list[float] = []  # the same latencies, kept sorted
        self._state: State = "closed"
        self._consecutive_failures = 0
        self._recovery_s = self.config.recovery_s
        self._opened_at = 0.0
        self._probe_started: float | None = None
        #: how many times the breaker has opened
        self.times_opened = 0

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may be held by a lost thread)
        and no latencies (they were measured on the parent's connection)."""
        self._lock = threading.Lock()
        self._latencies.clear()
        self._ordered.clear()

    # -- queries ---------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def recovery_s(self) -> float:
        """The wait before the next probe once open (doubles per failed probe)."""
        return self._recovery_s

    def p99_s(self) -> float | None:
        """Nearest-rank 99th percentile of the latency window (None when empty)."""
        with self._lock:
            return self._p99()

    def _p99(self) -> float | None:
        ordered = self._ordered
        if not ordered:
            return None
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    def _record_latency(self, latency_s: float) -> None:
        """Add to the window (the oldest leaves a full one); the sorted copy
        follows, so the p99 needs no sort per call."""
        value = max(0.0, latency_s)
        if len(self._latencies) == self._latencies.maxlen:
            del self._ordered[bisect.bisect_left(self._ordered, self._latencies[0])]
        self._latencies.append(value)
        bisect.insort(self._ordered, value)

    def timeout_s(self) -> float:
        """Deadline for the next call: clamp(p99 × multiplier, minimum, maximum)."""
        c = self.config
        with self._lock:
            p99 = self._p99()
        if p99 is None:
            return c.max_timeout_s
        return min(max(p99 * c.timeout_multiplier, c.min_timeout_s), c.max_timeout_s)

    def retry_after_s(self) -> float:
        """Seconds until the breaker lets a probe through (0 unless open)."""
        with self._lock:
            if self._state != "open":
                return 0.0
            return max(0.0, self._opened_at + self._recovery_s - self._clock())

    # -- transitions ------------------------------------------------------
    def allow(self) -> bool:
        """May a call go ahead now? In ``open`` state past the recovery wait the
        breaker turns ``half_open`` and grants exactly one probe; a probe that
        never reports back is replaced after ``max_timeout_s`` (+ 1 s)."""
        with self._lock:
            now = self._clock()
            if self._state == "closed":
                return True
            if self._state == "open":
                if now < self._opened_at + self._recovery_s:
                    return False
                self._state = "half_open"
                self._probe_started = now
                return True
            # half_open: one probe at a time
            stale = self._probe_started is None or (
                now - self._probe_started > self.config.max_timeout_s + 1.0
            )
            if stale:
                self._probe_started = now
                return True
            return False

    def record_success(self, latency_s: float) -> None:
        """A call succeeded after ``latency_s`` seconds."""
        with self._lock:
            self._record_latency(latency_s)
            self._consecutive_failures = 0
            if self._state != "closed":
                self._state = "closed"
                self._recovery_s = self.config.recovery_s
                self._probe_started = None

    def record_failure(self, timed_out_after_s: float | None = None) -> None:
        """A call failed; pass the deadline it had when it failed by timing out."""
        with self._lock:
            if timed_out_after_s is not None:
                self._record_latency(timed_out_after_s)
            self._consecutive_failures += 1
            now = self._clock()
            if self._state == "half_open":
                self._recovery_s = min(self._recovery_s * 2.0, self.config.max_recovery_s)
                self._open(now)
            elif (
                self._state == "closed"
                and self._consecutive_failures >= self.config.failure_threshold
            ):
                self._open(now)

    def _open(self, now: float) -> None:
        self._state = "open"
        self._opened_at = now
        self._probe_started = None
        self.times_opened += 1

    def snapshot(self) -> dict[str, object]:
        """State for logs, metrics and health output."""
        timeout = self.timeout_s()
        with self._lock:
            return {
                "state": self._state,
                "consecutive_failures": self._consecutive_failures,
                "times_opened": self.times_opened,
                "recovery_s": self._recovery_s,
                "timeout_s": timeout,
                "p99_s": self._p99(),
                "window": len(self._latencies),
            }


__all__ = ["BreakerConfig", "CircuitBreaker", "State"]
