"""Provenance records: one per sampled token, JSONL on disk, bounded in memory.

Schema version 1 — every field is documented on :class:`TokenRecord`.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """Where one sampled token came from."""

    schema: int  #: record schema version
    time_ns: int  #: wall-clock time the record was made (epoch ns)
    step_started_ns: int  #: wall-clock time the sampling step began, logits in hand (epoch ns)
    label: str  #: the request's free-form label (qr_label)
    request_id: str  #: vLLM request id when known, else ""
    row: int  #: row of the logits batch
    step: int  #: sampling step counter of this process
    token_id: int  #: the token forced
    rank: int  #: its rank in the final distribution (0 = most likely)
    probability: float  #: its probability in the final (truncated) distribution
    num_candidates: int  #: tokens left after top-k / min-p / top-p
    temperature: float  #: temperature applied (0 = greedy)
    temperature_strategy: str  #: 'fixed' or 'edt'
    shannon_entropy: float  #: entropy (nats) of softmax(logits) at T = 1
    u: float  #: the uniform that chose the token
    z: float  #: z-score of the byte mean
    sample_mean: float  #: mean of the bytes
    byte_count: int  #: number of bytes amplified
    entropy_source: str  #: source that produced the bytes
    device_id: str  #: device that produced them
    server_timestamp_ns: int  #: generation time stamped by the producer (epoch ns)
    sequence_id: int  #: producer's sequence id (-1 when none)
    fallback: bool  #: True when the bytes did not come from the primary source
    fallback_reason: str  #: why ('' unless fallback)
    health: str  #: continuous health-test status: 'ok', 'off' or 'failed:<test>'
    fetch_latency_ns: int  #: entropy fetch time for the step
    sampling_latency_ns: int  #: whole sampling step time
    config_hash: str  #: hash of the process settings (no secrets)
    failed: bool = False  #: True when no entropy was available in 'error' mode (EOS forced)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TokenRecord))


class RecordSink:
    """Where records go: an optional JSONL file (written by a background thread)
    and an optional bounded in-memory ring for diagnostics.

    ``emit`` never blocks the caller for more than ``max_block_s``; records that
    cannot be queued in time are counted in ``dropped`` and logged.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        ring_size: int = 0,
        queue_size: int = 100_000,
        max_block_s: float = 0.05,
    ) -> None:
        self.path = Path(path) if path else None
        self.recent: collections.deque[TokenRecord] = collections.deque(maxlen=max(ring_size, 0))
        self.dropped = 0
        self.written = 0
        self._max_block_s = max_block_s
        self._queue: queue.Queue[list[TokenRecord] | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._writer, name="qr-sampler-records", daemon=True
                    )
                    self._thread.start()

    def emit(self, records: list[TokenRecord], keep_recent: bool = False) -> None:
        if keep_recent and self.recent.maxlen:
            self.recent.extend(records)
        if self.path is None or not records:
            return
        self._ensure_thread()
        try:
            self._queue.put(records, timeout=self._max_block_s)
        except queue.Full:
            self.dropped += len(records)
            logger.error("records queue full: dropped %d records (disk too slow?)", len(records))

    def _writer(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            while True:
                item = self._queue.get()
                if item is None:
                    fh.flush()
                    self._queue.task_done()
                    return
                fh.write("".join(r.to_json() + "\n" for r in item))
                self.written += len(item)
                if self._queue.empty():
                    fh.flush()
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued record is on disk (tests, shutdown)."""
        if self._thread is None:
            return
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        done.wait(timeout)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10.0)
        self._thread = None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Load a JSONL records file (small files; analysis streams instead)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
