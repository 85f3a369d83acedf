"""A bare gRPC echo server: the baseline of the transport benchmark.

It answers the three ``qr_entropy.EntropyService`` method paths with raw bytes
handlers on the same grpc.aio stack as the real server, but does no work: the
reply to "N bytes" is a prebuilt message whose field 1 holds N zero bytes (no
random generation, no health tests, no provenance). Whatever the real server
and client spend beyond this is their own overhead.

Run: ``python -m benchmarks.echo_server ADDRESS`` (``127.0.0.1:PORT`` or
``unix:///path``); it serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc

from qr_sampler.entropy.wire import encode_varint
from qr_sampler.proto import GET_ENTROPY, SERVER_STREAM_ENTROPY, SERVICE_NAME, STREAM_ENTROPY

_CACHE: dict[int, bytes] = {}


def _count(request: bytes) -> int:
    """Field 1 (varint) of a request message."""
    if not request or request[0] != 0x08:
        return 0
    value, shift = 0, 0
    for byte in request[1:]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return value


def _reply(n: int) -> bytes:
    msg = _CACHE.get(n)
    if msg is None:
        msg = b"\x0a" + encode_varint(n) + bytes(n)
        _CACHE[n] = msg
    return msg


async def _unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return _reply(_count(request))


async def _server_stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    yield _reply(_count(request))


async def _bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield _reply(_count(request))


async def serve(address: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
    prefix = f"/{SERVICE_NAME}/"
    handlers = {
        GET_ENTROPY[len(prefix) :]: grpc.unary_unary_rpc_method_handler(_unary),
        SERVER_STREAM_ENTROPY[len(prefix) :]: grpc.unary_stream_rpc_method_handler(_server_stream),
        STREAM_ENTROPY[len(prefix) :]: grpc.stream_stream_rpc_method_handler(_bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("serving", flush=True)
    await stop.wait()
    await server.stop(0.5)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
