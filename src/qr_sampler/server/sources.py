"""Byte generators the ``serve`` command offers (``--source``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from qr_sampler.entropy.timing import jitter_bytes


def urandom(n: int) -> bytes:
    """The operating system's CSPRNG (for testing and deployments without hardware)."""
    return os.urandom(n)


def timing(n: int) -> bytes:
    """CPU timing jitter, SHA-256 conditioned (experimental; slow)."""
    return jitter_bytes(n)


#: name → (generator, runs fast enough to call on the event loop)
SOURCES: dict[str, tuple[Callable[[int], bytes], bool]] = {
    "urandom": (urandom, True),
    "timing": (timing, False),
}

__all__ = ["SOURCES", "timing", "urandom"]
