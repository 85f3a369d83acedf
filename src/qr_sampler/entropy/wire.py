"""Protocol-agnostic protobuf wire handling for the gRPC entropy client.

The client talks to any service whose request message carries the byte count
in field 1 (an integer) and whose response carries the bytes in field 1
(``bytes``), without that service's generated stubs: requests are encoded and
responses decoded here, at the protobuf wire level.

Fields 2-4 (sequence id, generation timestamp, device id) belong to the
``qr_entropy`` protocol. They are written and read only when the method is in
the ``qr_entropy`` package (``extended=True``): a foreign service may use the
same field numbers for other things (a string in field 2, say), so for it the
request holds field 1 alone and every response field but 1 is skipped —
after checking that the whole message is well-formed.

A response is *malformed* when its bytes are not a valid protobuf message
(truncated or over-long varint, a length running past the end, wire types 3,
4, 6 or 7, field number 0), when field 1 is not length-delimited, or — for
the ``qr_entropy`` protocol — when fields 2-4 have the wrong wire type or the
device id is not UTF-8. Malformed replies raise
:class:`~qr_sampler.errors.EntropyReplyError`, never count as entropy.
"""

from __future__ import annotations

from typing import NamedTuple

from qr_sampler.errors import EntropyReplyError

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MASK64 = (1 << 64) - 1
_SMALL_VARINTS = tuple(bytes((v,)) for v in range(0x80))


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (negative: two's complement)."""
    value &= _MASK64
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(count: int, sequence_id: int | None = None) -> bytes:
    """Request message: field 1 = ``count``; field 2 = ``sequence_id`` if given."""
    if count < 1:
        raise ValueError(f"count must be >= 1; got {count}")
    out = b"\x08" + encode_varint(count)
    if sequence_id is not None:
        out += b"\x10" + encode_varint(sequence_id)
    return out


class Reply(NamedTuple):
    """A decoded response (``None``: the field was absent).

    ``data`` is ``bytes``, or with ``decode_response(..., copy=False)`` a read-only
    ``memoryview`` into the message (no copy of the payload)."""

    data: bytes | memoryview
    sequence_id: int | None = None
    generation_timestamp_ns: int | None = None
    device_id: str | None = None


def _malformed(why: str) -> EntropyReplyError:
    return EntropyReplyError(f"malformed reply: {why}")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    if pos < len(buf) and buf[pos] < 0x80:  # one byte: every key, short counts
        return buf[pos], pos + 1
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise _malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise _malformed("varint longer than 10 bytes")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def decode_response(buf: bytes, *, extended: bool, copy: bool = True) -> Reply:
    """Decode a response; ``extended``: read the ``qr_entropy`` fields 2-4 too.

    ``copy=False``: ``data`` is a view of ``buf`` instead of a copy (for a large
    payload that is cut into rows anyway)."""
    data_at = (0, 0)  # field 1's bytes: buf[start:end]
    seq: int | None = None
    stamp: int | None = None
    device: str | None = None
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _malformed("field number 0")
        value: int | tuple[int, int]
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _I64:
            if pos + 8 > end:
                raise _malformed("truncated 64-bit field")
            value, pos = 0, pos + 8
        elif wire == _I32:
            if pos + 4 > end:
                raise _malformed("truncated 32-bit field")
            value, pos = 0, pos + 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if length > end - pos:
                raise _malformed(f"field {field} claims {length} bytes, {end - pos} remain")
            value, pos = (pos, pos + length), pos + length
        else:
            raise _malformed(f"unsupported wire type {wire} (field {field})")

        if field == 1:
            if wire != _LEN:
                raise _malformed("field 1 is not a bytes field")
            assert isinstance(value, tuple)
            data_at = value  # protobuf semantics: the last occurrence wins
        elif extended and field in (2, 3):
            if wire != _VARINT:
                raise _malformed(f"field {field} is not an integer")
            assert isinstance(value, int)
            if field == 2:
                seq = _signed64(value)
            else:
                stamp = _signed64(value)
        elif extended and field == 4:
            if wire != _LEN:
                raise _malformed("field 4 (device_id) is not a string")
            assert isinstance(value, tuple)
            try:
                device = buf[value[0] : value[1]].decode("utf-8")
            except UnicodeDecodeError:
                raise _malformed("device_id is not UTF-8") from None
    start, stop = data_at
    data = buf[start:stop] if copy else memoryview(buf)[start:stop]
    return Reply(data=data, sequence_id=seq, generation_timestamp_ns=stamp, device_id=device)


__all__ = ["Reply", "decode_response", "encode_request", "encode_varint"]
