"""Target 3: entropy transport, 20,480 bytes per token, on loopback.

For each transport (TCP on 127.0.0.1, a unix socket) and mode (unary, server
streaming, bidi streaming): p50 / p99 latency of one token's fetch through the
product -- ``qr-sampler serve --source urandom`` in its own process (default
settings, health tests included) and :class:`QuantumGrpcSource` -- against a bare
gRPC echo of the same payload through the same stack
(:mod:`benchmarks.echo_server` and a raw-bytes client). Target: product / bare
<= 1.3. Then one step's fetch for 64 rows (64 x 20,480 bytes) over the unix
socket: target p50 <= 5 ms.

Both servers run in their own processes; calls are interleaved so both see the
same machine load. Run: ``python -m benchmarks.bench_transport``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import machine, verdict
from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker
from qr_sampler.entropy.grpc_client import QuantumGrpcSource
from qr_sampler.entropy.wire import encode_varint
from qr_sampler.proto import GET_ENTROPY, SERVER_STREAM_ENTROPY, STREAM_ENTROPY

TOKEN_BYTES = 20_480
MODES = ("unary", "server_streaming", "bidi_streaming")
REPO = Path(__file__).resolve().parents[1]


class BareClient:
    """Raw-bytes gRPC client of the echo server: no decoding beyond the header."""

    def __init__(self, address: str, mode: str) -> None:
        self.mode = mode
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 8 << 20)]
        )
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        if mode == "unary":
            self._unary = self.channel.unary_unary(GET_ENTROPY)
        elif mode == "server_streaming":
            self._stream = self.channel.unary_stream(SERVER_STREAM_ENTROPY)
        else:
            bidi = self.channel.stream_stream(STREAM_ENTROPY)
            self._responses: Iterator[bytes] = bidi(iter(self._requests.get, None))

    def fetch(self, n: int) -> bytes:
        request = b"\x08" + encode_varint(n)
        if self.mode == "unary":
            reply: bytes = self._unary(request, timeout=10)
        elif self.mode == "server_streaming":
            reply = b"".join(self._stream(request, timeout=10))
        else:
            self._requests.put(request)
            reply = next(self._responses)
        data = reply[1 + len(encode_varint(n)) :]
        if len(data) != n:
            raise RuntimeError(f"echo returned {len(data)} bytes, wanted {n}")
        return data

    def close(self) -> None:
        self._requests.put(None)
        self.channel.close()


@contextlib.contextmanager
def process(cmd: list[str], ready: Callable[[], bool], log: Path) -> Iterator[None]:
    """Run ``cmd`` (own session) until ``ready()``; stop it by its pid afterwards."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
    try:
        deadline = time.monotonic() + 60
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[2:4]} did not start: {log.read_text()[-1500:]}")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _answers(address: str) -> bool:
    """True once a unary call to ``address`` returns (either server)."""
    try:
        with grpc.insecure_channel(address) as channel:
            channel.unary_unary(GET_ENTROPY)(b"\x08\x01", timeout=2)
        return True
    except grpc.RpcError:
        return False


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered), p99


def measure(
    fns: dict[str, Callable[[], Any]], count: int, budget_s: float
) -> dict[str, tuple[float, float]]:
    """Interleaved calls; p50 / p99 in ms per function. Bounded in count and time."""
    for fn in fns.values():
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    deadline = time.monotonic() + budget_s
    for i in range(count):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if i >= 20 and time.monotonic() > deadline:
            break
    return {k: percentiles(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=400, help="calls per client and cell")
    ap.add_argument("--budget-s", type=float, default=10.0, help="time bound per cell")
    ap.add_argument(
        "--server-args", default="", help="extra options of qr-sampler serve (quoted, one string)"
    )
    args = ap.parse_args(argv)
    print(f"machine: {machine()}; grpcio {grpc.__version__}; server options {args.server_args!r}")
    env_py = sys.executable
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="qrbench-") as tmp:
        sock_product = f"unix://{tmp}/product.sock"
        sock_echo = f"unix://{tmp}/echo.sock"
        port_p, port_e = _free_port(), _free_port()
        transports = {
            "tcp": (f"127.0.0.1:{port_p}", f"127.0.0.1:{port_e}"),
            "unix": (sock_product, sock_echo),
        }
        for transport, (addr_p, addr_e) in transports.items():
            product_cmd = [env_py, "-m", "qr_sampler.cli", "serve", "--source", "urandom"]
            product_cmd += args.server_args.split()
            with (
                process(
                    [*product_cmd, "--address", addr_p],
                    lambda a=addr_p: _answers(a),  # type: ignore[misc]
                    Path(tmp) / f"product-{transport}.log",
                ),
                process(
                    [env_py, "-m", "benchmarks.echo_server", addr_e],
                    lambda a=addr_e: _answers(a),  # type: ignore[misc]
                    Path(tmp) / f"echo-{transport}.log",
                ),
            ):
                for mode in MODES:
                    # a generous deadline: this measures latency; a loaded machine stalls
                    breaker = CircuitBreaker(BreakerConfig(min_timeout_s=2.0))
                    product = QuantumGrpcSource(
                        addr_p,
                        mode=mode,  # type: ignore[arg-type]
                        breaker=breaker,
                    )
                    bare = BareClient(addr_e, mode)
                    res = measure(
                        {
                            "product": lambda p=product: p.fetch([TOKEN_BYTES]),
                            "bare": lambda b=bare: b.fetch(TOKEN_BYTES),
                        },
                        args.count,
                        args.budget_s,
                    )
                    (p50, p99), (b50, b99) = res["product"], res["bare"]
                    ratio = p50 / b50
                    print(
                        f"{transport:4} {mode:16} one token: product p50 {p50:.3f} ms "
                        f"p99 {p99:.3f} ms | bare echo p50 {b50:.3f} ms p99 {b99:.3f} ms "
                        f"| ratio p50 {ratio:.2f}, p99 {p99 / b99:.2f}",
                        flush=True,
                    )
                    verdicts.append(
                        verdict(
                            f"target 3 {transport} {mode} product/bare p50",
                            ratio,
                            1.3,
                            higher_is_better=False,
                        )
                    )
                    if transport == "unix":
                        step = measure(
                            {
                                "product": lambda p=product: p.fetch([TOKEN_BYTES] * 64),
                                "bare": lambda b=bare: b.fetch(64 * TOKEN_BYTES),
                            },
                            max(args.count // 4, 30),
                            args.budget_s,
                        )
                        (s50, s99), (e50, e99) = step["product"], step["bare"]
                        print(
                            f"unix {mode:16} 64 rows:   product p50 {s50:.3f} ms p99 "
                            f"{s99:.3f} ms | bare echo p50 {e50:.3f} ms p99 {e99:.3f} ms",
                            flush=True,
                        )
                        verdicts.append(
                            verdict(
                                f"target 3 unix {mode} 64-row step fetch p50 (ms)",
                                s50,
                                5.0,
                                higher_is_better=False,
                            )
                        )
                    product.close()
                    bare.close()
    print()
    for line in verdicts:
        print(line)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    raise SystemExit(main())
