"""The vectorised health tests against a byte-by-byte reference model.

The reference states the monitor's contract one byte at a time: the repetition
count runs on across calls, the APT windows continue across calls, the RCT is
judged over the whole chunk first (so it wins when both would fail), and any
failure resets all state. Every call's verdict and the counters must agree
exactly, for random, low-alphabet and adversarial streams cut in arbitrary
places, under several cutoffs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qr_sampler.entropy import health
from qr_sampler.entropy.health import HealthCutoffs, HealthMonitor, _has_true_run


class ReferenceMonitor:
    """One byte at a time, no numpy: the semantics the fast monitor must keep."""

    def __init__(self, cutoffs: HealthCutoffs) -> None:
        self.c = cutoffs
        self.failures = {"rct": 0, "apt": 0}
        self.bytes_tested = 0
        self.reset()

    def reset(self) -> None:
        self.last = -1
        self.run = 0
        self.window = bytearray()

    def check(self, data: bytes) -> str | None:
        if not data:
            return None
        self.bytes_tested += len(data)
        last, run, rct_failed = self.last, self.run, False
        for b in data:
            run = run + 1 if b == last else 1
            last = b
            rct_failed = rct_failed or run >= self.c.rct
        failed: str | None = None
        if rct_failed:
            failed = "rct"
        else:
            self.last, self.run = last, run
            worst = 0
            for b in data:
                self.window.append(b)
                if len(self.window) == self.c.window:
                    worst = max(worst, self.window.count(self.window[0]))
                    self.window.clear()
            if worst >= self.c.apt:
                failed = "apt"
        if failed is not None:
            self.failures[failed] += 1
            self.reset()
        return failed


@contextlib.contextmanager
def _small_chunk(limit: int) -> Iterator[None]:
    saved = health.SMALL_CHUNK
    health.SMALL_CHUNK = limit
    try:
        yield
    finally:
        health.SMALL_CHUNK = saved


def _compare(stream: bytes, cuts: list[int], min_entropy: float, alpha_log2: int) -> None:
    """Every path through the monitor must agree with the model: bytes and views
    (a reply's payload inside its message, as the client passes it), small chunks
    on the light path and, with the limit at 0, on the block path."""
    for limit in (health.SMALL_CHUNK, 0):
        with _small_chunk(limit):
            fast = HealthMonitor(min_entropy, alpha_log2)
            viewed = HealthMonitor(min_entropy, alpha_log2)
            ref = ReferenceMonitor(fast.cutoffs)
            offset = 0
            for n in cuts:
                piece = stream[offset : offset + n]
                offset += n
                expected = ref.check(piece)
                assert fast.check(piece) == expected, (limit, offset, n)
                message = b"\x0a\x07" + piece + b"\x10\x01"  # inside a larger buffer
                view = memoryview(message)[2 : 2 + len(piece)]
                assert viewed.check(view) == expected, (limit, offset, n)
            for monitor in (fast, viewed):
                assert monitor.failures == ref.failures
                assert monitor.bytes_tested == ref.bytes_tested


def _stream(kind: str, size: int, rng: np.random.Generator) -> bytes:
    if kind == "uniform":
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    if kind == "small_alphabet":
        return rng.integers(0, int(rng.integers(2, 5)), size, dtype=np.uint8).tobytes()
    if kind == "runs":  # runs of random length around the RCT cutoffs
        out = bytearray()
        while len(out) < size:
            out += bytes([int(rng.integers(0, 4))]) * int(rng.integers(1, 9))
        return bytes(out[:size])
    if kind == "biased":  # one value over-represented, near the APT cutoff
        p = float(rng.uniform(0.02, 0.12))
        vals = rng.integers(1, 256, size, dtype=np.uint8)
        vals[rng.random(size) < p] = 0
        return vals.tobytes()
    raise AssertionError(kind)


KINDS = ("uniform", "small_alphabet", "runs", "biased")
PARAMS = ((6.0, 30), (8.0, 30), (2.0, 30), (4.0, 20), (1.0, 10), (8.0, 200))


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(KINDS),
    params=st.sampled_from(PARAMS),
    cuts=st.lists(st.integers(1, 1500), min_size=1, max_size=10),
)
def test_matches_reference_on_cut_streams(
    seed: int, kind: str, params: tuple[float, int], cuts: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    _compare(_stream(kind, sum(cuts), rng), cuts, *params)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=12),
    alphabet=st.sampled_from([1, 2, 3, 256]),
    params=st.sampled_from(PARAMS),
)
def test_matches_reference_on_tiny_pieces(
    pieces: list[bytes], alphabet: int, params: tuple[float, int]
) -> None:
    """Pieces shorter than a run or a window: all carried state is exercised."""
    pieces = [bytes(b % alphabet for b in p) for p in pieces]
    _compare(b"".join(pieces), [len(p) for p in pieces], *params)


@pytest.mark.parametrize("params", PARAMS)
def test_matches_reference_on_adversarial_streams(params: tuple[float, int]) -> None:
    c = HealthCutoffs.derive(*params)
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, 4 * c.window, dtype=np.uint8)
    base[1:][base[1:] == base[:-1]] ^= 1  # no repeats at all
    clean = base.tobytes()
    cases = [
        bytes(3 * c.window),  # stuck at zero
        clean,
        # a run of exactly C_rct - 1, then C_rct, at the start, middle and end
        bytes([9]) * (c.rct - 1) + clean,
        clean + bytes([9]) * (c.rct - 1),
        clean[:700] + bytes([clean[699]]) * (c.rct - 1) + clean[700:],
        clean[:700] + bytes([clean[699]]) * (c.rct - 2) + clean[700:],
        # one window with the first value exactly C_apt - 1 and C_apt times, spread out
        _apt_window(c, c.apt - 1) + clean,
        _apt_window(c, c.apt) + clean,
        clean[:100] + _apt_window(c, c.apt) + clean,  # not window-aligned: no failure
    ]
    for stream in cases:
        for cuts in (
            [len(stream)],
            [1] * min(len(stream), 2 * c.window + 5),
            [c.rct - 1, c.window - 1, 3, c.window, len(stream)],
            [c.window // 2, c.window // 2 + 1, 7, len(stream)],
        ):
            _compare(stream, cuts, *params)


def test_matches_reference_across_block_edges() -> None:
    """Chunks longer than the monitor's block (131,072 bytes): runs and failing
    windows placed on, just before and just after the block edges."""
    c = HealthCutoffs.derive()
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, 300_000, dtype=np.uint8)
    base[1:][base[1:] == base[:-1]] ^= 1  # no repeats at all
    clean = base.tobytes()
    window = _apt_window(c, c.apt)
    for edge in (131_072, 262_144):
        for shift in range(-c.rct - 1, 3):
            at = edge + shift
            for length in (c.rct - 1, c.rct):
                stream = clean[:at] + bytes([7]) * length + clean[at + length :]
                _compare(stream, [len(stream)], 6.0, 30)
        aligned = edge - edge % c.window  # windows count from the chunk's start
        stream = clean[:aligned] + window + clean[aligned + len(window) :]
        _compare(stream, [len(stream)], 6.0, 30)
        _compare(stream, [100, len(stream) - 100], 6.0, 30)


def _apt_window(c: HealthCutoffs, hits: int) -> bytes:
    """A window whose first byte occurs ``hits`` times, never twice in a row."""
    w = np.arange(c.window, dtype=np.int64) % 200 + 20
    w[0] = 0
    spots = np.arange(2, c.window, 2)[: hits - 1]
    w[spots] = 0
    return w.astype(np.uint8).tobytes()


@settings(max_examples=300, deadline=None)
@given(mask=st.lists(st.booleans(), max_size=60), k=st.integers(1, 20))
def test_has_true_run_matches_a_scan(mask: list[bool], k: int) -> None:
    longest = run = 0
    for bit in mask:
        run = run + 1 if bit else 0
        longest = max(longest, run)
    assert _has_true_run(np.array(mask, dtype=bool), k) == (longest >= k)
