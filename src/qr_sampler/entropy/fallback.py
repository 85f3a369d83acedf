"""A wrapper that serves a fallback source when the primary fails — never silently."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import ClassVar

from qr_sampler.entropy.base import EntropyChunk, EntropySource
from qr_sampler.errors import EntropyError, EntropyReplyError

logger = logging.getLogger(__name__)


def _check_reply(name: str, chunks: Sequence[EntropyChunk], sizes: Sequence[int]) -> None:
    """Short, missing or surplus bytes are a failure, never entropy."""
    if len(chunks) != len(sizes):
        raise EntropyReplyError(f"{name} returned {len(chunks)} chunks for {len(sizes)} requests")
    for chunk, n in zip(chunks, sizes, strict=True):
        if len(chunk.data) != n:
            raise EntropyReplyError(f"{name} returned {len(chunk.data)} bytes where {n} were asked")


class FallbackSource(EntropySource):
    """Try ``primary``; when it fails serve ``fallback`` with a label.

    A failure is an :class:`EntropyError`, any other exception from the primary,
    or a reply with the wrong number of chunks or bytes (``bad_reply``). With
    ``fallback=None`` (fallback mode ``error``) the failure propagates as an
    :class:`EntropyError`. Every chunk served by the fallback has ``fallback=True`` and
    ``fallback_reason`` set to the failure's reason and message.
    ``on_fallback`` is called once per fallback batch (metrics hook).
    """

    name: ClassVar[str] = "fallback"

    def __init__(
        self,
        primary: EntropySource,
        fallback: EntropySource | None,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self._on_fallback = on_fallback
        self._degraded = False

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        try:
            chunks = self.primary.fetch(sizes)
            _check_reply(self.primary.name, chunks, sizes)
        except Exception as raw:
            # any failure of the primary (a plugin may raise OSError...) is an
            # entropy failure: labelled fallback, or an EntropyError in error mode
            exc = (
                raw
                if isinstance(raw, EntropyError)
                else EntropyError(f"{type(raw).__name__}: {raw}")
            )
            if self.fallback is None:
                if exc is raw:
                    raise
                raise exc from raw
            reason = f"{exc.reason}: {exc}"[:200]
            if not self._degraded:
                self._degraded = True
                logger.warning(
                    "entropy source %s failed (%s); serving %s, every token labelled fallback",
                    self.primary.name,
                    reason,
                    self.fallback.name,
                )
            if self._on_fallback is not None:
                self._on_fallback(exc.reason)
            served = [c.as_fallback(reason) for c in self.fallback.fetch(sizes)]
            health = getattr(exc, "health", None)  # a failed health test: "failed:rct", ...
            if isinstance(health, str):
                served = [replace(c, health=health) for c in served]
            return served
        if self._degraded:
            self._degraded = False
            logger.warning("entropy source %s recovered", self.primary.name)
        return chunks

    def close(self) -> None:
        self.primary.close()
        if self.fallback is not None:
            self.fallback.close()

    def describe(self) -> dict[str, object]:
        info = dict(self.primary.describe())
        info["fallback"] = self.fallback.name if self.fallback else "error"
        return info
