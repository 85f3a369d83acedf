"""The provenance-record sink: complete records, buffered, flushed, bounded."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from support_tools import DownSource, mock_settings, run_pipeline

from qr_sampler.entropy.fallback import FallbackSource
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.errors import ConfigError
from qr_sampler.records import RECORD_FIELDS, RecordSink, TokenRecord, iter_records, read_records

DOCS = Path(__file__).resolve().parents[1] / "docs" / "RECORDS.md"


def _strict_loads(line: str) -> dict[str, object]:
    def bad_constant(name: str) -> object:
        raise ValueError(f"non-standard JSON constant {name}")

    obj = json.loads(line, parse_constant=bad_constant)
    assert isinstance(obj, dict)
    return obj


def _record(i: int = 0, **changes: object) -> TokenRecord:
    rec = TokenRecord(
        schema=1,
        time_ns=10 + i,
        step_started_ns=5 + i,
        label="lab",
        request_id=f"r{i}",
        row=0,
        step=i,
        token_id=i,
        rank=0,
        probability=0.5,
        num_candidates=2,
        temperature=0.7,
        temperature_strategy="fixed",
        shannon_entropy=0.69,
        u=0.25,
        z=-0.67,
        sample_mean=127.0,
        byte_count=2,
        entropy_source="system",
        device_id="os.urandom",
        server_timestamp_ns=7 + i,
        sequence_id=-1,
        fallback=False,
        fallback_reason="",
        health="off",
        fetch_latency_ns=1,
        sampling_latency_ns=2,
        config_hash="0" * 16,
    )
    return replace(rec, **changes)  # type: ignore[arg-type]


def test_every_pipeline_token_has_a_complete_consistent_record(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "records.jsonl"  # the folder is created
    settings = mock_settings(path)
    emitted = run_pipeline(settings, steps=25, labels=("x", "y", "z"))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(emitted) == 75
    for line, rec in zip(lines, emitted, strict=True):
        obj = _strict_loads(line)
        assert tuple(obj) == RECORD_FIELDS
        assert obj == rec.to_dict()
        assert obj["schema"] == 1 and obj["label"] in ("x", "y", "z")
        assert obj["step_started_ns"] <= obj["server_timestamp_ns"] <= obj["time_ns"]
        assert obj["byte_count"] == 2048 and obj["entropy_source"] == "mock_uniform"
        assert obj["fallback"] is False and obj["fallback_reason"] == ""
        assert obj["config_hash"] == settings.config_hash()
        assert 0 < obj["u"] < 1 and obj["fetch_latency_ns"] > 0
        assert obj["sampling_latency_ns"] >= obj["fetch_latency_ns"]
    assert [_strict_loads(x)["step"] for x in lines[::3]] == list(range(1, 26))


def test_fallback_is_labelled_in_every_record(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    run_pipeline(
        mock_settings(path),
        steps=4,
        labels=("a",),
        source=FallbackSource(DownSource(), SystemEntropySource()),
    )
    for rec in read_records(path):
        assert rec["fallback"] is True
        assert rec["fallback_reason"].startswith("unavailable: connection refused")
        assert rec["entropy_source"] == "system"


def test_non_finite_floats_are_null_and_the_api_key_never_appears(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    settings = mock_settings(path, fallback_mode="error", grpc_api_key="sekrit-key-123")
    run_pipeline(settings, steps=2, labels=("a",), source=FallbackSource(DownSource(), None))
    text = path.read_text()
    assert "sekrit" not in text and "NaN" not in text
    recs = [_strict_loads(x) for x in text.splitlines()]
    assert all(r["failed"] is True and r["u"] is None and r["z"] is None for r in recs)
    assert _record(u=math.inf).to_dict()["u"] is None


def test_flush_ring_and_close(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    sink = RecordSink(path, ring_size=5)
    sink.emit([_record(i) for i in range(8)], keep_recent=True)
    sink.emit([_record(8)])  # not kept in the ring
    assert sink.flush(timeout=30)
    assert len(path.read_text().splitlines()) == 9  # on disk before close
    assert [r.step for r in sink.recent] == [3, 4, 5, 6, 7]
    assert sink.stats() == {"written": 9, "dropped": 0, "pending": 0, "write_errors": 0}
    sink.close()
    sink.close()  # idempotent
    sink.emit([_record(9)])
    assert sink.dropped == 1  # after close: counted, not written
    assert len(read_records(path)) == 9
    with RecordSink(path) as again:  # appends
        again.emit([_record(10)])
    assert [r["step"] for r in iter_records(path)][-1] == 10


def test_concurrent_emitters_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    sink = RecordSink(path)

    def work(t: int) -> None:
        for i in range(200):
            sink.emit([_record(t * 1000 + i), _record(t * 1000 + i, row=1)])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sink.close()
    recs = [_strict_loads(x) for x in path.read_text().splitlines()]
    assert len(recs) == 1600 and sink.written == 1600
    assert sorted({r["step"] for r in recs}) == sorted(
        t * 1000 + i for t in range(4) for i in range(200)
    )


def test_slow_disk_never_holds_the_caller_and_drops_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real FIFO nobody reads stands for a stalled disk: the writer thread
    blocks in write(); emit keeps returning and drops beyond the bound.
    Closing it logs no error (a FIFO has nothing to fsync)."""
    fifo = tmp_path / "stalled.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the sink open for writing
    try:
        sink = RecordSink(fifo, queue_size=50, max_block_s=0.01)
        big = "x" * 200
        for i in range(100):  # ~0.5 MB: far beyond the pipe buffer and the queue
            sink.emit([_record(i * 20 + j, label=big) for j in range(20)])
        assert sink.dropped > 0
        stats = sink.stats()
        assert stats["pending"] <= 50 + 50  # bounded: the queue plus the batch in write()
        got = bytearray()

        def drain() -> None:
            import select

            # until end of file: close() writes its last lines and then closes
            # the sink's end, so nothing is left in the pipe (stopping when
            # close() returned could leave the final flush unread)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ready, _, _ = select.select([reader], [], [], 0.1)
                if ready:
                    try:
                        chunk = os.read(reader, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        return
                    got.extend(chunk)

        th = threading.Thread(target=drain)
        th.start()
        with caplog.at_level(logging.ERROR, logger="qr_sampler"):
            sink.close(timeout=60)
        th.join()
        assert not [r for r in caplog.records if "final flush" in r.getMessage()]
        lines = bytes(got).decode().splitlines()
        assert len(lines) == sink.written
        assert sink.written + sink.dropped == 2000
        assert all(_strict_loads(x)["label"] == big for x in lines)
    finally:
        os.close(reader)


def test_failing_disk_is_counted_not_fatal() -> None:
    """/dev/full: every write fails with ENOSPC (a real device)."""
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is missing on this machine")
    sink = RecordSink("/dev/full", fsync_on_close=False)
    sink.emit([_record(1)])
    sink.flush(timeout=30)
    sink.emit([_record(2)])
    sink.close()
    assert sink.written == 0 and sink.dropped == 2 and sink.write_errors >= 1


def test_bad_path_fails_at_start_naming_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="QR_RECORDS_PATH: cannot open"):
        RecordSink(blocker / "records.jsonl")
    with pytest.raises(ConfigError, match="queue_size"):
        RecordSink(tmp_path / "x.jsonl", queue_size=0)


def test_queued_records_are_written_at_interpreter_exit(tmp_path: Path) -> None:
    path = tmp_path / "exit.jsonl"
    code = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from test_records_sink import _record\n"
        "from qr_sampler.records import RecordSink\n"
        "sink = RecordSink(sys.argv[1])\n"
        "for i in range(5000): sink.emit([_record(i)])\n"
        "# no close(): the atexit hook must write everything\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), str(Path(__file__).parent)],
        check=True,
        timeout=120,
    )
    assert len(path.read_text().splitlines()) == 5000


def test_iter_records_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(_record(1).to_json() + "\n\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not a JSON object"):
        read_records(path)


def test_schema_document_lists_every_field() -> None:
    text = DOCS.read_text(encoding="utf-8")
    documented = [
        line.split("|")[1].strip().strip("`")
        for line in text.splitlines()
        if line.startswith("| `")
    ]
    assert documented == list(RECORD_FIELDS)
