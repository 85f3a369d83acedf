"""SP 800-90B continuous health tests: exact cutoffs, continuity, detection."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qr_sampler.entropy.health import (
    APT_WINDOW,
    HealthCutoffs,
    HealthMonitor,
    HealthTestFailure,
    apt_cutoff,
    binomial_upper_tail,
    rct_cutoff,
)
from qr_sampler.errors import HealthTestError


def exact_tail(n: int, p: Fraction, k: int) -> Fraction:
    return sum(
        (Fraction(math.comb(n, i)) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)),
        Fraction(0),
    )


def test_default_cutoffs() -> None:
    c = HealthCutoffs.derive()
    assert (c.rct, c.apt, c.window) == (6, 32, 512)
    assert rct_cutoff(8, 30) == 5 and rct_cutoff(6, 30) == 6 and rct_cutoff(7, 30) == 6


@pytest.mark.parametrize("h", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("alpha_log2", [20, 30, 40])
def test_apt_cutoff_is_exactly_the_smallest_meeting_alpha(h: int, alpha_log2: int) -> None:
    """Checked with exact rational arithmetic: P(B >= C) <= alpha < P(B >= C - 1)."""
    c = apt_cutoff(h, alpha_log2)
    n, p, alpha = APT_WINDOW - 1, Fraction(1, 2**h), Fraction(1, 2**alpha_log2)
    assert exact_tail(n, p, c - 1) <= alpha  # B >= C  <=>  B - 1 >= C - 1
    assert exact_tail(n, p, c - 2) > alpha
    assert binomial_upper_tail(n, float(p), c - 1) == pytest.approx(
        float(exact_tail(n, p, c - 1)), rel=1e-9
    )


def test_rct_cutoff_bounds_the_false_alarm() -> None:
    for h in (0.5, 1.0, 3.3, 6.0, 7.9, 8.0):
        for a in (10, 30, 60):
            c = rct_cutoff(h, a)
            assert 2.0 ** (-h * (c - 1)) <= 2.0**-a
            assert 2.0 ** (-h * (c - 2)) > 2.0**-a


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="min_entropy"):
        HealthMonitor(min_entropy=0)
    with pytest.raises(ValueError, match="min_entropy"):
        HealthMonitor(min_entropy=9)
    with pytest.raises(ValueError, match="alpha_log2"):
        HealthMonitor(alpha_log2=0)


def brute_rct(stream: bytes, c: int) -> bool:
    run, last = 0, -1
    for b in stream:
        run = run + 1 if b == last else 1
        last = b
        if run >= c:
            return True
    return False


def brute_apt(stream: bytes, c: int, w: int = APT_WINDOW) -> bool:
    for start in range(0, len(stream) - w + 1, w):
        window = stream[start : start + w]
        if window.count(window[0]) >= c:
            return True
    return False


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8),
    alphabet=st.sampled_from([2, 3, 256]),
)
def test_rct_carries_runs_across_calls(pieces: list[bytes], alphabet: int) -> None:
    pieces = [bytes(b % alphabet for b in p) for p in pieces]
    m = HealthMonitor(min_entropy=8, alpha_log2=30)  # C_rct = 5
    failed = None
    for p in pieces:
        failed = failed or m.check(p)
    expected = brute_rct(b"".join(pieces), 5)
    if expected:
        assert failed is not None
    else:
        assert failed is None


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    symbols=st.sampled_from([2, 3, 4]),
    cuts=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
)
def test_apt_windows_continue_across_calls(seed: int, symbols: int, cuts: list[int]) -> None:
    """Small alphabets under an H = 2 assumption (C_apt = 191 of 512): three symbols
    sit near the cutoff, so both outcomes occur; the verdict must equal a direct
    window-by-window count of the whole stream, however it was cut."""
    rng = np.random.default_rng(seed)
    total = sum(cuts)
    stream = rng.integers(0, symbols, size=total, dtype=np.uint8).tobytes()
    m = HealthMonitor(min_entropy=2, alpha_log2=30)  # C_rct = 16, C_apt = 191
    failures = []
    offset = 0
    for n in cuts:
        got = m.check(stream[offset : offset + n])
        offset += n
        if got:
            failures.append(got)
            break
    expected_rct = brute_rct(stream, m.cutoffs.rct)
    expected_apt = brute_apt(stream, m.cutoffs.apt)
    assert bool(failures) == (expected_rct or expected_apt)


def test_apt_detects_a_value_that_fills_too_much_of_a_window() -> None:
    m = HealthMonitor()  # C_rct = 6, C_apt = 32
    rng = np.random.default_rng(7)
    window = rng.integers(1, 256, size=APT_WINDOW, dtype=np.uint8)
    window[0] = 0
    spots = rng.choice(np.arange(2, APT_WINDOW, 3), size=31, replace=False)  # never adjacent
    window[spots] = 0  # 32 zeros in all, no run longer than 1
    assert not brute_rct(window.tobytes(), 6)
    assert m.check(window[:100].tobytes()) is None  # window split across calls
    assert m.check(window[100:].tobytes()) == "apt"
    assert m.failures == {"rct": 0, "apt": 1}
    ok = window.copy()
    ok[spots[0]] = 5  # 31 zeros: passes
    assert HealthMonitor().check(ok.tobytes()) is None


def test_stuck_device_fails_at_once_and_says_so() -> None:
    m = HealthMonitor()
    with pytest.raises(HealthTestFailure) as info:
        m.test(bytes(20480))
    err = info.value
    assert isinstance(err, HealthTestError) and err.reason == "health_test"
    assert err.test == "rct" and err.health == "failed:rct"
    assert "repetition count test failed" in str(err) and "2^-30" in str(err)
    assert m.failures["rct"] == 1


def test_run_straddling_two_calls_is_caught() -> None:
    m = HealthMonitor()  # C_rct = 6
    a = bytes(range(100)) + b"\x07\x07\x07"
    b = b"\x07\x07\x07" + bytes(range(8, 108))
    assert m.check(a) is None
    assert m.check(b) == "rct"


def test_badly_biased_device_is_detected() -> None:
    rng = np.random.default_rng(11)
    data = np.where(rng.random(20480) < 0.3, 0, rng.integers(0, 256, 20480)).astype(np.uint8)
    assert HealthMonitor().check(data.tobytes()) in ("rct", "apt")


def test_uniform_bytes_pass() -> None:
    """Seeded uniform bytes (10 MiB): the cutoffs give no false alarm here."""
    rng = np.random.default_rng(2024)
    m = HealthMonitor()
    for _ in range(512):
        assert m.check(rng.integers(0, 256, 20480, dtype=np.uint8).tobytes()) is None
    assert m.bytes_tested == 512 * 20480
    assert m.failures == {"rct": 0, "apt": 0}


def test_state_resets_after_a_failure() -> None:
    m = HealthMonitor()
    assert m.check(b"\x01" * 5) is None
    assert m.check(b"\x01") == "rct"
    assert m.check(b"\x01" * 5) is None  # judged afresh
