"""Entropy sources: bytes with provenance."""

from qr_sampler.entropy.base import EntropyChunk, EntropySource
from qr_sampler.entropy.fallback import FallbackSource
from qr_sampler.entropy.mock import MockUniformSource
from qr_sampler.entropy.registry import available, build_entropy, build_source, register
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.entropy.timing import TimingNoiseSource

__all__ = [
    "EntropyChunk",
    "EntropySource",
    "FallbackSource",
    "MockUniformSource",
    "SystemEntropySource",
    "TimingNoiseSource",
    "available",
    "build_entropy",
    "build_source",
    "register",
]
