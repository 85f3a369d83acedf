"""Entropy transport: one engine step's fetch through gRPC, per mode, against
in-process ``os.urandom`` (the ``system`` source) as the baseline of the same run.

A real ``qr-sampler serve --source urandom`` child process on a unix socket
(and on 127.0.0.1 for bidi); the client is ``QuantumGrpcSource`` with its
continuous health tests on, as in production. A step asks for ``rows`` x
20,480 bytes in one ``fetch``; ``cap`` rows split requests at 13,312 bytes
(a firefly-1-like appliance cap), so the split requests run concurrently.

Columns: median ms per step; ratio = that / ``system`` (same rows, same run).

Run: ``python -m benchmarks.bench_grpc [--rows 1,8,64]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import interleaved_ms, machine
from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker
from qr_sampler.entropy.grpc_client import QuantumGrpcSource
from qr_sampler.entropy.health import HealthMonitor
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.server.healthcheck import check

SAMPLE = 20_480


def start_server(address: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QR_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qr_sampler.cli", "serve", "--source", "urandom",
         "--address", address, "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(600):  # bounded: 600 x 0.1 s
        if check(address, timeout_s=1.0) == "SERVING":
            return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server at {address} did not start")


def client(address: str, mode: str, cap: int = 1_048_576) -> QuantumGrpcSource:
    return QuantumGrpcSource(
        address,
        mode=mode,  # type: ignore[arg-type]
        max_bytes_per_request=cap,
        health=HealthMonitor(),
        breaker=CircuitBreaker(BreakerConfig(min_timeout_s=5.0, max_timeout_s=10.0)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--rows", default="1,8,64", help="rows per step (comma list)")
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="qrb-") as d:
        unix = f"unix://{d}/e.sock"
        tcp = "127.0.0.1:50777"
        servers = [start_server(unix), start_server(tcp)]
        try:
            sources: dict[str, Any] = {
                "system": SystemEntropySource(),
                "unary": client(unix, "unary"),
                "server_streaming": client(unix, "server_streaming"),
                "bidi": client(unix, "bidi_streaming"),
                "bidi_tcp": client(tcp, "bidi_streaming"),
                "unary_cap": client(unix, "unary", cap=13_312),
                "bidi_cap": client(unix, "bidi_streaming", cap=13_312),
            }
            print(f"{'rows':>5} " + " ".join(f"{name:>17}" for name in sources))
            for rows in rows_list:
                sizes = [SAMPLE] * rows

                def step(src: Any, sizes: list[int] = sizes) -> Callable[[], Any]:
                    return lambda: src.fetch(sizes)

                ms = interleaved_ms(
                    {name: step(src) for name, src in sources.items()},
                    iters=args.iters,
                    budget_s=30.0,
                )
                base = ms["system"]
                cells = [f"{ms[n]:8.2f} ({ms[n] / base:5.1f}x)" for n in sources]
                print(f"{rows:>5} " + " ".join(f"{c:>17}" for c in cells))
            for src in sources.values():
                src.close()
        finally:
            for proc in servers:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    print("ms per step (median); ratio against in-process os.urandom of the same rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
