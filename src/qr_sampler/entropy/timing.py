"""``timing_noise``: CPU timing jitter (experimental).

Each output byte is formed from the low bits of many ``perf_counter_ns``
deltas around a tiny busy loop, whitened with SHA-256. The quality depends on
the machine; the source warns once when first used.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import Sequence
from typing import ClassVar

from qr_sampler.entropy.base import EntropyChunk, EntropySource, split_chunks

logger = logging.getLogger(__name__)

#: raw timing samples hashed per 32 output bytes
_SAMPLES_PER_BLOCK = 64


def jitter_bytes(n: int) -> bytes:
    """``n`` bytes derived from CPU timing jitter (SHA-256 conditioned)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        raw = bytearray()
        for _ in range(_SAMPLES_PER_BLOCK):
            t0 = time.perf_counter_ns()
            x = 0
            for i in range(16):
                x ^= i * counter
            raw += ((time.perf_counter_ns() - t0) & 0xFFFF).to_bytes(2, "little")
        counter += 1
        out += hashlib.sha256(bytes(raw) + counter.to_bytes(8, "little")).digest()
    return bytes(out[:n])


class TimingNoiseSource(EntropySource):
    """Experimental entropy from CPU timing jitter."""

    name: ClassVar[str] = "timing_noise"
    _warned: ClassVar[bool] = False

    def __init__(self) -> None:
        self._device_id = f"timing@{socket.gethostname()}"

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        if not TimingNoiseSource._warned:
            TimingNoiseSource._warned = True
            logger.warning(
                "timing_noise is experimental: CPU jitter is not a characterised physical "
                "source; do not use it for experiments"
            )
        start = time.perf_counter_ns()
        data = jitter_bytes(sum(sizes))
        return split_chunks(
            data,
            sizes,
            source=self.name,
            device_id=self._device_id,
            generation_timestamp_ns=time.time_ns(),
            fetch_latency_ns=time.perf_counter_ns() - start,
        )
