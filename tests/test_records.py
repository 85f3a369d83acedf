"""Basic record-sink behaviour (the slow-disk, concurrency and exit cases live
in test_records_sink.py): what goes to the file, the ring, and the JSON form."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from qr_sampler import records as records_mod
from qr_sampler.records import (
    RECORD_FIELDS,
    RecordBatch,
    RecordSink,
    TokenRecord,
    read_records,
)


def _record(i: int, **changes: object) -> TokenRecord:
    base = TokenRecord(
        schema=1,
        time_ns=1_700_000_000_000_000_000 + i,
        step_started_ns=1_700_000_000_000_000_000,
        label="exp-α",
        request_id=f"cmpl-{i}",
        row=i,
        step=1,
        token_id=40 + i,
        rank=i,
        probability=0.1 + 0.2,
        num_candidates=17,
        temperature=0.699999988079071,  # float32(0.7)
        temperature_strategy="fixed",
        shannon_entropy=2.5,
        u=1e-10 + i / 7,
        z=-6.361340902404056,
        sample_mean=127.49267578125,
        byte_count=20480,
        entropy_source="system",
        device_id="os.urandom@host",
        server_timestamp_ns=1_700_000_000_000_000_001,
        sequence_id=-1,
        fallback=False,
        fallback_reason="",
        health="off",
        fetch_latency_ns=1234,
        sampling_latency_ns=5678,
        config_hash="0123456789abcdef",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_json_line_round_trips_exactly() -> None:
    rec = _record(3)
    line = rec.to_json()
    assert "\n" not in line
    data = json.loads(line)
    assert list(data) == list(RECORD_FIELDS)
    assert data == rec.to_dict()
    assert TokenRecord(**data) == rec  # floats come back bit for bit
    failed = _record(0, u=math.nan, z=math.nan, failed=True)
    assert json.loads(failed.to_json())["u"] is None


def test_sink_without_path_writes_nothing_and_ring_is_opt_in(tmp_path: Path) -> None:
    sink = RecordSink(None, ring_size=3)
    sink.emit([_record(0), _record(1)])
    assert len(sink.recent) == 0  # not kept unless asked
    sink.emit([_record(i) for i in range(5)], keep_recent=True)
    assert [r.row for r in sink.recent] == [2, 3, 4]  # bounded, newest kept
    assert sink.written == 0
    sink.close()
    assert list(tmp_path.iterdir()) == []
    no_ring = RecordSink(None, ring_size=0)
    no_ring.emit([_record(0)], keep_recent=True)
    assert len(no_ring.recent) == 0


def test_file_gets_every_record_in_order_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "r.jsonl"
    with RecordSink(path) as sink:
        for step in range(4):
            sink.emit([_record(i, step=step) for i in range(3)])
        assert sink.flush()
        assert sink.written == 12
    first = read_records(path)
    assert [(d["step"], d["row"]) for d in first] == [(s, i) for s in range(4) for i in range(3)]
    with RecordSink(path) as sink:  # a second run appends; earlier records are kept
        sink.emit([_record(9)])
    again = read_records(path)
    assert again[:12] == first and again[12]["row"] == 9
    assert sink.stats()["dropped"] == 0


def test_record_batch_is_built_once_and_by_the_writer_when_only_the_file_wants_it(
    tmp_path: Path,
) -> None:
    calls: list[int] = []

    def build() -> list[TokenRecord]:
        calls.append(1)
        return [_record(i) for i in range(3)]

    no_file = RecordSink(None, ring_size=10)
    no_file.emit(RecordBatch(3, build))
    assert calls == []  # nobody reads these records: never built
    batch = RecordBatch(3, build)
    no_file.emit(batch, keep_recent=True)  # the ring needs them now
    assert calls == [1] and list(no_file.recent) == batch.records()
    assert batch.records() is batch.records() and calls == [1]

    path = tmp_path / "r.jsonl"
    with RecordSink(path) as sink:
        lazy = RecordBatch(3, build)
        sink.emit(lazy)
        assert sink.flush()
        assert calls == [1, 1]  # built by the writer thread
        assert read_records(path) == [r.to_dict() for r in lazy.records()]
        assert sink.stats()["written"] == 3


def test_record_batch_is_built_at_once_when_the_writer_is_behind(tmp_path: Path) -> None:
    calls: list[int] = []

    def build() -> list[TokenRecord]:
        calls.append(1)
        return [_record(0)]

    with RecordSink(tmp_path / "r.jsonl") as sink:
        sink._pending_count = records_mod._LAZY_BACKLOG  # as if the disk were slow
        sink.emit(RecordBatch(1, build))
        assert calls == [1]  # built by the caller: its entropy bytes are released


def test_record_batch_that_cannot_be_built_is_dropped_not_fatal(tmp_path: Path) -> None:
    def broken() -> list[TokenRecord]:
        raise RuntimeError("a bug in the builder")

    path = tmp_path / "r.jsonl"
    with RecordSink(path) as sink:
        sink.emit(RecordBatch(2, broken))
        sink.emit([_record(5)])
        assert sink.flush()
        stats = sink.stats()
    assert stats["dropped"] == 2 and stats["written"] == 1
    assert [d["row"] for d in read_records(path)] == [5]
