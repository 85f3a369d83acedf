"""Ask an entropy server's standard health service whether it is serving.

    python -m qr_sampler.server.healthcheck 127.0.0.1:50051
    python -m qr_sampler.server.healthcheck unix:///run/qr-entropy/entropy.sock --timeout 2

Calls ``grpc.health.v1.Health/Check`` and exits 0 when the status is
``SERVING``, 1 otherwise (``NOT_SERVING``, unreachable, timeout), 2 on bad
usage — the contract of Docker ``HEALTHCHECK`` and compose ``healthcheck``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    address: str,
    service: str = "",
    timeout_s: float = 3.0,
    tls_ca_file: str = "",
    tls_cert_file: str = "",
    tls_key_file: str = "",
) -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ...) or ``ERROR: ...``."""
    if tls_ca_file or tls_cert_file:
        ca, cert, key = (
            Path(f).read_bytes() if f else None for f in (tls_ca_file, tls_cert_file, tls_key_file)
        )
        channel = grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            ),
        )
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
            return f"ERROR: {code}"
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qr_sampler.server.healthcheck",
        description="Exit 0 when the gRPC server at ADDRESS reports SERVING.",
    )
    parser.add_argument("address", help="HOST:PORT or unix:///path")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    parser.add_argument("--tls-ca", default="", help="CA bundle (turns TLS on)")
    parser.add_argument("--tls-cert", default="", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default="", help="client key (mutual TLS)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    status = check(
        args.address, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key
    )
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
