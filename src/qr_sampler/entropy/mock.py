"""``mock_uniform``: seeded, genuinely uniform bytes (for tests), optional bias."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from qr_sampler.entropy.base import EntropyChunk, EntropySource, split_chunks

if TYPE_CHECKING:
    from qr_sampler.config import QRSettings


class MockUniformSource(EntropySource):
    """Uniform bytes from a seeded PCG64 generator.

    With ``bias`` = 0 every byte value 0..255 is equally likely. A non-zero
    ``bias`` shifts the expected byte mean by exactly ``bias``: each byte is
    drawn from the uniform distribution with probability 1 - |bias|/b and set
    to the extreme b (255 for positive bias, 0 for negative) otherwise, where
    b = 127.5 is the distance from the mean to that extreme.
    """

    name: ClassVar[str] = "mock_uniform"

    def __init__(self, seed: int = 0, bias: float = 0.0) -> None:
        if not -127.5 <= bias <= 127.5:
            raise ValueError("bias must be within [-127.5, 127.5]")
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._bias = float(bias)
        self._lock = threading.Lock()
        self._seed = seed

    @classmethod
    def from_settings(cls, settings: QRSettings) -> MockUniformSource:
        return cls(seed=settings.mock_seed, bias=settings.mock_bias)

    def random_bytes(self, n: int) -> bytes:
        with self._lock:
            values = self._rng.integers(0, 256, size=n, dtype=np.uint8)
            if self._bias:
                replace = self._rng.random(n) < abs(self._bias) / 127.5
                values[replace] = 255 if self._bias > 0 else 0
        return values.tobytes()

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        start = time.perf_counter_ns()
        data = self.random_bytes(sum(sizes))
        return split_chunks(
            data,
            sizes,
            source=self.name,
            device_id=f"mock:seed={self._seed}:bias={self._bias:g}",
            generation_timestamp_ns=time.time_ns(),
            fetch_latency_ns=time.perf_counter_ns() - start,
        )
