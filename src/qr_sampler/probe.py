"""``qr-sampler probe ADDRESS``: can this entropy server be trusted for an experiment?

It connects with the sampler's own gRPC client (:class:`QuantumGrpcSource`, so
method paths, API key, TLS and unix sockets behave exactly as in production),
asks for ``--requests`` blocks of ``--bytes`` bytes in each transport mode,
and reports per mode the latency percentiles and the throughput. Then it tests
every byte received:

* **byte frequency** — chi-square of the 256 byte-value counts (df = 255);
* **bit frequency** — the monobit z of the share of one bits;
* **runs** — the number of runs of equal bits (NIST SP 800-22 §2.3);
* **KS of u** — the bytes cut into tokens of ``sample_count`` bytes, amplified
  exactly as the sampler does (z-score of the mean → u), u tested against
  U(0, 1) with Kolmogorov-Smirnov;
* **SP 800-90B health tests** — the repetition count and adaptive proportion
  tests run continuously over the replies, as the sampler runs them;
* **stuck output** — every byte the same value.

A statistical check fails when its p-value is below ``--alpha`` (default
1e-4 per check). Exit status: 0 all checks passed; 1 a check failed; 2 bad
arguments; 3 the server is unreachable or refused or broke a request. The
reason is printed on the last line (and in ``--json``).

Defaults (method paths, API-key header, TLS files, ``sample_count`` and the
amplifier's population mean / standard deviation) come from the ``QR_*``
settings, so ``qr-sampler probe`` checks the source the way the sampler is
configured to use it; every flag overrides its setting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any, TextIO

import numpy as np
import numpy.typing as npt

from qr_sampler.config import QRSettings, load_settings
from qr_sampler.errors import ConfigError, EntropyError
from qr_sampler.sampling.amplify import amplify_means

MODES: tuple[str, ...] = ("unary", "server_streaming", "bidi_streaming")
DEFAULT_ALPHA = 1e-4

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

U8 = npt.NDArray[np.uint8]


# -- statistics (numpy; scipy where available) -----------------------------------------


def _normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def chi2_sf(x: float, df: int) -> float:
    """Upper tail of the chi-square distribution (scipy, else Wilson-Hilferty)."""
    try:
        from scipy import stats
    except ImportError:
        h = 2.0 / (9.0 * df)
        z = ((x / df) ** (1.0 / 3.0) - (1.0 - h)) / math.sqrt(h)
        return 0.5 * math.erfc(z / math.sqrt(2.0))
    return float(stats.chi2.sf(x, df))


def ks_uniform(u: npt.NDArray[np.float64]) -> tuple[float, float]:
    """KS statistic and p-value of ``u`` against U(0, 1) (scipy, else asymptotic)."""
    try:
        from scipy import stats
    except ImportError:
        n = u.size
        s = np.sort(u)
        i = np.arange(1, n + 1)
        d = float(max(np.max(i / n - s), np.max(s - (i - 1) / n)))
        t = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d  # Stephens' correction
        p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * t * t) for k in range(1, 101))
        return d, min(max(p, 0.0), 1.0)
    res = stats.kstest(u, "uniform")
    return float(res.statistic), float(res.pvalue)


@dataclass
class Check:
    """One check on the bytes."""

    name: str
    passed: bool
    detail: str
    p_value: float | None = None
    statistic: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def byte_frequency(data: U8, alpha: float) -> Check:
    counts = np.bincount(data, minlength=256).astype(np.float64)
    expected = data.size / 256.0
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    p = chi2_sf(chi2, 255)
    common = int(np.argmax(counts))
    detail = (
        f"chi2 = {chi2:.1f} (df 255); most common byte 0x{common:02x} "
        f"{counts[common] / expected:.3f}x its expected count"
    )
    return Check("byte frequency (chi-square)", p >= alpha, detail, p, chi2)


def bit_frequency(bits: U8, alpha: float) -> Check:
    n = bits.size
    ones = int(bits.sum(dtype=np.int64))
    z = (ones - n / 2.0) / math.sqrt(n / 4.0)
    p = _normal_two_sided(z)
    detail = f"share of one bits {ones / n:.6f}, z = {z:+.2f}"
    return Check("bit frequency (monobit)", p >= alpha, detail, p, z)


def runs(bits: U8, alpha: float) -> Check:
    n = bits.size
    pi = float(bits.mean())
    if abs(pi - 0.5) >= 2.0 / math.sqrt(n):
        detail = f"not applicable: share of one bits {pi:.4f} (the bit frequency fails)"
        return Check("runs (bits)", False, detail, 0.0, None)
    v = 1 + int(np.count_nonzero(bits[1:] != bits[:-1]))
    expected = 2.0 * n * pi * (1.0 - pi)
    z = (v - expected) / (2.0 * math.sqrt(2.0 * n) * pi * (1.0 - pi))
    p = math.erfc(abs(z))  # SP 800-22 2.3.4: erfc(|V - 2n pi (1-pi)| / (2 sqrt(2n) pi (1-pi)))
    detail = f"{v:,} runs in {n:,} bits ({v / expected:.4f}x expected)"
    return Check("runs (bits)", p >= alpha, detail, p, float(v))


def ks_of_u(
    data: U8, sample_count: int, mean: float, std: float, epsilon: float, alpha: float
) -> Check:
    tokens = data.size // sample_count
    name = "KS of u (amplified tokens)"
    if tokens < 20:
        detail = (
            f"skipped: {data.size:,} bytes make only {tokens} token(s) of {sample_count:,}; "
            "ask for more --requests or --bytes"
        )
        return Check(name, True, detail)
    block = data[: tokens * sample_count].reshape(tokens, sample_count)
    means = block.sum(axis=1, dtype=np.uint64).astype(np.float64) / sample_count
    amp = amplify_means(means, float(sample_count), mean, std, epsilon)
    d, p = ks_uniform(amp.u)
    stouffer = float(amp.z.sum() / math.sqrt(tokens))
    detail = (
        f"{tokens:,} tokens of {sample_count:,} bytes: D = {d:.4f}, mean u {amp.u.mean():.4f}, "
        f"Stouffer Z {stouffer:+.2f}"
    )
    return Check(name, p >= alpha, detail, p, d)


def stuck(data: U8) -> Check:
    values = np.unique(data[: 1 << 20])
    if values.size == 1 and bool(np.all(data == values[0])):
        detail = f"stuck: all {data.size:,} bytes are 0x{int(values[0]):02x}"
        return Check("stuck output", False, detail)
    return Check("stuck output", True, f"{np.unique(data).size} distinct byte values")


# -- probing -------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    method_path: str = ""
    requests: int = 0
    bytes: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error: str = ""
    error_kind: str = ""  # unreachable, unimplemented, auth, bad_reply, ...
    device_id: str = ""

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "method_path": self.method_path,
            "requests": self.requests,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "p50_ms": self.percentile(50),
            "p90_ms": self.percentile(90),
            "p99_ms": self.percentile(99),
            "max_ms": max(self.latencies_ms) if self.latencies_ms else None,
            "mb_per_s": self.bytes / self.seconds / 1e6 if self.seconds else None,
            "requests_per_s": self.requests / self.seconds if self.seconds else None,
            "device_id": self.device_id,
            "error": self.error,
            "error_kind": self.error_kind,
        }


class Progress:
    """A progress bar on a terminal, a few plain lines otherwise."""

    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self._last_plain = -1

    def update(self, label: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        if self.tty:
            width = 30
            filled = int(width * done / total)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{label:<17} [{bar}] {done}/{total}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
            return
        quarter = 4 * done // total
        if done == 0 or quarter > self._last_plain or done >= total:
            if done == 0:
                self._last_plain = 0
                self.stream.write(f"{label}: {total} requests\n")
            elif quarter > self._last_plain:
                self._last_plain = quarter
                self.stream.write(f"{label}: {done}/{total}\n")
            self.stream.flush()


def _classify(exc: EntropyError) -> str:
    text = str(exc)
    if "does not implement" in text or "UNIMPLEMENTED" in text:
        return "unimplemented"
    return exc.reason


def probe_mode(
    make_source: Callable[[str], Any],
    mode: str,
    n_requests: int,
    n_bytes: int,
    progress: Progress,
    on_reply: Callable[[bytes], None],
) -> ModeResult:
    """``n_requests`` sequential fetches of ``n_bytes`` in ``mode``; stops at the first error."""
    source = make_source(mode)
    result = ModeResult(mode=mode, method_path=str(getattr(source, "method_path", "")))
    progress.update(mode, 0, n_requests)
    start = time.perf_counter()
    try:
        for i in range(n_requests):
            t = time.perf_counter_ns()
            try:
                chunk = source.fetch([n_bytes])[0]
            except EntropyError as exc:
                result.error = str(exc)
                result.error_kind = _classify(exc)
                break
            result.latencies_ms.append((time.perf_counter_ns() - t) / 1e6)
            result.requests += 1
            result.bytes += len(chunk.data)
            result.device_id = chunk.device_id
            on_reply(chunk.data)
            progress.update(mode, i + 1, n_requests)
    finally:
        result.seconds = time.perf_counter() - start
        source.close()
    return result


@dataclass
class ProbeReport:
    address: str
    modes: list[ModeResult]
    checks: list[Check]
    status: int
    reason: str
    bytes_tested: int
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "status": self.status,
            "result": "pass" if self.status == EXIT_PASS else "fail",
            "reason": self.reason,
            "bytes_tested": self.bytes_tested,
            "modes": [m.summary() for m in self.modes],
            "checks": [c.to_dict() for c in self.checks],
            "settings": self.settings,
        }


def run_checks(
    data: U8,
    health_failures: list[str],
    sample_count: int,
    population_mean: float,
    population_std: float,
    epsilon: float,
    alpha: float,
    health_detail: str,
) -> list[Check]:
    """Every check on the received bytes, most telling first."""
    checks = [stuck(data)]
    for test in ("repetition count", "adaptive proportion"):
        found = [f for f in health_failures if test in f]
        more = f" ({len(found)} failure(s))" if len(found) > 1 else ""
        checks.append(
            Check(f"SP 800-90B {test}", not found, found[0] + more if found else health_detail)
        )
    checks.append(byte_frequency(data, alpha))
    bits = np.unpackbits(data[: 1 << 21])  # up to 16 Mbit
    checks.append(bit_frequency(bits, alpha))
    checks.append(runs(bits, alpha))
    checks.append(ks_of_u(data, sample_count, population_mean, population_std, epsilon, alpha))
    return checks


_UNREACHABLE_HINTS = (
    "failed to connect",
    "connection refused",
    "deadline",
    "resolve",
    "no such file",
)


def _looks_unreachable(error: str) -> bool:
    text = error.lower()
    return any(h in text for h in _UNREACHABLE_HINTS)


def _api_key(var: str | None, settings: QRSettings) -> str:
    if var is None:
        return settings.grpc_api_key.get_secret_value()
    if var not in os.environ:
        raise ConfigError(f"--api-key-env: environment variable {var} is not set")
    return os.environ[var]


def probe(args: argparse.Namespace, err: TextIO) -> ProbeReport:
    """Run the probe described by parsed ``args``; raises ConfigError on bad input."""
    from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker
    from qr_sampler.entropy.grpc_client import QuantumGrpcSource, check_address
    from qr_sampler.entropy.health import HealthMonitor

    settings = load_settings()
    try:
        address = check_address(args.address)
    except ConfigError:
        raise ConfigError(
            f"ADDRESS: must be 'host:port', '[v6]:port' or 'unix:///path'; got {args.address!r}"
        ) from None
    api_key = _api_key(args.api_key_env, settings)
    sample_count = args.sample_count or settings.sample_count
    mean = settings.population_mean if args.population_mean is None else args.population_mean
    std = settings.population_std if args.population_std is None else args.population_std
    eps = settings.uniform_clamp_epsilon
    modes = list(MODES) if args.mode == "all" else [args.mode]
    timeout_s = args.timeout_s

    def make_source(mode: str) -> QuantumGrpcSource:
        fixed = BreakerConfig(
            min_timeout_s=timeout_s,
            max_timeout_s=timeout_s,
            failure_threshold=1_000_000,  # the probe stops at the first error itself
        )
        return QuantumGrpcSource(
            address,
            mode=mode,  # type: ignore[arg-type]
            method_path=args.method_path or settings.grpc_method_path,
            stream_method_path=(
                settings.grpc_stream_method_path
                if args.stream_method_path is None
                else args.stream_method_path
            ),
            server_stream_method_path=(
                settings.grpc_server_stream_method_path
                if args.server_stream_method_path is None
                else args.server_stream_method_path
            ),
            max_bytes_per_request=max(args.bytes, 1),
            api_key=api_key,
            api_key_header=args.api_key_header or settings.grpc_api_key_header,
            use_tls=args.tls or settings.grpc_use_tls,
            tls_ca_file=args.tls_ca or settings.grpc_tls_ca_file,
            tls_cert_file=args.tls_cert or settings.grpc_tls_cert_file,
            tls_key_file=args.tls_key or settings.grpc_tls_key_file,
            tls_server_name=args.tls_server_name or "",
            breaker=CircuitBreaker(fixed),
            health=None,  # the probe runs the health tests itself, over every reply
        )

    monitor = HealthMonitor(args.min_entropy, args.alpha_log2)
    pieces: list[bytes] = []
    health_failures: list[str] = []

    def on_reply(data: bytes) -> None:
        pieces.append(data)
        failed = monitor.check(data)
        if failed is not None:
            health_failures.append(monitor.message(failed))

    progress = Progress(err, enabled=not args.quiet)
    results: list[ModeResult] = []
    for mode in modes:
        result = probe_mode(make_source, mode, args.requests, args.bytes, progress, on_reply)
        results.append(result)
        if result.error and result.requests == 0 and result.error_kind != "unimplemented":
            break  # unreachable / refused: fail fast, the other modes would fail alike
    settings_view = {
        "modes": modes,
        "bytes_per_request": args.bytes,
        "requests_per_mode": args.requests,
        "sample_count": sample_count,
        "population_mean": mean,
        "population_std": std,
        "alpha": args.alpha,
        "health_min_entropy": args.min_entropy,
        "health_alpha_log2": args.alpha_log2,
        "tls": bool(args.tls or args.tls_ca or settings.tls_enabled),
        "api_key": "set" if api_key else "none",
    }
    data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    status, reason = EXIT_PASS, ""
    hard = [r for r in results if r.error and r.error_kind != "unimplemented"]
    explicit = args.mode != "all"
    if hard:
        first = hard[0]
        status = EXIT_UNREACHABLE
        if first.requests == 0 and _looks_unreachable(first.error):
            what = f"unreachable: cannot connect to {address}"
        else:
            what = f"{first.mode} failed after {first.requests} request(s)"
        reason = f"{what}: {first.error}"
    elif explicit and results and results[0].error:
        status, reason = EXIT_UNREACHABLE, f"{results[0].mode}: {results[0].error}"
    elif data.size == 0:
        status = EXIT_UNREACHABLE
        reason = "no mode worked: " + "; ".join(f"{r.mode}: {r.error}" for r in results)
    checks: list[Check] = []
    if data.size:
        health_detail = (
            f"passed over {data.size:,} bytes (cutoffs for {args.min_entropy:g} bits/byte, "
            f"false alarm 2^-{args.alpha_log2})"
        )
        checks = run_checks(
            data, health_failures, sample_count, mean, std, eps, args.alpha, health_detail
        )
        failed = [c for c in checks if not c.passed]
        if failed and status == EXIT_PASS:
            status = EXIT_FAIL
            first_check = failed[0]
            reason = f"{first_check.name}: {first_check.detail}"
            if first_check.p_value is not None:
                reason += f" (p = {first_check.p_value:.2g} < alpha {args.alpha:g})"
            if len(failed) > 1:
                reason += "; also failed: " + ", ".join(c.name for c in failed[1:])
    return ProbeReport(address, results, checks, status, reason, int(data.size), settings_view)


# -- report ------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def format_report(report: ProbeReport) -> str:
    s = report.settings
    lines = [
        f"qr-sampler probe {report.address}  (TLS {'on' if s['tls'] else 'off'}, "
        f"API key {s['api_key']}; {s['requests_per_mode']} x {s['bytes_per_request']:,} bytes "
        "per mode)",
        "",
        f"{'mode':<17} {'requests':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'MB/s':>8} {'req/s':>8}",
    ]
    for m in report.modes:
        d = m.summary()
        if m.requests:
            lines.append(
                f"{m.mode:<17} {m.requests:>8} {_ms(d['p50_ms']):>8} {_ms(d['p90_ms']):>8} "
                f"{_ms(d['p99_ms']):>8} {_ms(d['max_ms']):>8} {_ms(d['mb_per_s']):>8} "
                f"{d['requests_per_s']:>8.1f}"
            )
        if m.error:
            note = "not offered by the server" if m.error_kind == "unimplemented" else "ERROR"
            lines.append(f"{'' if m.requests else m.mode:<17} {note}: {m.error}")
    devices = sorted({m.device_id for m in report.modes if m.device_id})
    if report.checks:
        lines += [
            "",
            f"bytes tested: {report.bytes_tested:,}"
            + (f"; device {', '.join(devices)}" if devices else ""),
            f"{'check':<32} {'p-value':>9}  result  detail",
        ]
        for c in report.checks:
            p = "-" if c.p_value is None else f"{c.p_value:.3g}"
            lines.append(f"{c.name:<32} {p:>9}  {'pass' if c.passed else 'FAIL':<6}  {c.detail}")
    lines.append("")
    if report.status == EXIT_PASS:
        lines.append("RESULT: PASS - every check passed")
    else:
        lines.append(f"RESULT: FAIL - {report.reason}")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------


def _positive(name: str, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= hi:
            raise argparse.ArgumentTypeError(f"{name}: must be an integer from 1 to {hi:,}")
        return value

    return parse


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"--alpha: must be a number > 0 and < 1; got {text!r}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``probe`` subcommand."""
    p = subparsers.add_parser(
        "probe",
        help="measure an entropy server's latency and test its bytes",
        description="Measure a gRPC entropy server's latency and throughput per transport "
        "mode and test the bytes it serves (frequency, runs, KS of u, SP 800-90B health "
        "tests). Exit status 0 pass, 1 a check failed, 2 bad arguments, 3 unreachable.",
    )
    p.add_argument("address", help="server address: host:port, [v6]:port or unix:///path")
    p.add_argument(
        "--mode",
        choices=(*MODES, "all"),
        default="all",
        help="transport mode to probe (default: all; modes the server lacks are noted)",
    )
    p.add_argument(
        "--bytes",
        type=_positive("--bytes", 4_000_000),
        default=20480,
        help="bytes per request (default 20480)",
    )
    p.add_argument(
        "--requests",
        type=_positive("--requests", 1_000_000),
        default=200,
        help="requests per mode (default 200)",
    )
    p.add_argument(
        "--api-key-env", metavar="VAR", help="read the API key from this environment variable"
    )
    p.add_argument(
        "--api-key-header", help="metadata header of the API key (QR_GRPC_API_KEY_HEADER)"
    )
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CA bundle")
    p.add_argument("--tls-ca", metavar="FILE", help="CA bundle to verify the server (implies TLS)")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="FILE", help="client private key (mutual TLS)")
    p.add_argument("--tls-server-name", help="name to verify in the server certificate")
    p.add_argument("--method-path", help="unary method path (QR_GRPC_METHOD_PATH)")
    p.add_argument("--stream-method-path", help="bidi streaming method path ('' = none)")
    p.add_argument("--server-stream-method-path", help="server-streaming method path ('' = none)")
    p.add_argument(
        "--timeout-s", type=float, default=5.0, help="deadline per request in seconds (default 5)"
    )
    p.add_argument(
        "--alpha",
        type=_alpha,
        default=DEFAULT_ALPHA,
        help=f"a check fails when its p-value is below this (default {DEFAULT_ALPHA:g})",
    )
    p.add_argument(
        "--sample-count",
        type=_positive("--sample-count", 1_048_576),
        help="bytes per token for the KS of u (default QR_SAMPLE_COUNT)",
    )
    p.add_argument("--population-mean", type=float, help="amplifier null mean (QR_POPULATION_MEAN)")
    p.add_argument("--population-std", type=float, help="amplifier null std (QR_POPULATION_STD)")
    p.add_argument(
        "--min-entropy",
        type=float,
        default=6.0,
        help="assumed min-entropy per byte for the health-test cutoffs (default 6)",
    )
    p.add_argument(
        "--alpha-log2",
        type=int,
        default=30,
        help="health-test false-alarm probability 2^-N (default 30)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out_stream: Any = out or sys.stdout
    err_stream: Any = err or sys.stderr
    if not 0 < args.timeout_s <= 600:
        print("qr-sampler probe: error: --timeout-s: must be > 0 and <= 600", file=err_stream)
        return EXIT_USAGE
    try:
        report = probe(args, err_stream)
    except (ConfigError, ValueError) as exc:
        print(f"qr-sampler probe: error: {exc}", file=err_stream)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.to_dict(), indent=2), file=out_stream)
    else:
        print(format_report(report), file=out_stream)
    if report.status != EXIT_PASS:
        print(f"qr-sampler probe: {report.reason}", file=err_stream)
    return report.status


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``probe`` alone (``python -m qr_sampler.probe ADDRESS``)."""
    parser = argparse.ArgumentParser(prog="qr-sampler")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["probe", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
