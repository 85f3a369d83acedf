"""Fuzzing the entropy server's request handling, over real gRPC on 127.0.0.1.

The package's server runs in-process; hypothesis sends it arbitrary request
payloads (raw bytes, not necessarily valid protobuf) through the unary, the
server-streaming and the bidirectional methods, arbitrary method paths and
arbitrary API-key metadata. Every call ends in one of the documented outcomes:

* ``OK`` with exactly ``bytes_needed`` bytes (when the payload is a valid
  request within the cap);
* ``INVALID_ARGUMENT`` naming ``bytes_needed`` and the cap;
* ``UNKNOWN`` ("Unexpected DecodeError") from grpc.aio's deserializer for a
  payload that is not protobuf (grpc.aio also logs a traceback for it; with an
  API key set, unauthenticated callers are refused before their payload is read);
* ``UNIMPLEMENTED`` for unknown methods, ``UNAUTHENTICATED`` for a wrong key.

After every example a valid request is still served: the server never crashes
or hangs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support_grpc import entropy_server

from qr_sampler.entropy.wire import encode_request, encode_varint
from qr_sampler.proto import entropy_pb2
from qr_sampler.server import EntropyServer

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CAP = 65_536
KEY = "fuzz-server-key-4Rk2"
UNARY = "/qr_entropy.EntropyService/GetEntropy"
SSTREAM = "/qr_entropy.EntropyService/ServerStreamEntropy"
BIDI = "/qr_entropy.EntropyService/StreamEntropy"


@pytest.fixture(scope="module")
def server() -> Iterator[EntropyServer]:
    with entropy_server(os.urandom, max_bytes=CAP, api_key=KEY, stream_chunk_bytes=4096) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: EntropyServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


AUTH = (("api-key", KEY),)


def _expected_size(payload: bytes) -> int | None:
    """bytes_needed as protobuf reads the payload (None: not a valid request)."""
    try:
        return int(entropy_pb2.EntropyRequest.FromString(payload).bytes_needed)
    except DecodeError:
        return None


def _still_serving(channel: grpc.Channel) -> None:
    call = channel.unary_unary(UNARY)
    reply = entropy_pb2.EntropyResponse.FromString(
        call(encode_request(32), metadata=AUTH, timeout=30)
    )
    assert len(reply.data) == 32


def _check_error(exc: grpc.RpcError, size: int | None) -> None:
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details() or ""  # type: ignore[attr-defined]
    if size is None:
        # grpc.aio reports a request its deserializer cannot parse as UNKNOWN
        # ("Unexpected DecodeError") and logs it; the call is refused either way
        assert code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (code, details)
        assert "DecodeError" in details or "deserializ" in details.lower(), details
    else:
        assert not 1 <= size <= CAP, (size, code, details)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "bytes_needed" in details and str(CAP) in details


# payloads: random bytes, valid requests of any int32 size, and valid requests
# with unknown or duplicate fields appended
PAYLOADS = (
    st.binary(max_size=64)
    | st.integers(min_value=-(2**31), max_value=2**31 - 1).map(lambda n: b"\x08" + encode_varint(n))
    | st.tuples(st.integers(min_value=1, max_value=CAP), st.binary(max_size=16)).map(
        lambda t: encode_request(t[0]) + t[1]
    )
)


@FUZZ
@given(PAYLOADS)
def test_unary_payloads(channel: grpc.Channel, payload: bytes) -> None:
    size = _expected_size(payload)
    try:
        raw = channel.unary_unary(UNARY)(payload, metadata=AUTH, timeout=30)
    except grpc.RpcError as exc:
        _check_error(exc, size)
    else:
        assert size is not None and 1 <= size <= CAP
        assert len(entropy_pb2.EntropyResponse.FromString(raw).data) == size
    _still_serving(channel)


@FUZZ
@given(PAYLOADS)
def test_server_stream_payloads(channel: grpc.Channel, payload: bytes) -> None:
    size = _expected_size(payload)
    try:
        parts = list(channel.unary_stream(SSTREAM)(payload, metadata=AUTH, timeout=30))
    except grpc.RpcError as exc:
        _check_error(exc, size)
    else:
        assert size is not None and 1 <= size <= CAP
        got = sum(len(entropy_pb2.EntropyResponse.FromString(p).data) for p in parts)
        assert got == size
    _still_serving(channel)


@FUZZ
@given(st.lists(PAYLOADS, min_size=1, max_size=5))
def test_bidi_stream_payloads(channel: grpc.Channel, payloads: list[bytes]) -> None:
    sizes = [_expected_size(p) for p in payloads]
    replies: list[bytes] = []
    try:
        for raw in channel.stream_stream(BIDI)(iter(payloads), metadata=AUTH, timeout=30):
            replies.append(raw)
    except grpc.RpcError as exc:
        # the stream ends at the first bad request; all before it were served
        bad = len(replies)
        assert bad < len(payloads)
        _check_error(exc, sizes[bad])
    else:
        assert len(replies) == len(payloads)
    for raw, size in zip(replies, sizes, strict=False):
        assert len(entropy_pb2.EntropyResponse.FromString(raw).data) == size
    _still_serving(channel)


@FUZZ
@given(st.text(max_size=40), st.binary(max_size=16))
def test_unknown_methods(channel: grpc.Channel, name: str, payload: bytes) -> None:
    path = "/qr_entropy.EntropyService/" + "".join(c for c in name if c.isalnum())
    if path in (UNARY, SSTREAM, BIDI):
        return
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(path)(payload, metadata=AUTH, timeout=30)
    assert info.value.code() in (  # type: ignore[attr-defined]
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,  # a path grpc's HTTP/2 layer cannot route
    )
    _still_serving(channel)


@FUZZ
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
def test_wrong_api_keys(channel: grpc.Channel, key: str) -> None:
    call = channel.unary_unary(UNARY)
    if key == KEY:
        return
    with pytest.raises(grpc.RpcError) as info:
        call(encode_request(8), metadata=(("api-key", key),), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert KEY not in (info.value.details() or "")  # type: ignore[attr-defined]
    _still_serving(channel)


@FUZZ
@given(PAYLOADS)
def test_callers_without_the_key_are_refused_before_their_payload_is_read(
    channel: grpc.Channel, payload: bytes
) -> None:
    for call in (
        lambda: channel.unary_unary(UNARY)(payload, timeout=30),
        lambda: list(channel.stream_stream(BIDI)(iter([payload]), timeout=30)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    _still_serving(channel)
