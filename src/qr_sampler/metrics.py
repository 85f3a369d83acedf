"""Prometheus metrics for the process that samples, served over HTTP with the stdlib.

No client library: a small registry renders the Prometheus text exposition
format (version 0.0.4) and :func:`start_metrics_server` serves it on
``/metrics`` from a daemon thread.

Wiring (the vLLM adapter does this once, on the rank that draws entropy;
see :mod:`qr_sampler.vllm.metrics_hook`)::

    registry = MetricsRegistry()
    server = start_metrics_server(settings.metrics_port, registry)
    recorder = MetricsRecorder(registry, config_hash=settings.config_hash())
    pipeline = SamplingPipeline(settings, listeners=[recorder])
    recorder.watch_pipeline(pipeline)   # breaker state and record-sink counts per scrape
    # or push the breaker state yourself: recorder.set_breaker_state("open")

Metric families (all prefixed ``qr_sampler_``):

=====================================  =========  ==============================================
name                                   type       meaning
=====================================  =========  ==============================================
tokens_sampled_total{source,fallback}  counter    tokens sampled (one per record)
tokens_failed_total                    counter    tokens with no entropy at all (error mode, EOS)
entropy_bytes_total{source}            counter    entropy bytes consumed
fallback_tokens_total{reason}          counter    tokens served by the fallback source
health_test_failures_total{test}       counter    steps whose entropy failed a health test
                                                  (test: rct, apt or unspecified)
steps_total                            counter    sampling steps
fetch_latency_seconds                  histogram  entropy fetch time per step
sampling_latency_seconds               histogram  whole sampling time per step
breaker_state                          gauge      circuit breaker: 0 closed, 1 half-open, 2 open
breaker_opened_total                   counter    times the circuit breaker opened
records_written_total                  counter    provenance records written (``watch_sink``)
records_dropped_total                  counter    provenance records dropped (``watch_sink``)
info{version,config_hash}              gauge      always 1; identifies the build and settings
=====================================  =========  ==============================================
"""

from __future__ import annotations

import bisect
import logging
import math
import socket
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, ClassVar

from qr_sampler.errors import ConfigError

if TYPE_CHECKING:
    from qr_sampler.records import RecordSink, TokenRecord

logger = logging.getLogger(__name__)

PREFIX = "qr_sampler_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: latency buckets (seconds): 100 µs .. 10 s
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: circuit-breaker states and their gauge values
BREAKER_STATES: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}

LabelValues = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    """A metric family: a name, help text, label names, one value per label set."""

    kind: ClassVar[str] = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = PREFIX + name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Sequence[str]) -> LabelValues:
        if len(labels) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: expected labels {self.labelnames}, got {len(labels)} value(s)"
            )
        return tuple(str(v) for v in labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind: ClassVar[str] = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, labels: Sequence[str] = ()) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (got {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def sync(self, total: float, labels: Sequence[str] = ()) -> None:
        """Raise the count to ``total`` (for counts kept elsewhere; never lowers it)."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = max(self._values.get(key, 0.0), float(total))

    def value(self, labels: Sequence[str] = ()) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def values(self) -> dict[LabelValues, float]:
        with self._lock:
            return dict(self._values)

    def render(self) -> list[str]:
        lines = self.header()
        for key, v in sorted(self.values().items()):
            lines.append(f"{self.name}{_labels(self.labelnames, key)} {_format_value(v)}")
        return lines


class Gauge(Counter):
    """A value that goes up and down per label set."""

    kind: ClassVar[str] = "gauge"

    def set(self, value: float, labels: Sequence[str] = ()) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, labels: Sequence[str] = ()) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Histogram(_Metric):
    """Observations counted into cumulative buckets (no labels)."""

    kind: ClassVar[str] = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{self.name}: buckets must be distinct and non-empty")
        self.bounds = tuple(b for b in bounds if not math.isinf(b))
        self._counts = [0] * (len(self.bounds) + 1)  # last = above every bound
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # bucket "le" is inclusive
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    def snapshot(self) -> tuple[list[int], float, int]:
        """(non-cumulative counts per bucket incl. +Inf, sum, count)."""
        with self._lock:
            return list(self._counts), self._sum, self._count

    def render(self) -> list[str]:
        counts, total, n = self.snapshot()
        lines = self.header()
        running = 0
        for bound, c in zip((*self.bounds, math.inf), counts, strict=True):
            running += c
            le = "+Inf" if math.isinf(bound) else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines.append(f"{self.name}_sum {_format_value(total)}")
        lines.append(f"{self.name}_count {n}")
        return lines


class MetricsRegistry:
    """Metric families in registration order, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()
        self._collectors: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> None:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, labelnames)
        self._add(metric)
        return metric

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help_text, labelnames)
        self._add(metric)
        return metric

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        metric = Histogram(name, help_text, buckets)
        self._add(metric)
        return metric

    def add_collector(self, collect: Callable[[], None]) -> None:
        """Run ``collect`` before every render (to refresh gauges from elsewhere)."""
        self._collectors.append(collect)

    def get(self, name: str) -> _Metric:
        """A registered family by name (with or without the ``qr_sampler_`` prefix)."""
        full = name if name.startswith(PREFIX) else PREFIX + name
        return self._metrics[full]

    def render(self) -> str:
        """The whole registry in the Prometheus text format."""
        for collect in list(self._collectors):
            try:
                collect()
            except Exception:  # a broken collector must not break scraping
                logger.exception("metrics collector failed")
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


def short_reason(reason: str) -> str:
    """The machine-readable part of a fallback reason ('unavailable: ...' -> 'unavailable')."""
    head = reason.split(":", 1)[0].strip()
    return head or "unknown"


class MetricsRecorder:
    """Feeds a registry from the pipeline (as a listener) and from the gRPC client.

    Call it with each step's list of :class:`~qr_sampler.records.TokenRecord`
    (``SamplingPipeline(listeners=[recorder])``); call :meth:`set_breaker_state`
    when the circuit breaker changes state. Thread-safe.
    """

    def __init__(self, registry: MetricsRegistry | None = None, *, config_hash: str = "") -> None:
        self.registry = registry if registry is not None else MetricsRegistry()
        r = self.registry
        from qr_sampler import __version__

        self.info = r.gauge(
            "info", "Build and configuration of this process.", ("version", "config_hash")
        )
        self.info.set(1, labels=(__version__, config_hash))
        self._lock = threading.Lock()
        self.tokens = r.counter(
            "tokens_sampled_total",
            "Tokens sampled, by entropy source and whether a fallback served them.",
            ("source", "fallback"),
        )
        self.tokens_failed = r.counter(
            "tokens_failed_total", "Tokens that got no entropy at all (error mode; EOS forced)."
        )
        self.entropy_bytes = r.counter(
            "entropy_bytes_total", "Entropy bytes consumed, by source.", ("source",)
        )
        self.fallback_tokens = r.counter(
            "fallback_tokens_total",
            "Tokens served by the fallback source, by the primary's failure reason.",
            ("reason",),
        )
        self.health_failures = r.counter(
            "health_test_failures_total",
            "Sampling steps whose entropy failed a continuous health test, by test.",
            ("test",),
        )
        self.steps = r.counter("steps_total", "Sampling steps.")
        self.fetch_latency = r.histogram(
            "fetch_latency_seconds", "Entropy fetch time per sampling step."
        )
        self.sampling_latency = r.histogram(
            "sampling_latency_seconds", "Whole sampling time per step (fetch included)."
        )
        self.breaker_state = r.gauge(
            "breaker_state", "Entropy circuit breaker state: 0 closed, 1 half-open, 2 open."
        )
        self.breaker_opened = r.counter("breaker_opened_total", "Times the circuit breaker opened.")
        self._breaker_key = "closed"
        self.records_written = r.counter("records_written_total", "Provenance records written.")
        self.records_dropped = r.counter(
            "records_dropped_total", "Provenance records dropped (disk too slow or failing)."
        )

    def watch_sink(self, sink: RecordSink) -> None:
        """Export the record sink's written / dropped counts on every scrape."""

        def collect() -> None:
            stats = sink.stats()
            self.records_written.sync(stats["written"])
            self.records_dropped.sync(stats["dropped"])

        self.registry.add_collector(collect)

    def __call__(self, records: Sequence[TokenRecord]) -> None:
        """Account for one sampling step's records (the pipeline listener hook)."""
        if not records:
            return
        self.steps.inc()
        first = records[0]
        self.fetch_latency.observe(first.fetch_latency_ns / 1e9)
        self.sampling_latency.observe(first.sampling_latency_ns / 1e9)
        health_failed: set[str] = set()
        for rec in records:
            if rec.failed:
                self.tokens_failed.inc()
            else:
                self.tokens.inc(labels=(rec.entropy_source, "true" if rec.fallback else "false"))
                self.entropy_bytes.inc(rec.byte_count, labels=(rec.entropy_source,))
            reason = short_reason(rec.fallback_reason) if rec.fallback_reason else ""
            if rec.fallback:
                self.fallback_tokens.inc(labels=(reason,))
            if rec.health.startswith("failed:"):
                health_failed.add(rec.health.split(":", 1)[1] or "unspecified")
            elif reason == "health_test":
                health_failed.add(_health_test_name(rec.fallback_reason))
        for test in health_failed:
            self.health_failures.inc(labels=(test,))

    def set_breaker_state(self, state: str) -> None:
        """Report the circuit breaker's state: 'closed', 'half_open' or 'open'."""
        key = state.replace("-", "_").lower()
        if key not in BREAKER_STATES:
            raise ConfigError(
                f"breaker state: must be one of {', '.join(BREAKER_STATES)}; got {state!r}"
            )
        self.breaker_state.set(BREAKER_STATES[key])
        with self._lock:
            opened = key == "open" and self._breaker_key != "open"
            self._breaker_key = key
        if opened:
            self.breaker_opened.inc()

    def watch_source(self, source: object) -> None:
        """Export the circuit breaker of ``source`` on every scrape.

        ``source`` is the pipeline's source; wrappers are searched through their
        ``primary`` attribute for an object with a ``breaker`` (state and
        ``times_opened``). Does nothing when there is no breaker.
        """
        breaker = _find_breaker(source)
        if breaker is None:
            return

        def collect() -> None:
            state = str(getattr(breaker, "state", "closed"))
            self.breaker_state.set(BREAKER_STATES.get(state, 0))
            self.breaker_opened.sync(float(getattr(breaker, "times_opened", 0)))

        self.registry.add_collector(collect)

    def watch_pipeline(self, pipeline: object) -> None:
        """:meth:`watch_source` and :meth:`watch_sink` for a SamplingPipeline."""
        self.watch_source(getattr(pipeline, "source", None))
        sink = getattr(pipeline, "sink", None)
        if sink is not None:
            self.watch_sink(sink)

    def render(self) -> str:
        return self.registry.render()


_HEALTH_TESTS = {"repetition count": "rct", "adaptive proportion": "apt"}


def _health_test_name(reason: str) -> str:
    text = reason.lower().replace("_", " ").replace("-", " ")
    for phrase, name in _HEALTH_TESTS.items():
        if phrase in text:
            return name
    return "unspecified"


def _find_breaker(source: object) -> object | None:
    for _ in range(8):  # wrappers nest shallowly
        if source is None:
            return None
        breaker: object | None = getattr(source, "breaker", None)
        if breaker is not None and hasattr(breaker, "state"):
            return breaker
        source = getattr(source, "primary", None)
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            self._reply(404, b"not found; metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = self.server.registry.render().encode("utf-8")
        except Exception:
            logger.exception("rendering metrics failed")
            self._reply(500, b"metrics rendering failed\n", "text/plain; charset=utf-8")
            return
        self._reply(200, body, CONTENT_TYPE)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("metrics http: " + format, *args)


class _MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: MetricsRegistry) -> None:
        self.registry = registry
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


class MetricsServer:
    """A running metrics endpoint; :meth:`close` stops it."""

    def __init__(self, httpd: _MetricsHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    port: int, registry: MetricsRegistry, host: str = "0.0.0.0"
) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (see ``.port``). Raises :class:`ConfigError`
    naming ``QR_METRICS_PORT`` when the port cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"QR_METRICS_PORT: must be an integer from 0 to 65535; got {port}")
    try:
        httpd = _MetricsHTTPServer((host, port), registry)
    except OSError as exc:
        raise ConfigError(
            f"QR_METRICS_PORT: cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="qr-sampler-metrics"
    )
    thread.daemon = True
    thread.start()
    server = MetricsServer(httpd, thread)
    logger.info("qr-sampler metrics at %s", server.url)
    return server


def parse_exposition(text: str) -> dict[str, float]:
    """Samples of a text exposition as ``{'name{labels}': value}`` (tests, probes)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
