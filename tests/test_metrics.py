"""Prometheus metrics: scraped over real HTTP on loopback while the real
pipeline samples; the counters must match the records."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from typing import ClassVar

import pytest
from support_tools import DownSource, mock_settings, run_pipeline

from qr_sampler.entropy.base import EntropyChunk, EntropySource
from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker
from qr_sampler.entropy.fallback import FallbackSource
from qr_sampler.entropy.health import HealthTestFailure
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.errors import ConfigError
from qr_sampler.metrics import (
    MetricsRecorder,
    MetricsRegistry,
    MetricsServer,
    parse_exposition,
    start_metrics_server,
)
from qr_sampler.records import RecordSink, TokenRecord


@pytest.fixture
def served() -> Iterator[tuple[MetricsRecorder, MetricsServer]]:
    recorder = MetricsRecorder(config_hash="abc")
    server = start_metrics_server(0, recorder.registry, host="127.0.0.1")
    try:
        yield recorder, server
    finally:
        server.close()


def scrape(server: MetricsServer) -> tuple[str, dict[str, float]]:
    with urllib.request.urlopen(server.url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode("utf-8")
    check_exposition(text)
    return text, parse_exposition(text)


_SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\["\\n])*",?)*\})? '
    r"(-?[0-9.e+-]+|NaN|[+-]Inf)$"
)


def check_exposition(text: str) -> None:
    """Every line is HELP, TYPE or a well-formed sample; HELP/TYPE precede samples."""
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram")
            typed.add(name)
            continue
        assert _SAMPLE.match(line), f"malformed exposition line: {line!r}"
        base = re.sub(r"(_bucket|_sum|_count)$", "", line.split("{")[0].split(" ")[0])
        assert base in typed or line.split("{")[0].split(" ")[0] in typed, line


class HealthFailingSource(EntropySource):
    """A primary whose bytes always fail the repetition count test (raises the
    health module's real HealthTestFailure), served by the real fallback."""

    name: ClassVar[str] = "stuck"

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        raise HealthTestFailure("rct", "repetition count test failed: a byte repeated")


def test_counters_match_the_records(served: tuple[MetricsRecorder, MetricsServer]) -> None:
    recorder, server = served
    settings = mock_settings(sample_count=1000)
    records: list[TokenRecord] = []
    records += run_pipeline(settings, steps=30, labels=("a", "b"), listeners=[recorder])
    down = FallbackSource(DownSource(), SystemEntropySource())
    records += run_pipeline(
        settings, steps=7, labels=("a", "b", "c"), listeners=[recorder], source=down
    )
    stuck = FallbackSource(HealthFailingSource(), SystemEntropySource())
    records += run_pipeline(settings, steps=5, labels=("a",), listeners=[recorder], source=stuck)
    _, m = scrape(server)

    by_source = Tally((r.entropy_source, r.fallback) for r in records)
    assert m['qr_sampler_tokens_sampled_total{source="mock_uniform",fallback="false"}'] == 60
    for (source, fb), n in by_source.items():
        key = f'qr_sampler_tokens_sampled_total{{source="{source}",fallback="{str(fb).lower()}"}}'
        assert m[key] == n
    assert m['qr_sampler_entropy_bytes_total{source="mock_uniform"}'] == 60 * 1000
    assert m['qr_sampler_entropy_bytes_total{source="system"}'] == sum(
        r.byte_count for r in records if r.entropy_source == "system"
    )
    assert m['qr_sampler_fallback_tokens_total{reason="unavailable"}'] == 21
    assert m['qr_sampler_fallback_tokens_total{reason="health_test"}'] == 5
    assert m['qr_sampler_health_test_failures_total{test="rct"}'] == 5  # one per step
    assert m["qr_sampler_steps_total"] == 42
    assert m["qr_sampler_fetch_latency_seconds_count"] == 42
    assert m['qr_sampler_fetch_latency_seconds_bucket{le="+Inf"}'] == 42
    step_fetch = {r.step: r.fetch_latency_ns for r in records}  # steps restart per pipeline
    assert m["qr_sampler_fetch_latency_seconds_sum"] > 0
    assert m["qr_sampler_fetch_latency_seconds_sum"] >= max(step_fetch.values()) / 1e9
    assert m["qr_sampler_sampling_latency_seconds_count"] == 42
    assert m["qr_sampler_tokens_failed_total"] == 0
    assert m['qr_sampler_info{version="0.1.0",config_hash="abc"}'] == 1


def test_histogram_buckets_are_cumulative() -> None:
    reg = MetricsRegistry()
    h = reg.histogram("lat_seconds", "test", buckets=(0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.005, 0.05, 0.5, 5.0):
        h.observe(v)
    m = parse_exposition(reg.render())
    assert m['qr_sampler_lat_seconds_bucket{le="0.001"}'] == 2  # le is inclusive
    assert m['qr_sampler_lat_seconds_bucket{le="0.01"}'] == 3
    assert m['qr_sampler_lat_seconds_bucket{le="0.1"}'] == 4
    assert m['qr_sampler_lat_seconds_bucket{le="+Inf"}'] == 6
    assert m["qr_sampler_lat_seconds_count"] == 6
    assert m["qr_sampler_lat_seconds_sum"] == pytest.approx(5.5565)


def test_failed_tokens_in_error_mode(served: tuple[MetricsRecorder, MetricsServer]) -> None:
    recorder, server = served
    settings = mock_settings(fallback_mode="error")
    run_pipeline(
        settings,
        steps=3,
        labels=("a", "b"),
        listeners=[recorder],
        source=FallbackSource(DownSource(), None),
    )
    _, m = scrape(server)
    assert m["qr_sampler_tokens_failed_total"] == 6
    assert not any(k.startswith("qr_sampler_tokens_sampled_total{") for k in m)


def test_breaker_state_pushed_and_watched(served: tuple[MetricsRecorder, MetricsServer]) -> None:
    recorder, server = served
    recorder.set_breaker_state("open")
    recorder.set_breaker_state("open")
    _, m = scrape(server)
    assert m["qr_sampler_breaker_state"] == 2 and m["qr_sampler_breaker_opened_total"] == 1
    recorder.set_breaker_state("half-open")
    assert parse_exposition(recorder.render())["qr_sampler_breaker_state"] == 1
    with pytest.raises(ConfigError, match="closed, half_open, open; got 'ajar'"):
        recorder.set_breaker_state("ajar")

    # the real circuit breaker, found through the fallback wrapper, read at scrape time
    now = [0.0]
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=2), clock=lambda: now[0])

    class WithBreaker(DownSource):
        def __init__(self) -> None:
            self.breaker = breaker

    watcher = MetricsRecorder()
    watcher.watch_source(FallbackSource(WithBreaker(), SystemEntropySource()))
    assert parse_exposition(watcher.render())["qr_sampler_breaker_state"] == 0
    breaker.record_failure()
    breaker.record_failure()
    m = parse_exposition(watcher.render())
    assert m["qr_sampler_breaker_state"] == 2 and m["qr_sampler_breaker_opened_total"] == 1


def test_record_sink_counts_exported(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    sink = RecordSink(tmp_path / "r.jsonl")
    recorder = MetricsRecorder()
    recorder.watch_sink(sink)
    run_pipeline(mock_settings(), steps=4, labels=("a", "b"), sink=sink)
    m = parse_exposition(recorder.render())
    assert m["qr_sampler_records_written_total"] == 8
    assert m["qr_sampler_records_dropped_total"] == 0


def test_label_values_are_escaped() -> None:
    recorder = MetricsRecorder()
    rec = run_pipeline(mock_settings(sample_count=64), steps=1, labels=("a",))[0]
    from dataclasses import replace

    weird = replace(rec, entropy_source='we"ird\\src\nx', fallback=True, fallback_reason="odd")
    recorder([weird])
    text = recorder.render()
    check_exposition(text)
    assert 'source="we\\"ird\\\\src\\nx"' in text


def test_http_details_and_port_errors(served: tuple[MetricsRecorder, MetricsServer]) -> None:
    _, server = served
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nope", timeout=10)
    assert info.value.code == 404
    with pytest.raises(
        ConfigError, match=f"QR_METRICS_PORT: cannot serve metrics on 127.0.0.1:{server.port}"
    ):
        start_metrics_server(server.port, MetricsRegistry(), host="127.0.0.1")
    with pytest.raises(ConfigError, match="QR_METRICS_PORT: must be an integer from 0 to 65535"):
        start_metrics_server(70000, MetricsRegistry(), host="127.0.0.1")


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.fail("this Python has no IPv6 support")
    try:
        server = start_metrics_server(0, MetricsRecorder().registry, host="::1")
    except ConfigError as exc:
        pytest.fail(f"::1 not bindable on this machine: {exc}")
    with server:
        assert server.url.startswith("http://[::1]:")
        _, m = scrape(server)
        assert m["qr_sampler_steps_total"] == 0


def test_secrets_never_reach_the_metrics() -> None:
    settings = mock_settings(grpc_api_key="sekrit-key-123")
    recorder = MetricsRecorder(config_hash=settings.config_hash())
    run_pipeline(settings, steps=2, labels=("a",), listeners=[recorder])
    assert "sekrit" not in recorder.render()
