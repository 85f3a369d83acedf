"""Provenance records: one per sampled token, JSONL on disk, bounded in memory.

Schema version 1. Every field is documented on :class:`TokenRecord` and in
``docs/RECORDS.md``. Non-finite floats (``u``/``z`` of a token that got no
entropy) are written as JSON ``null`` so that any JSON reader accepts the file.

Writing never stalls the engine: :meth:`RecordSink.emit` only appends to an
in-memory buffer (serialisation and disk I/O happen on a background thread).
The buffer is bounded; when the disk cannot keep up, ``emit`` waits at most
``max_block_s`` for room and then drops the records, counting them in
``dropped`` and logging (rate-limited). The writer flushes to the OS after
every batch, so a record reaches the file within milliseconds of its step
when the disk keeps up.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import math
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from qr_sampler.config import UNIFORM_BYTE_MEAN, UNIFORM_BYTE_STD
from qr_sampler.errors import ConfigError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """Where one sampled token came from (schema version 1)."""

    schema: int  #: record schema version
    time_ns: int  #: wall-clock time the record was made (epoch ns)
    step_started_ns: int  #: wall-clock time the sampling step began, logits in hand (epoch ns)
    label: str  #: the request's free-form label (qr_label)
    request_id: str  #: the sampler's id for the request, "<engine pid>-<n>"; "" outside vLLM
    row: int  #: row of the logits batch
    step: int  #: sampling step counter of this process
    token_id: int  #: the token forced
    rank: int  #: its rank in the final distribution (0 = most likely)
    probability: float  #: its probability in the final (truncated) distribution
    num_candidates: int  #: tokens left after top-k / min-p / top-p
    temperature: float  #: temperature applied (0 = greedy)
    temperature_strategy: str  #: 'fixed' or 'edt'
    shannon_entropy: float  #: entropy (nats) of softmax(logits) at T = 1
    u: float  #: the uniform that chose the token (NaN / null when failed)
    z: float  #: z-score of the byte mean (NaN / null when failed)
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
    population_mean: float = UNIFORM_BYTE_MEAN  #: amplifier's null mean of a byte
    population_std: float = UNIFORM_BYTE_STD  #: amplifier's null standard deviation of a byte
    uniform_clamp_epsilon: float = 1e-10  #: u was clamped to [eps, 1 - eps]

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (non-finite floats become None)."""
        data = {name: getattr(self, name) for name in RECORD_FIELDS}
        for name in _FLOAT_FIELDS:
            if not math.isfinite(data[name]):
                data[name] = None
        return data

    def to_json(self) -> str:
        """One JSONL line (without the newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TokenRecord))
_FLOAT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(TokenRecord) if f.type in ("float", float)
)

_LOG_EVERY_S = 10.0
#: queued records beyond which new batches are built at once (not by the writer)
_LAZY_BACKLOG = 1024


class RecordBatch:
    """One step's records, built once on first use, from whichever thread asks.

    The pipeline hands the sink a batch with a builder instead of a list so that
    the engine thread does not build records nobody reads at once: when only the
    file wants them, the writer thread builds them. Every reader (the file, the
    diagnostics ring, listeners, ``StepResult.records``) gets the same list.
    """

    __slots__ = ("_build", "_lock", "_records", "size")

    def __init__(self, size: int, build: Callable[[], list[TokenRecord]]) -> None:
        self.size = size
        self._build: Callable[[], list[TokenRecord]] | None = build
        self._records: list[TokenRecord] | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, records: list[TokenRecord]) -> RecordBatch:
        """A batch of records already built."""
        batch = cls(len(records), lambda: records)
        batch._records, batch._build = records, None
        return batch

    def records(self) -> list[TokenRecord]:
        """The records (built on the first call; later calls return the same list)."""
        done = self._records
        if done is not None:
            return done
        with self._lock:
            if self._records is None:
                build = self._build
                assert build is not None
                built = build()
                if len(built) != self.size:
                    raise RuntimeError(f"record batch: {len(built)} records, expected {self.size}")
                self._records, self._build = built, None
            return self._records

    def __len__(self) -> int:
        return self.size


class RecordSink:
    """Where records go: an optional JSONL file (written by a background thread)
    and an optional bounded in-memory ring (``recent``) for diagnostics.

    ``queue_size`` bounds the records waiting for the disk; ``emit`` blocks at
    most ``max_block_s`` when that buffer is full, then drops (counted in
    ``dropped``). The file is opened (and its folder created) at construction,
    so a bad ``QR_RECORDS_PATH`` fails at start-up rather than at the first token.
    Records are appended; files from earlier runs are kept.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        ring_size: int = 0,
        queue_size: int = 100_000,
        max_block_s: float = 0.05,
        fsync_on_close: bool = True,
    ) -> None:
        if queue_size < 1:
            raise ConfigError(f"queue_size: must be an integer >= 1; got {queue_size}")
        self.path = Path(path) if path else None
        self.recent: collections.deque[TokenRecord] = collections.deque(maxlen=max(ring_size, 0))
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self._capacity = queue_size
        self._max_block_s = max_block_s
        self._fsync_on_close = fsync_on_close
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._has_room = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._pending: list[RecordBatch] = []
        self._pending_count = 0  # records in _pending
        self._accepted = 0  # records handed to the writer (written or dropped later)
        self._settled = 0  # records the writer has written or dropped
        self._closing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._last_log = 0.0
        self._unlogged_drops = 0
        self._fh: IO[str] | None = None
        if self.path is not None:
            self._fh = self._open()
            _OPEN_SINKS.add(self)

    # -- file ----------------------------------------------------------------
    def _open(self) -> IO[str]:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"QR_RECORDS_PATH: cannot open {str(self.path)!r} for appending: "
                f"{exc.strerror or exc}"
            ) from None

    # -- producer side (engine thread) -----------------------------------------
    def emit(self, records: list[TokenRecord] | RecordBatch, keep_recent: bool = False) -> None:
        """Queue ``records`` for the file (and the ring when ``keep_recent``).

        A :class:`RecordBatch` not yet built is built here only for the ring;
        for the file the writer thread builds it.
        """
        batch = records if isinstance(records, RecordBatch) else RecordBatch.of(records)
        if keep_recent and self.recent.maxlen:
            self.recent.extend(batch.records())
        elif self._pending_count >= _LAZY_BACKLOG:
            # the writer is behind: an unbuilt batch holds its step's entropy bytes
            # (KBs per row), so build here and let those go (bounds the memory)
            batch.records()
        if self.path is None or not batch.size:
            return
        n = batch.size
        with self._lock:
            if self._closing:
                self._drop_locked(n, "the record sink is closed")
                return
            if self._pending_count + n > self._capacity:
                deadline = time.monotonic() + self._max_block_s
                while self._pending_count + n > self._capacity:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closing:
                        self._drop_locked(n, "records buffer full (disk too slow?)")
                        return
                    self._has_room.wait(remaining)
            self._pending.append(batch)
            self._pending_count += n
            self._accepted += n
            self._has_work.notify()
        self._ensure_thread()

    def _drop_locked(self, n: int, why: str) -> None:
        self.dropped += n
        self._unlogged_drops += n
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            logger.error(
                "records: dropped %d record(s) (%d in all): %s",
                self._unlogged_drops,
                self.dropped,
                why,
            )
            self._last_log = now
            self._unlogged_drops = 0

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._writer, name="qr-sampler-records", daemon=True
                )
                self._thread.start()

    # -- writer thread ------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._has_work.wait()
                batch, self._pending = self._pending, []
                self._pending_count = 0
                stop = self._closing and not batch
                self._has_room.notify_all()
            if stop:
                return
            self._write(batch)

    def _write(self, batches: list[RecordBatch]) -> None:
        count = sum(b.size for b in batches)
        parts: list[str] = []
        broken = 0
        for batch in batches:
            try:
                parts.extend([r.to_json() + "\n" for r in batch.records()])
            except Exception:  # a bug building this step's records: drop them only
                logger.exception("records: could not build or serialise %d record(s)", batch.size)
                broken += batch.size
        ok = False
        try:
            if parts:
                if self._fh is None:
                    self._fh = self._open()
                self._fh.write("".join(parts))
                self._fh.flush()
            ok = True
        except (OSError, ValueError) as exc:  # ValueError: closed file, ConfigError
            self._reset_file_after_error(exc)
        with self._lock:
            if broken:
                self._drop_locked(broken, "records could not be built")
            if ok:
                self.written += count - broken
            else:
                self.write_errors += 1
                self._drop_locked(count - broken, f"cannot write {self.path}")
            self._settled += count
            self._progress.notify_all()

    def _reset_file_after_error(self, exc: Exception) -> None:
        logger.debug("records: write to %s failed: %s", self.path, exc)
        fh, self._fh = self._fh, None  # reopen on the next batch (the disk may recover)
        if fh is not None:
            with contextlib.suppress(OSError, ValueError):
                fh.close()

    # -- control -------------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record emitted so far is written (or dropped).

        Returns False if that did not happen within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._accepted
            while self._settled < target:
                if self._thread is None or not self._thread.is_alive():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)
            return self._settled >= target

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, flush and close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            self._has_work.notify_all()
            self._has_room.notify_all()
            thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
        with self._lock:
            leftover, self._pending = self._pending, []
            self._pending_count = 0
            if leftover and thread is not None and thread.is_alive():
                # the writer is stuck on a slow disk: give up on what it has not taken
                left = sum(b.size for b in leftover)
                self._drop_locked(left, f"closing: {self.path} too slow")
                self._settled += left
                leftover = []
        if leftover:
            self._write(leftover)  # no writer thread is running: write here
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.flush()
                # a pipe or a character device has nothing to sync (EINVAL)
                if self._fsync_on_close and stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    os.fsync(fh.fileno())
            except OSError as exc:
                logger.error("records: final flush of %s failed: %s", self.path, exc)
            finally:
                fh.close()
        self._closed = True
        _OPEN_SINKS.discard(self)

    def stats(self) -> dict[str, int]:
        """Counters for health output and metrics."""
        with self._lock:
            return {
                "written": self.written,
                "dropped": self.dropped,
                "pending": self._accepted - self._settled,
                "write_errors": self.write_errors,
            }

    def __enter__(self) -> RecordSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_OPEN_SINKS: weakref.WeakSet[RecordSink] = weakref.WeakSet()


@atexit.register
def _close_open_sinks() -> None:
    """Write out queued records when the interpreter exits without close()."""
    for sink in list(_OPEN_SINKS):
        try:
            sink.close(timeout=5.0)
        except Exception:  # never fail interpreter shutdown
            logger.exception("records: closing %s at exit failed", sink.path)


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream the records of a JSONL file; raises ValueError naming a bad line."""
    with Path(path).open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON record: {exc}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            yield obj


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Load a JSONL records file (small files; analysis streams instead)."""
    return list(iter_records(path))
