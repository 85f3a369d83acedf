"""Byte generators the ``serve`` command offers (``--source``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from qr_sampler.entropy.timing import jitter_bytes
from qr_sampler.threads import parts_for, run_split

#: requests at least this large are drawn in pieces on several cores at once
#: (os.urandom releases the GIL while the kernel generates); below it a thread
#: hand-off costs more than it saves (20,480 bytes: 39 us alone, 115 us in two)
PARALLEL_BYTES = 256 * 1024


def urandom(n: int) -> bytes:
    """The operating system's CSPRNG (for testing and deployments without hardware).

    A large request (a whole batch's bytes, e.g. 64 rows x 20,480 = 1.3 MB) is
    drawn as up to :data:`qr_sampler.threads.MAX_PARTS` consecutive pieces on
    as many of the process's cores at once, each a fresh ``os.urandom`` call
    after the request arrived: 2.4 ms -> 1.4 ms for 1.3 MB on a 2-core host.
    The bytes are the kernel's either way.
    """
    pieces = parts_for(n, PARALLEL_BYTES // 2)
    if pieces < 2:
        return os.urandom(n)
    size = -(-n // pieces)
    return b"".join(run_split(os.urandom, [min(size, n - at) for at in range(0, n, size)]))


def timing(n: int) -> bytes:
    """CPU timing jitter, SHA-256 conditioned (experimental; slow)."""
    return jitter_bytes(n)


#: name → (generator, runs fast enough to call on the event loop)
SOURCES: dict[str, tuple[Callable[[int], bytes], bool]] = {
    "urandom": (urandom, True),
    "timing": (timing, False),
}

__all__ = ["SOURCES", "timing", "urandom"]
