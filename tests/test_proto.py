"""The qr_entropy protocol: committed stubs match grpcio-tools, and the client's
wire codec agrees with the protobuf runtime (generated messages)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qr_sampler.entropy.wire import decode_response, encode_request, encode_varint
from qr_sampler.errors import EntropyReplyError
from qr_sampler.proto import GET_ENTROPY, SERVER_STREAM_ENTROPY, STREAM_ENTROPY, entropy_pb2
from qr_sampler.proto.generate import GENERATED, SRC_ROOT, generate


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == list(GENERATED)
    for name in GENERATED:
        fresh = (tmp_path / name).read_bytes()
        committed = (SRC_ROOT / name).read_bytes()
        assert fresh == committed, f"{name} differs: run python -m qr_sampler.proto.generate"


def test_generated_code_imports_under_the_package_path() -> None:
    from qr_sampler.proto import entropy_pb2_grpc

    assert entropy_pb2.DESCRIPTOR.name == "qr_sampler/proto/entropy.proto"
    assert hasattr(entropy_pb2_grpc, "EntropyServiceStub")


def test_messages_have_the_documented_fields() -> None:
    req = entropy_pb2.EntropyRequest.DESCRIPTOR.fields_by_name
    assert (req["bytes_needed"].number, req["bytes_needed"].type) == (
        1,
        req["bytes_needed"].TYPE_INT32,
    )
    assert (req["sequence_id"].number, req["sequence_id"].type) == (
        2,
        req["sequence_id"].TYPE_INT64,
    )
    resp = entropy_pb2.EntropyResponse.DESCRIPTOR.fields_by_name
    expected = {
        "data": (1, resp["data"].TYPE_BYTES),
        "sequence_id": (2, resp["sequence_id"].TYPE_INT64),
        "generation_timestamp_ns": (3, resp["generation_timestamp_ns"].TYPE_INT64),
        "device_id": (4, resp["device_id"].TYPE_STRING),
    }
    assert {name: (f.number, f.type) for name, f in resp.items()} == expected
    service = entropy_pb2.DESCRIPTOR.services_by_name["EntropyService"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "GetEntropy": (False, False),
        "StreamEntropy": (True, True),
        "ServerStreamEntropy": (False, True),
    }
    assert GET_ENTROPY == "/qr_entropy.EntropyService/GetEntropy"
    assert STREAM_ENTROPY.endswith("/StreamEntropy")
    assert SERVER_STREAM_ENTROPY.endswith("/ServerStreamEntropy")


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 2**31 - 1),
    seq=st.one_of(st.none(), st.integers(1, 2**63 - 1)),
)
def test_request_encoding_parses_as_the_generated_message(count: int, seq: int | None) -> None:
    msg = entropy_pb2.EntropyRequest.FromString(encode_request(count, seq))
    assert msg.bytes_needed == count
    assert msg.sequence_id == (seq or 0)


def test_request_rejects_non_positive_counts() -> None:
    with pytest.raises(ValueError, match="count"):
        encode_request(0)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=3000),
    seq=st.integers(-(2**63), 2**63 - 1),
    stamp=st.integers(0, 2**63 - 1),
    device=st.text(max_size=40),
)
def test_response_decoding_matches_the_runtime(
    data: bytes, seq: int, stamp: int, device: str
) -> None:
    raw = entropy_pb2.EntropyResponse(
        data=data, sequence_id=seq, generation_timestamp_ns=stamp, device_id=device
    ).SerializeToString()
    reply = decode_response(raw, extended=True)
    assert reply.data == data
    assert (reply.sequence_id or 0) == seq
    assert (reply.generation_timestamp_ns or 0) == stamp
    assert (reply.device_id or "") == device
    # a foreign reading sees the bytes and nothing else
    foreign = decode_response(raw, extended=False)
    assert foreign.data == data
    assert foreign.sequence_id is None and foreign.device_id is None


def test_foreign_fields_of_every_wire_type_are_skipped() -> None:
    raw = (
        b"\x0a\x03abc"  # 1: bytes
        + b"\x12\x05hello"  # 2: a string where qr_entropy has a varint
        + b"\x19" + bytes(8)  # 3: fixed64 / double
        + b"\x25" + bytes(4)  # 4: fixed32 / float
        + b"\x2a\x03\x01\x02\x03"  # 5: packed repeated
        + b"\x30" + encode_varint(2**40)  # 6: varint
    )  # fmt: skip
    assert decode_response(raw, extended=False).data == b"abc"
    with pytest.raises(EntropyReplyError, match="malformed"):
        decode_response(raw, extended=True)  # field 2 must be an integer for qr_entropy


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x05ab",  # length runs past the end
        b"\x0a",  # missing length
        b"\x08\x01",  # field 1 as a varint
        b"\x0a\x01a\x10",  # truncated varint
        b"\x0a\x01a\x10" + b"\xff" * 11,  # varint too long
        b"\x00\x01",  # field number 0
        b"\x0b",  # group start (wire type 3)
        b"\x0f",  # wire type 7
        b"\x0a\x01a\x19\x00",  # truncated fixed64
        b"\x0a\x01a\x25\x00",  # truncated fixed32
        b"\x0a\x01a\x22\x02\xff\xfe",  # device id not UTF-8
    ],
)
def test_malformed_replies_are_errors(raw: bytes) -> None:
    with pytest.raises(EntropyReplyError, match="malformed"):
        decode_response(raw, extended=True)


def test_last_field_one_wins_like_protobuf() -> None:
    raw = b"\x0a\x01a\x0a\x02bc"
    assert (
        decode_response(raw, extended=True).data == entropy_pb2.EntropyResponse.FromString(raw).data
    )
