"""``system``: the operating system's CSPRNG (``os.urandom``)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import ClassVar

from qr_sampler.entropy.base import EntropyChunk, EntropySource, split_chunks


class SystemEntropySource(EntropySource):
    """OS entropy. Not a physical experiment source: use it for testing and fallback."""

    name: ClassVar[str] = "system"

    def __init__(self) -> None:
        self._device_id = f"os.urandom@{socket.gethostname()}"

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        start = time.perf_counter_ns()
        data = os.urandom(sum(sizes))
        stamp = time.time_ns()
        return split_chunks(
            data,
            sizes,
            source=self.name,
            device_id=self._device_id,
            generation_timestamp_ns=stamp,
            fetch_latency_ns=time.perf_counter_ns() - start,
        )
