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


#: bytes examined per block: every pass of a block stays in the CPU cache, and the
#: scratch arrays (allocated once per monitor) stay small
_BLOCK: int = 131_072  # a multiple of APT_WINDOW
#: chunks up to this size (a token's bytes) take the light path: few calls, each
#: cheap with cold caches (a server between requests, where the array passes of
#: the block path cost several times their warm time); larger chunks take the
#: block path, whose per-byte cost is lower
SMALL_CHUNK: int = 32_768


def _has_true_run(
    mask: np.ndarray, k: int, scratch: tuple[np.ndarray, np.ndarray] | None = None
) -> bool:
    """True when the 1-D boolean ``mask`` holds ``k >= 1`` consecutive True values.

    Doubling: after each step ``cur[i]`` says whether ``mask[i : i + length]`` is
    all True; a final overlapping step reaches exactly ``k``. About
    ``log2(k) + 1`` whole-array passes, never a Python loop over the data.
    ``scratch``: two writable boolean arrays of at least ``mask.size`` elements,
    written alternately (the first must not share memory with ``mask``).
    """
    if mask.size < k:
        return False
    if scratch is None:
        scratch = (np.empty(mask.size, dtype=bool), np.empty(mask.size, dtype=bool))
    cur, length, turn = mask, 1, 0
    while 2 * length <= k:  # at most log2(k) steps
        size = cur.size - length
        cur = np.logical_and(cur[:size], cur[length:], out=scratch[turn][:size])
        length *= 2
        turn ^= 1
    rest = k - length  # 0 <= rest < length: the two spans overlap or touch
    if rest:
        size = cur.size - rest
        cur = np.logical_and(cur[:size], cur[rest:], out=scratch[turn][:size])
    return bool(cur.any())


def _first_value_counts(windows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Per row of the 2-D ``uint8`` array: how often the row's first value occurs in it.

    ``out``: an optional boolean scratch array of the same shape."""
    hits = np.equal(windows, windows[:, :1], out=out)
    # a row of at most 65,535 values cannot overflow a 16-bit count
    counts: np.ndarray = hits.sum(axis=1, dtype=np.uint16 if hits.shape[1] <= 65_535 else np.int64)
    return counts


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
        # scratch arrays for one block (used under the lock)
        span = _BLOCK + self.cutoffs.rct
        self._scratch = tuple(np.empty(span, dtype=bool) for _ in range(3))
        # light path: the equal-neighbour mask goes into a bytearray, where a run of
        # C_rct equal bytes (C_rct - 1 equal pairs) is one substring search
        self._eq = bytearray(SMALL_CHUNK)
        self._eq_mask = np.frombuffer(self._eq, dtype=bool)
        self._needle = b"\x01" * (self.cutoffs.rct - 1)
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

    def _rct(self, data: bytes | memoryview, arr: np.ndarray) -> bool:
        """True when ``data`` (continuing the carried run) holds a run of ``C_rct``.

        Only the ends of the chunk are walked in Python (at most ``C_rct`` bytes
        each); the interior is checked by :meth:`_interior_run`.
        """
        c = self.cutoffs.rct
        n = len(data)
        limit = min(n, c)
        first, final = data[0], data[-1]
        lead = 1  # leading run, capped at c
        while lead < limit and data[lead] == first:
            lead += 1
        carried = self._run if self._run and first == self._last else 0
        if carried + lead >= c:
            return True
        if n >= c and self._interior_run(arr, c - 1):
            return True
        trail = 1  # trailing run, capped at c (a run of c has failed above)
        while trail < limit and data[n - 1 - trail] == final:
            trail += 1
        self._last = final
        self._run = carried + n if trail == n else trail
        return False

    def _interior_run(self, arr: np.ndarray, k: int) -> bool:
        """True when ``arr`` holds ``k + 1`` equal bytes in a row.

        Light path (``arr.size <= SMALL_CHUNK``): one pass writes the
        equal-neighbour mask into a bytearray and a substring search finds ``k``
        True bytes in a row in it — two calls. Block path: per block, the mask
        and :func:`_has_true_run`'s shifted ANDs; blocks overlap by ``k`` bytes,
        so a run crossing a block edge is seen."""
        if arr.size <= SMALL_CHUNK:
            m = arr.size - 1
            np.equal(arr[1:], arr[:-1], out=self._eq_mask[:m])
            return self._eq.find(self._needle, 0, m) >= 0
        eq_buf, spare_a, spare_b = self._scratch
        for start in range(0, arr.size - k, _BLOCK):  # ceil(size / _BLOCK) blocks at most
            seg = arr[start : start + _BLOCK + k]
            eq = np.equal(seg[1:], seg[:-1], out=eq_buf[: seg.size - 1])
            if _has_true_run(eq, k, (spare_a, spare_b)):
                return True
        return False

    def _apt(self, data: bytes | memoryview, arr: np.ndarray) -> int:
        """Largest first-value count over the windows completed by ``data``."""
        w = self.cutoffs.window
        worst = 0
        start = 0
        if self._partial:
            need = w - len(self._partial)
            if len(data) < need:
                self._partial += data
                return 0
            first = self._partial + data[:need]  # the carried window, completed
            worst = first.count(first[0])
            start = need
        full = (len(data) - start) // w
        end = start + full * w
        if full and isinstance(data, bytes) and len(data) <= SMALL_CHUNK:
            # light path: one C-level count per window (no Python loop)
            firsts = data[start:end:w]
            counts = map(data.count, firsts, range(start, end, w), range(start + w, end + w, w))
            worst = max(worst, max(counts))
        elif full:
            rows = max(1, _BLOCK // w)  # windows per block
            hits = self._scratch[0]
            for first_row in range(0, full, rows):  # ceil(full / rows) blocks at most
                count = min(rows, full - first_row)
                lo = start + first_row * w
                windows = arr[lo : lo + count * w].reshape(count, w)
                out = hits[: count * w].reshape(count, w) if count * w <= hits.size else None
                worst = max(worst, int(_first_value_counts(windows, out).max()))
        self._partial = bytes(data[end:])
        return worst

    def check(self, data: bytes | memoryview) -> str | None:
        """Run both tests over ``data``; ``None`` if they pass, else ``"rct"``/``"apt"``.

        ``data``: bytes, or a view of bytes (not copied)."""
        if not data:
            return None
        if not isinstance(data, bytes):
            data = memoryview(data).cast("B")  # a flat view of unsigned bytes, no copy
        arr = np.frombuffer(data, dtype=np.uint8)
        with self._lock:
            self.bytes_tested += len(data)
            failed: str | None = None
            if self._rct(data, arr):
                failed = "rct"
            elif self._apt(data, arr) >= self.cutoffs.apt:
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

    def test(self, data: bytes | memoryview) -> None:
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
