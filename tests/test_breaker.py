"""The circuit breaker, driven by an injected clock (no sleeping, no wall time)."""

from __future__ import annotations

import math
import random

import pytest

from qr_sampler.config import load_settings
from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw: float) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    params = dict(
        window_size=100,
        timeout_multiplier=1.5,
        min_timeout_s=0.005,
        max_timeout_s=5.0,
        failure_threshold=3,
        recovery_s=5.0,
        max_recovery_s=300.0,
    )
    params.update(kw)
    return CircuitBreaker(BreakerConfig(**params), clock=clock), clock  # type: ignore[arg-type]


def test_timeout_is_the_maximum_until_latencies_are_known() -> None:
    b, _ = make()
    assert b.timeout_s() == 5.0
    assert b.p99_s() is None


def test_timeout_is_p99_times_multiplier_clamped() -> None:
    b, _ = make()
    for i in range(1, 101):  # 1 ms .. 100 ms
        b.record_success(i / 1000)
    assert b.p99_s() == pytest.approx(0.099)  # nearest rank: 99th of 100
    assert b.timeout_s() == pytest.approx(0.099 * 1.5)
    fast, _ = make()
    for _ in range(50):
        fast.record_success(0.0001)
    assert fast.timeout_s() == 0.005  # lower clamp
    slow, _ = make(max_timeout_s=0.5)
    slow.record_success(2.0)
    assert slow.timeout_s() == 0.5  # upper clamp


def test_window_keeps_only_recent_latencies() -> None:
    b, _ = make(window_size=10)
    for _ in range(10):
        b.record_success(1.0)
    for _ in range(10):
        b.record_success(0.01)
    assert b.p99_s() == pytest.approx(0.01)


def test_p99_follows_a_sliding_window_with_repeats_exactly() -> None:
    """The window keeps a sorted copy instead of sorting per call: after every
    record (successes and timeouts, many equal values, the window rolling
    over), the p99 equals the nearest-rank p99 of the last ``window_size``."""
    rng = random.Random(7)
    for size in (1, 3, 10, 100):
        b, _ = make(window_size=size)
        recent: list[float] = []
        for i in range(600):
            value = rng.choice([0.001, 0.002, 0.5, rng.random()])
            if i % 7 == 0:
                b.record_failure(timed_out_after_s=value)
            else:
                b.record_success(value)
            recent = [*recent, value][-size:]
            ordered = sorted(recent)
            assert b.p99_s() == ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def test_timeouts_enter_the_window_so_the_timeout_learns_upward() -> None:
    b, _ = make(failure_threshold=1000)
    for _ in range(100):
        b.record_success(0.002)
    t = b.timeout_s()
    assert t == 0.005
    seen = [t]
    for _ in range(12):
        b.record_failure(timed_out_after_s=b.timeout_s())
        seen.append(b.timeout_s())
    assert seen == sorted(seen) and seen[-1] > 0.05  # grows by the multiplier
    assert b.timeout_s() <= 5.0
    # fast failures (refused connections) do not shrink or grow it
    before = b.timeout_s()
    b.record_failure()
    assert b.timeout_s() == before


def test_opens_after_consecutive_failures_only() -> None:
    b, _ = make(failure_threshold=3)
    b.record_failure()
    b.record_failure()
    b.record_success(0.01)  # resets the count
    b.record_failure()
    b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open"
    assert b.times_opened == 1
    assert not b.allow()


def test_half_open_grants_one_probe_and_closes_on_success() -> None:
    b, clock = make(failure_threshold=1, recovery_s=5.0)
    b.record_failure()
    assert b.retry_after_s() == pytest.approx(5.0)
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()  # the probe
    assert b.state == "half_open"
    assert not b.allow()  # only one
    b.record_success(0.01)
    assert b.state == "closed" and b.allow()
    assert b.recovery_s == 5.0


def test_failed_probe_doubles_the_recovery_wait_up_to_the_cap() -> None:
    b, clock = make(failure_threshold=1, recovery_s=5.0, max_recovery_s=30.0)
    b.record_failure()
    waits = []
    for _ in range(5):
        waits.append(b.recovery_s)
        clock.now += b.recovery_s - 0.01
        assert not b.allow()
        clock.now += 0.02
        assert b.allow()
        b.record_failure()
        assert b.state == "open"
    assert waits == [5.0, 10.0, 20.0, 30.0, 30.0]
    clock.now += b.recovery_s + 0.01
    assert b.allow()
    b.record_success(0.01)
    assert b.state == "closed" and b.recovery_s == 5.0  # back to the start


def test_a_probe_that_never_reports_is_replaced() -> None:
    b, clock = make(failure_threshold=1, recovery_s=1.0, max_timeout_s=2.0)
    b.record_failure()
    clock.now += 1.5
    assert b.allow()
    assert not b.allow()
    clock.now += 3.5  # > max_timeout + 1 s
    assert b.allow()


def test_snapshot_and_config_validation() -> None:
    b, _ = make()
    snap = b.snapshot()
    assert snap["state"] == "closed" and snap["timeout_s"] == 5.0
    for bad in (
        {"window_size": 0},
        {"timeout_multiplier": 0.5},
        {"min_timeout_s": 0},
        {"max_timeout_s": 0.001},
        {"failure_threshold": 0},
        {"recovery_s": 0},
        {"max_recovery_s": 1.0},
    ):
        with pytest.raises(ValueError):
            make(**bad)


def test_config_from_settings() -> None:
    s = load_settings(
        env={
            "QR_GRPC_TIMEOUT_MS": "800",
            "QR_CB_MIN_TIMEOUT_MS": "20",
            "QR_CB_WINDOW_SIZE": "7",
            "QR_CB_FAILURE_THRESHOLD": "4",
            "QR_CB_RECOVERY_S": "2",
            "QR_CB_MAX_RECOVERY_S": "9",
            "QR_CB_TIMEOUT_MULTIPLIER": "2",
        },
        env_file=None,
    )
    c = BreakerConfig.from_settings(s)
    assert c == BreakerConfig(
        window_size=7,
        timeout_multiplier=2.0,
        min_timeout_s=0.02,
        max_timeout_s=0.8,
        failure_threshold=4,
        recovery_s=2.0,
        max_recovery_s=9.0,
    )
    defaults = BreakerConfig.from_settings(load_settings(env={}, env_file=None))
    assert defaults == BreakerConfig()  # documented defaults agree with the settings
