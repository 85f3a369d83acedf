"""Continuous health tests on incoming entropy (NIST SP 800-90B, section 4.4).

Two tests watch the byte stream as it arrives and catch a stuck or badly
broken device before its output becomes tokens:

Repetition count test (RCT, 4.4.1)
    Fails when one byte value repeats ``C_rct`` times in a row.
    ``C_rct = 1 + ceil(alpha_log2 / H)``: for a source with min-entropy ``H``
    bits per byte, a given value repeats ``C_rct - 1`` more times with
    probability at most ``2**(-H * (C_rct - 1)) <= 2**-alpha_log2``.

Adaptive proportion test (APT, 4.4.2)
    Cuts the stream into non-overlapping windows of ``W = 512`` bytes (the
    standard's window for non-binary samples); counts ``B``, the occurrences of
    each window's first byte within that window (the first one included), and
    fails when ``B >= C_apt``. Under the assumption the other ``W - 1`` bytes
    match the first with probability at most ``p = 2**-H`` each, so
    ``B - 1 ~ Binomial(W - 1, p)``, and
    ``C_apt = 1 + min{k : P(Binomial(W - 1, p) >= k) <= 2**-alpha_log2}``,
    computed exactly from the binomial distribution (log-space sums of the
    probability mass function; no normal approximation, no scipy). This is
    the exact form of the standard's ``C = 1 + CRITBINOM(W, 2**-H, 1 - alpha)``
    for the count the test actually makes, so the false-alarm probability per
    window is at most ``2**-alpha_log2`` as stated.

Both cutoffs depend on two settings: the assumed min-entropy per byte
(``QR_HEALTH_MIN_ENTROPY``, default 6 bits: a conservative figure well under
a good QRNG's 7.9+) and the false-alarm probability ``2**-alpha_log2`` per
test opportunity (``QR_HEALTH_ALPHA_LOG2``, default 30). With the defaults
``C_rct = 6`` and ``C_apt = 32``. A genuinely uniform source (8 bits/byte)
trips the RCT about once per ``2**40`` bytes (≈ 1 TB) and practically never
the APT; an all-zero reply fails at once.

The tests run continuously: state (the current run, the partial window)
carries over from one call to the next. After a failure the state is reset,
so the next data is judged afresh (the circuit breaker decides when to ask).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from qr_sampler.errors import HealthTestError

#: window of the adaptive proportion test for non-binary samples (SP 800-90B 4.4.2)
APT_WINDOW: int = 512
#: defaults shared by the client settings and the server CLI
DEFAULT_MIN_ENTROPY: float = 6.0
DEFAULT_ALPHA_LOG2: int = 30

_TEST_NAMES = {"rct": "repetition count test", "apt": "adaptive proportion test"}


class HealthTestFailure(HealthTestError):
    """A continuous health test failed; ``test`` is ``"rct"`` or ``"apt"``."""

    def __init__(self, test: str, message: str) -> None:
        super().__init__(message)
        self.test = test
        #: the value for a chunk's ``health`` field
        self.health = f"failed:{test}"


def _check_params(min_entropy: float, alpha_log2: int) -> None:
    if not 0.0 < min_entropy <= 8.0:
        raise ValueError(f"min_entropy must be > 0 and <= 8 bits per byte; got {min_entropy}")
    if not 1 <= alpha_log2 <= 200:
        raise ValueError(f"alpha_log2 must be an integer from 1 to 200; got {alpha_log2}")


def rct_cutoff(min_entropy: float, alpha_log2: int) -> int:
    """Repetition count cutoff ``1 + ceil(alpha_log2 / H)`` (SP 800-90B 4.4.1)."""
    _check_params(min_entropy, alpha_log2)
    # the tiny tolerance keeps exact ratios such as 30 / 6 from rounding up
    return 1 + math.ceil(alpha_log2 / min_entropy - 1e-12)


def binomial_upper_tail(n: int, p: float, k: int) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, summed exactly in log space."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lg_n1 = math.lgamma(n + 1)
    logs = [
        lg_n1 - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(v - top) for v in logs)


def apt_cutoff(min_entropy: float, alpha_log2: int, window: int = APT_WINDOW) -> int:
    """Adaptive proportion cutoff: the smallest ``C`` with ``P(B >= C) <= 2**-alpha_log2``,
    where ``B - 1 ~ Binomial(window - 1, 2**-H)`` (see the module docstring)."""
    _check_params(min_entropy, alpha_log2)
    if window < 2:
        raise ValueError(f"window must be >= 2; got {window}")
    n, p = window - 1, 2.0**-min_entropy
    log_alpha = -alpha_log2 * math.log(2.0)
    # walk down from the top of the distribution, accumulating the upper tail
    log_pmf = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(n + 1)
    ]
    tail = 0.0
    k = n + 1  # P(X >= n + 1) = 0 <= alpha
    while k > 0:
        candidate = tail + math.exp(log_pmf[k - 1])
        if candidate > 0.0 and math.log(candidate) > log_alpha:
            break
        tail = candidate
        k -= 1
    return 1 + k


@dataclass(frozen=True, slots=True)
class HealthCutoffs:
    """The cutoffs in force and the assumptions they come from."""

    min_entropy: float
    alpha_log2: int
    rct: int
    apt: int
    window: int = APT_WINDOW

    @classmethod
    def derive(
        cls, min_entropy: float = DEFAULT_MIN_ENTROPY, alpha_log2: int = DEFAULT_ALPHA_LOG2
    ) -> HealthCutoffs:
        return cls(
            min_entropy=min_entropy,
            alpha_log2=alpha_log2,
            rct=rct_cutoff(min_entropy, alpha_log2),
            apt=apt_cutoff(min_entropy, alpha_log2),
        )

    def describe(self) -> dict[str, object]:
        return {
            "min_entropy_bits_per_byte": self.min_entropy,
            "false_alarm_log2": -self.alpha_log2,
            "rct_cutoff": self.rct,
            "apt_cutoff": self.apt,
            "apt_window": self.window,
        }


class HealthMonitor:
    """Stateful RCT + APT over one continuous byte stream (thread-safe).

    :meth:`check` returns ``None`` when the bytes pass, else the failing test's
    name; :meth:`test` raises :class:`HealthTestFailure` instead. Counters:
    ``bytes_tested``, ``failures`` (per test).
    """

    def __init__(
        self, min_entropy: float = DEFAULT_MIN_ENTROPY, alpha_log2: int = DEFAULT_ALPHA_LOG2
    ) -> None:
        self.cutoffs = HealthCutoffs.derive(min_entropy, alpha_log2)
        self.bytes_tested = 0
        self.failures: dict[str, int] = {"rct": 0, "apt": 0}
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._last = -1  # no previous byte
        self._run = 0
        self._partial = b""  # bytes of the current, incomplete APT window

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may be held by a lost thread)."""
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def _rct(self, arr: np.ndarray) -> bool:
        """True when ``arr`` (continuing the carried run) holds a run of ``C_rct``."""
        c = self.cutoffs.rct
        if self._run and int(arr[0]) == self._last:
            # continue the carried run: prepend (at most C - 1) copies of its value
            head = np.full(min(self._run, c - 1), self._last, dtype=np.uint8)
            arr = np.concatenate((head, arr))
        eq = arr[1:] == arr[:-1]  # eq[i]: byte i + 1 repeats byte i
        k = c - 1  # a run of c bytes is k consecutive equal pairs
        failed = False
        if eq.size >= k:
            acc = eq[: eq.size - k + 1].copy()
            for j in range(1, k):
                acc &= eq[j : eq.size - k + 1 + j]
            failed = bool(acc.any())
        # carry the trailing run (capped: longer runs have failed already)
        tail = eq[-k:] if k else eq[:0]
        breaks = np.flatnonzero(~tail)
        trailing = tail.size - 1 - int(breaks[-1]) if breaks.size else tail.size
        self._last = int(arr[-1])
        self._run = min(trailing + 1, arr.size)
        return failed

    def _apt(self, data: bytes) -> int:
        """Largest first-value count over the windows completed by ``data``."""
        buf = self._partial + data
        w = self.cutoffs.window
        full = len(buf) // w
        self._partial = buf[full * w :]
        if full == 0:
            return 0
        windows = np.frombuffer(buf, dtype=np.uint8, count=full * w).reshape(full, w)
        counts = np.count_nonzero(windows == windows[:, :1], axis=1)
        return int(counts.max())

    def check(self, data: bytes) -> str | None:
        """Run both tests over ``data``; ``None`` if they pass, else ``"rct"``/``"apt"``."""
        if not data:
            return None
        arr = np.frombuffer(data, dtype=np.uint8)
        with self._lock:
            self.bytes_tested += len(data)
            failed: str | None = None
            if self._rct(arr):
                failed = "rct"
            elif self._apt(data) >= self.cutoffs.apt:
                failed = "apt"
            if failed is not None:
                self.failures[failed] += 1
                self._reset()
            return failed

    def message(self, test: str) -> str:
        c = self.cutoffs
        what = (
            f"a byte value repeated {c.rct} or more times in a row"
            if test == "rct"
            else f"one byte value filled {c.apt} or more of a {c.window}-byte window"
        )
        return (
            f"{_TEST_NAMES[test]} failed: {what} (cutoffs for min-entropy {c.min_entropy:g} "
            f"bits/byte, false-alarm probability 2^-{c.alpha_log2})"
        )

    def test(self, data: bytes) -> None:
        """Like :meth:`check`, raising :class:`HealthTestFailure` on failure."""
        failed = self.check(data)
        if failed is not None:
            raise HealthTestFailure(failed, self.message(failed))


__all__ = [
    "APT_WINDOW",
    "DEFAULT_ALPHA_LOG2",
    "DEFAULT_MIN_ENTROPY",
    "HealthCutoffs",
    "HealthMonitor",
    "HealthTestFailure",
    "apt_cutoff",
    "binomial_upper_tail",
    "rct_cutoff",
]
