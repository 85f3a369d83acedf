"""Test double of a firefly-1 QRNG appliance, for the compose engine tier.

Speaks the appliance's protocol: one unary method
``/qrng.QuantumRNG/GetRandomBytes`` whose request carries the byte count in
field 1 (varint) and whose response carries the bytes in field 1. It requires
the API key in the ``api-key`` metadata header and refuses requests above
13,312 bytes, like the appliance. It serves ``os.urandom`` bytes (a stand-in:
the appliance itself cannot run here) and logs one line per call (count and
whether the key matched, never the key) so tests can prove who served a token.
It also serves the standard gRPC health service.

    python3 firefly_double.py --port 50051          # key from $FIREFLY_API_KEY
    python3 firefly_double.py --check 127.0.0.1:50051  # health probe, exit 0 when SERVING

Requests and responses are encoded at the protobuf wire level because the
appliance's .proto is not part of this project; only field 1 exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

METHOD = "/qrng.QuantumRNG/GetRandomBytes"
MAX_BYTES = 13_312
KEY_HEADER = "api-key"


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def requested_count(request: bytes) -> int:
    """Field 1 (varint) of the request; 0 when absent."""
    count, pos = 0, 0
    while pos < len(request):
        tag, pos = _read_varint(request, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(request, pos)
            if field == 1:
                count = value
        elif wire_type == 2:
            length, pos = _read_varint(request, pos)
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
    return count


def response(data: bytes) -> bytes:
    return b"\x0a" + _varint(len(data)) + data


def serve(port: int, api_key: str) -> None:
    log_lock = threading.Lock()

    def get_random_bytes(request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        key_ok = bool(api_key) and metadata.get(KEY_HEADER) == api_key
        try:
            count = requested_count(request)
        except ValueError:
            count = -1
        with log_lock:  # concurrent calls must not interleave their lines
            sys.stdout.write(f"firefly-double call count={count} key_ok={key_ok}\n")
            sys.stdout.flush()
        if not key_ok:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong api-key")
        if not 1 <= count <= MAX_BYTES:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"byte count must be 1..{MAX_BYTES}; got {count}"
            )
        return response(os.urandom(count))

    handler = grpc.method_handlers_generic_handler(
        "qrng.QuantumRNG",
        {"GetRandomBytes": grpc.unary_unary_rpc_method_handler(get_random_bytes)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"firefly-double listening on port {port}", flush=True)
    server.wait_for_termination()


def check(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        except grpc.RpcError:
            return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="firefly-1 appliance test double")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--check", metavar="ADDRESS", help="probe health and exit")
    args = parser.parse_args()
    if args.check:
        return check(args.check)
    api_key = os.environ.get("FIREFLY_API_KEY", "")
    if not api_key:
        print("FIREFLY_API_KEY must be set", file=sys.stderr)
        return 2
    serve(args.port, api_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
