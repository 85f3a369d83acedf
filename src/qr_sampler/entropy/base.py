"""The entropy-source interface: bytes that carry their provenance."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from qr_sampler.config import QRSettings


@dataclass(frozen=True, slots=True)
class EntropyChunk:
    """Bytes for one consumer (usually one token) and where they came from.

    ``generation_timestamp_ns`` is epoch nanoseconds at which the producer made
    the bytes (the server's stamp for remote sources). ``fallback`` is True when
    the bytes did not come from the configured primary source; ``fallback_reason``
    then says why (``unavailable``, ``bad_reply``, ``health_test``, ...).
    """

    data: bytes
    source: str
    device_id: str = ""
    generation_timestamp_ns: int = 0
    sequence_id: int = -1
    fallback: bool = False
    fallback_reason: str = ""
    #: "ok" (tests passed), "off" (no tests run), or "failed:<test>"
    health: str = "off"
    #: wall time spent fetching the batch this chunk belongs to
    fetch_latency_ns: int = 0

    def as_fallback(self, reason: str) -> EntropyChunk:
        """The same chunk labelled as served by a fallback for ``reason``."""
        return replace(self, fallback=True, fallback_reason=reason)


class EntropySource(ABC):
    """A source of random bytes.

    Implementations return exactly one chunk per requested size, each exactly
    that long, or raise :class:`~qr_sampler.errors.EntropyError`. They are
    created lazily-safe: no network or device activity in ``__init__``.
    """

    #: registry name (the entry-point name)
    name: ClassVar[str] = "abstract"

    @classmethod
    def from_settings(cls, settings: QRSettings) -> EntropySource:
        """Build the source from process settings (override when it has options)."""
        return cls()

    @abstractmethod
    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        """Fetch one chunk per entry of ``sizes``, in as few round trips as possible."""

    def fetch_one(self, n: int) -> EntropyChunk:
        return self.fetch([n])[0]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or devices."""

    def describe(self) -> dict[str, object]:
        """Start-up description for logs (never secrets)."""
        return {"source": self.name}


def now_ns() -> int:
    return time.time_ns()


def split_chunks(
    data: bytes,
    sizes: Sequence[int],
    *,
    source: str,
    device_id: str = "",
    generation_timestamp_ns: int = 0,
    sequence_id: int = -1,
    health: str = "off",
    fetch_latency_ns: int = 0,
) -> list[EntropyChunk]:
    """Cut one buffer into per-consumer chunks sharing one provenance."""
    if len(data) != sum(sizes):
        raise ValueError(f"buffer holds {len(data)} bytes, sizes need {sum(sizes)}")
    out: list[EntropyChunk] = []
    offset = 0
    for n in sizes:
        out.append(
            EntropyChunk(
                data=data[offset : offset + n],
                source=source,
                device_id=device_id,
                generation_timestamp_ns=generation_timestamp_ns,
                sequence_id=sequence_id,
                health=health,
                fetch_latency_ns=fetch_latency_ns,
            )
        )
        offset += n
    return out
