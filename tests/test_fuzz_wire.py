"""Fuzzing the client's protocol-agnostic reply decoding (``entropy/wire.py``).

Properties, checked with hypothesis against protobuf's own (generated) parser:

* any byte string decodes to a ``Reply`` or raises ``EntropyReplyError`` —
  never another exception, never a hang (inputs up to 64 KiB);
* a real ``EntropyResponse`` serialised by protobuf decodes to the same fields;
* where both our decoder and protobuf accept a message, they agree;
* a reply cut off inside its payload is malformed, never short entropy;
* requests we encode are read back by protobuf exactly.

Besides hypothesis, a coverage-guided atheris (libFuzzer) run of 30,000 seeded
inputs drives the same decoder (tests/support_atheris.py, in a subprocess).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qr_sampler.entropy.wire import Reply, decode_response, encode_request, encode_varint
from qr_sampler.errors import EntropyReplyError
from qr_sampler.proto import entropy_pb2

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _decode(buf: bytes, extended: bool) -> Reply | None:
    try:
        return decode_response(buf, extended=extended)
    except EntropyReplyError as exc:
        assert str(exc).startswith("malformed reply: "), exc
        return None


@FUZZ
@given(st.binary(max_size=65_536), st.booleans())
@example(b"\x0a\xff\xff\xff\xff\x0f", True)  # field 1 claims 4 GiB
@example(b"\x08" + b"\xff" * 11, True)  # varint longer than 10 bytes
@example(b"\x0b", False)  # start-group wire type
@example(b"\x00", True)  # field number 0
@example(b"\x22\x02\xc3\x28", True)  # device_id not UTF-8
def test_any_bytes_decode_or_raise_the_documented_error(buf: bytes, extended: bool) -> None:
    reply = _decode(buf, extended)
    if reply is not None:
        assert isinstance(reply.data, bytes) and len(reply.data) <= len(buf)
        assert _decode(buf, extended) == reply  # deterministic


@st.composite
def responses(draw: st.DrawFn) -> entropy_pb2.EntropyResponse:
    msg = entropy_pb2.EntropyResponse(
        data=draw(st.binary(max_size=4096)),
        sequence_id=draw(INT64),
        generation_timestamp_ns=draw(INT64),
        device_id=draw(st.text(max_size=64)),
    )
    return msg


@FUZZ
@given(responses())
def test_protobuf_serialised_replies_decode_exactly(msg: entropy_pb2.EntropyResponse) -> None:
    buf = msg.SerializeToString()
    reply = decode_response(buf, extended=True)
    assert reply.data == msg.data
    assert (reply.sequence_id or 0) == msg.sequence_id
    assert (reply.generation_timestamp_ns or 0) == msg.generation_timestamp_ns
    assert (reply.device_id or "") == msg.device_id
    assert decode_response(buf, extended=False).data == msg.data


# a message as a list of raw fields: known ones with right or wrong wire types,
# unknown ones of every wire type, repeated fields, odd varint encodings
_FIELD_NUMBERS = st.sampled_from([1, 2, 3, 4, 5, 15, 16, 2047, 2**29 - 1])


@st.composite
def raw_field(draw: st.DrawFn) -> bytes:
    number = draw(_FIELD_NUMBERS)
    wire = draw(st.sampled_from([0, 1, 2, 5, 2, 2]))
    key = encode_varint(number << 3 | wire)
    if wire == 0:
        return key + encode_varint(draw(st.integers(min_value=0, max_value=2**64 - 1)))
    if wire == 1:
        return key + draw(st.binary(min_size=8, max_size=8))
    if wire == 5:
        return key + draw(st.binary(min_size=4, max_size=4))
    payload = draw(st.binary(max_size=256) | st.text(max_size=32).map(str.encode))
    return key + encode_varint(len(payload)) + payload


@FUZZ
@given(st.lists(raw_field(), max_size=12))
def test_structured_messages_agree_with_protobuf(fields: list[bytes]) -> None:
    buf = b"".join(fields)
    ours = _decode(buf, extended=True)
    try:
        theirs = entropy_pb2.EntropyResponse.FromString(buf)
    except DecodeError:
        theirs = None
    if ours is not None and theirs is not None:
        assert ours.data == theirs.data
        assert (ours.sequence_id or 0) == theirs.sequence_id
        assert (ours.generation_timestamp_ns or 0) == theirs.generation_timestamp_ns
        assert (ours.device_id or "") == theirs.device_id
    plain = _decode(buf, extended=False)
    if ours is not None:
        # the qr_entropy reading is stricter than the foreign-protocol reading
        assert plain is not None and plain.data == ours.data


@FUZZ
@given(st.binary(min_size=1, max_size=4096), st.data())
def test_a_reply_cut_inside_its_payload_is_malformed(data: bytes, draw: st.DataObject) -> None:
    buf = entropy_pb2.EntropyResponse(data=data, sequence_id=7).SerializeToString()
    start = 1 + len(encode_varint(len(data)))  # protobuf writes field 1 first
    assert buf[0] == 0x0A and buf[start : start + len(data)] == data
    # anywhere after the tag and before the payload's last byte
    cut = draw.draw(st.integers(min_value=1, max_value=start + len(data) - 1))
    with pytest.raises(EntropyReplyError):
        decode_response(buf[:cut], extended=True)


@FUZZ
@given(
    st.integers(min_value=1, max_value=2**31 - 1),
    st.none() | INT64,
)
def test_requests_read_back_by_protobuf(count: int, seq: int | None) -> None:
    msg = entropy_pb2.EntropyRequest.FromString(encode_request(count, seq))
    assert msg.bytes_needed == count
    assert msg.sequence_id == (seq or 0)


@given(st.integers(max_value=0))
def test_requests_for_no_bytes_are_refused(count: int) -> None:
    with pytest.raises(ValueError, match="count must be >= 1"):
        encode_request(count)


ATHERIS = Path(__file__).with_name("support_atheris.py")


def run_atheris(target: str, runs: int, max_len: int) -> str:
    """Run a coverage-guided atheris target (seeded, bounded) in a subprocess."""
    pytest.importorskip("atheris", reason="atheris is optional (dev extra, CPython wheels)")
    proc = subprocess.run(
        [sys.executable, str(ATHERIS), target, f"-runs={runs}", "-seed=1",
         f"-max_len={max_len}", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {runs} runs" in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


def test_atheris_reply_decoder() -> None:
    out = run_atheris("wire", runs=30_000, max_len=4096)
    assert "cov:" in out
