"""Rows cut from replies: bytes and provenance equal a join-then-slice reference."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from qr_sampler.entropy.grpc_client import QuantumGrpcSource, split_sizes
from qr_sampler.entropy.wire import Reply


def reference_cut(
    sizes: list[int], replies: list[Reply], extended: bool, address: str
) -> list[tuple[bytes, str, int, int]]:
    """Join everything, slice every row; provenance from the replies each row spans."""
    data = b"".join(r.data for r in replies)
    bounds = []
    start = 0
    for r in replies:
        bounds.append((start, start + len(r.data)))
        start += len(r.data)
    rows = []
    offset = 0
    for n in sizes:
        spanned = [
            r
            for r, (lo, hi) in zip(replies, bounds, strict=True)
            if lo < offset + n and hi > offset
        ]
        head = spanned[0]
        stamps = [r.generation_timestamp_ns for r in spanned if r.generation_timestamp_ns]
        rows.append(
            (
                data[offset : offset + n],
                head.device_id or address,
                min(stamps) if stamps else 0,
                head.sequence_id if extended and head.sequence_id else -1,
            )
        )
        offset += n
    return rows


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    cap=st.integers(1, 700),
    stamps=st.lists(st.one_of(st.none(), st.integers(1, 10**6)), min_size=40, max_size=40),
    extended=st.booleans(),
)
def test_cut_matches_join_and_slice(
    sizes: list[int], cap: int, stamps: list[int | None], extended: bool
) -> None:
    total = sum(sizes)
    pieces = split_sizes(total, cap)[:]
    if len(pieces) > len(stamps):  # keep the example small
        pieces = split_sizes(total, -(-total // len(stamps)))
    replies = [
        Reply(
            data=os.urandom(n),
            sequence_id=i + 1 if extended else None,
            generation_timestamp_ns=stamps[i],
            device_id=f"dev{i}" if i % 3 else None,
        )
        for i, n in enumerate(pieces)
    ]
    method = "/qr_entropy.EntropyService/StreamEntropy" if extended else "/other.Svc/Get"
    source = QuantumGrpcSource(
        "127.0.0.1:1", method_path=method, stream_method_path=method, server_stream_method_path=""
    )
    chunks = source._cut(sizes, replies, "ok", 123)
    expected = reference_cut(sizes, replies, extended, source.address)
    assert [(c.data, c.device_id, c.generation_timestamp_ns, c.sequence_id) for c in chunks] == (
        expected
    )
    assert all(c.health == "ok" and c.fetch_latency_ns == 123 for c in chunks)
    source.close()
