"""Local entropy sources (system, timing_noise, mock_uniform), the fallback
wrapper, and the registry — including a third-party source found through a real
``qr_sampler.entropy_sources`` entry point (a dist-info folder on sys.path)."""

from __future__ import annotations

import logging
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from scipy import stats

from qr_sampler.config import QRSettings, load_settings
from qr_sampler.entropy import registry
from qr_sampler.entropy.base import EntropyChunk, EntropySource, split_chunks
from qr_sampler.entropy.fallback import FallbackSource
from qr_sampler.entropy.mock import MockUniformSource
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.entropy.timing import TimingNoiseSource
from qr_sampler.errors import (
    ConfigError,
    EntropyError,
    EntropyReplyError,
    EntropyUnavailableError,
)

SIZES = [1, 7, 20480, 3]


def _settings(**env: str) -> QRSettings:
    return load_settings(env={"QR_" + k.upper(): v for k, v in env.items()}, env_file=None)


def _chi_square_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def _check_chunks(chunks: list[EntropyChunk], sizes: Sequence[int], source: str) -> None:
    assert [len(c.data) for c in chunks] == list(sizes)
    for c in chunks:
        assert c.source == source
        assert c.device_id
        assert not c.fallback and c.fallback_reason == ""
        assert c.fetch_latency_ns >= 0


# ---------------------------------------------------------------------------
# built-in sources


def test_system_source_lengths_and_provenance() -> None:
    src = SystemEntropySource()
    before = time.time_ns()
    chunks = src.fetch(SIZES)
    after = time.time_ns()
    _check_chunks(chunks, SIZES, "system")
    for c in chunks:
        assert before <= c.generation_timestamp_ns <= after
        assert c.health == "off"
    assert src.fetch([32])[0].data != src.fetch([32])[0].data
    assert src.describe()["source"] == "system"


def test_system_bytes_are_uniform() -> None:
    """1 MB of os.urandom: chi-square over 256 byte values. Under the null the
    p-value is uniform, so p > 1e-5 fails falsely with probability 1e-5."""
    data = SystemEntropySource().fetch([1 << 20])[0].data
    assert _chi_square_bytes(data) > 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1])
def test_mock_uniform_bytes_pass_chi_square_on_1mb(seed: int) -> None:
    """Seeded, so deterministic; the threshold p > 1e-4 would also hold for
    unseeded uniform bytes 9,999 times in 10,000."""
    data = MockUniformSource(seed=seed).fetch([1 << 20])[0].data
    assert _chi_square_bytes(data) > 1e-4
    # adjacent pairs, by high nibbles (256 cells, 4,096 expected each): no serial structure
    arr = np.frombuffer(data, dtype=np.uint8)
    pairs = (arr[:-1:2] >> 4).astype(np.int64) * 16 + (arr[1::2] >> 4)
    assert stats.chisquare(np.bincount(pairs, minlength=256)).pvalue > 1e-4


def test_mock_uniform_is_seeded_and_chunking_does_not_change_the_stream() -> None:
    a = MockUniformSource(seed=42)
    b = MockUniformSource(seed=42)
    whole = a.fetch([100])[0].data
    parts = b.fetch([30, 70])
    assert parts[0].data + parts[1].data == whole
    assert MockUniformSource(seed=43).fetch([100])[0].data != whole
    _check_chunks(parts, [30, 70], "mock_uniform")
    assert parts[0].device_id == "mock:seed=42:bias=0"


@pytest.mark.parametrize("bias", [0.5, -0.5, 3.0])
def test_mock_bias_shifts_the_byte_mean_by_exactly_bias(bias: float) -> None:
    """Mean of 2 MB of biased bytes is 127.5 + bias within 5 standard errors
    (sigma / sqrt(n) = 0.051); seeded. 0.5 is 9.8 standard errors from 127.5."""
    n = 2 << 20
    data = MockUniformSource(seed=9, bias=bias).fetch([n])[0].data
    mean = float(np.frombuffer(data, dtype=np.uint8).mean())
    assert abs(mean - (127.5 + bias)) < 5 * 73.9 / math.sqrt(n)


def test_mock_from_settings_and_bad_bias() -> None:
    src = registry.build_source(_settings(entropy_source_type="mock_uniform", mock_seed="5"))
    assert isinstance(src, MockUniformSource)
    assert src.fetch([16])[0].data == MockUniformSource(seed=5).fetch([16])[0].data
    with pytest.raises(ValueError, match="bias"):
        MockUniformSource(bias=200.0)


def test_timing_noise_warns_once_and_returns_exact_lengths(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TimingNoiseSource, "_warned", False)
    src = TimingNoiseSource()
    with caplog.at_level(logging.WARNING, logger="qr_sampler.entropy.timing"):
        chunks = src.fetch([5, 64, 1])
        src.fetch([8])
        TimingNoiseSource().fetch([8])
    warnings = [r for r in caplog.records if "experimental" in r.getMessage()]
    assert len(warnings) == 1
    _check_chunks(chunks, [5, 64, 1], "timing_noise")


def test_timing_noise_bytes_look_uniform() -> None:
    """32 KB of conditioned jitter bytes; p > 1e-5 fails falsely 1 in 100,000 if
    the output is uniform (it is SHA-256 output)."""
    data = TimingNoiseSource().fetch([32768])[0].data
    assert _chi_square_bytes(data) > 1e-5
    assert len(set(TimingNoiseSource().fetch([32] * 4)[i].data for i in range(4))) == 4


def test_split_chunks_checks_the_total() -> None:
    chunks = split_chunks(b"abcdef", [2, 4], source="x", sequence_id=3)
    assert [c.data for c in chunks] == [b"ab", b"cdef"]
    assert all(c.sequence_id == 3 for c in chunks)
    with pytest.raises(ValueError):
        split_chunks(b"abc", [2, 2], source="x")


# ---------------------------------------------------------------------------
# fallback wrapper


class FlakySource(EntropySource):
    """A real source that fails on demand, in the ways a real one can."""

    name: ClassVar[str] = "flaky"

    def __init__(self) -> None:
        self.mode = "ok"
        self.closed = False

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        if self.mode == "unavailable":
            raise EntropyUnavailableError("connection refused")
        if self.mode == "oserror":
            raise OSError("device unplugged")
        data = bytes(range(256)) * (sum(sizes) // 256 + 1)
        chunks = split_chunks(data[: sum(sizes)], sizes, source=self.name, device_id="flaky-1")
        if self.mode == "short":
            chunks[-1] = EntropyChunk(data=chunks[-1].data[:-1], source=self.name)
        if self.mode == "missing":
            chunks = chunks[:-1]
        return chunks

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("unavailable", "unavailable: connection refused"),
        ("oserror", "error: OSError: device unplugged"),
        ("short", "bad_reply: flaky returned 2 bytes where 3 were asked"),
        ("missing", "bad_reply: flaky returned 1 chunks for 2 requests"),
    ],
)
def test_fallback_labels_every_chunk(mode: str, reason: str) -> None:
    primary = FlakySource()
    seen: list[str] = []
    src = FallbackSource(primary, MockUniformSource(seed=1), on_fallback=seen.append)
    primary.mode = mode
    chunks = src.fetch([5, 3])
    assert [len(c.data) for c in chunks] == [5, 3]
    for c in chunks:
        assert c.fallback and c.source == "mock_uniform"
        assert c.fallback_reason == reason
    assert seen == [reason.split(":")[0]]


def test_fallback_error_mode_raises_an_entropy_error() -> None:
    primary = FlakySource()
    src = FallbackSource(primary, None)
    for mode, kind in [
        ("unavailable", EntropyUnavailableError),
        ("oserror", EntropyError),
        ("short", EntropyReplyError),
    ]:
        primary.mode = mode
        with pytest.raises(kind):
            src.fetch([4, 3])
    primary.mode = "ok"
    assert [c.data for c in src.fetch([2])] == [b"\x00\x01"]
    assert src.describe()["fallback"] == "error"


def test_fallback_recovers_and_logs_each_transition_once(caplog: pytest.LogCaptureFixture) -> None:
    primary = FlakySource()
    fallback = MockUniformSource(seed=2)
    src = FallbackSource(primary, fallback)
    with caplog.at_level(logging.WARNING, logger="qr_sampler.entropy.fallback"):
        primary.mode = "unavailable"
        src.fetch([4])
        src.fetch([4])
        primary.mode = "ok"
        good = src.fetch([4])
        src.fetch([4])
    assert not good[0].fallback and good[0].source == "flaky"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed" in m for m in messages) == 1
    assert sum("recovered" in m for m in messages) == 1
    assert src.describe() == {"source": "flaky", "fallback": "mock_uniform"}
    src.close()
    assert primary.closed


# ---------------------------------------------------------------------------
# registry


def test_builtin_sources_are_registered_by_entry_point() -> None:
    names = registry.available()
    for name in ("system", "timing_noise", "mock_uniform"):
        assert name in names
        cls = registry.get_source_class(name)
        assert cls.name == name


def test_unknown_source_names_the_setting_and_lists_choices() -> None:
    with pytest.raises(ConfigError) as info:
        registry.build_source(_settings(entropy_source_type="nope"))
    message = str(info.value)
    assert message.startswith("QR_ENTROPY_SOURCE_TYPE: unknown source 'nope'")
    assert "system" in message and "mock_uniform" in message


def test_build_entropy_wraps_per_fallback_mode() -> None:
    wrapped = registry.build_entropy(
        _settings(entropy_source_type="mock_uniform", fallback_mode="system")
    )
    assert isinstance(wrapped, FallbackSource)
    assert isinstance(wrapped.primary, MockUniformSource)
    assert isinstance(wrapped.fallback, SystemEntropySource)
    strict = registry.build_entropy(
        _settings(entropy_source_type="mock_uniform", fallback_mode="error")
    )
    assert isinstance(strict, FallbackSource) and strict.fallback is None
    same = registry.build_entropy(_settings(entropy_source_type="system", fallback_mode="system"))
    assert isinstance(same, SystemEntropySource)


def test_in_process_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._extra, "flaky_test", FlakySource)
    assert "flaky_test" in registry.available()
    src = registry.build_entropy(_settings(entropy_source_type="flaky_test"))
    assert isinstance(src, FallbackSource) and isinstance(src.primary, FlakySource)


PLUGIN = '''
from qr_sampler.entropy.base import EntropySource, split_chunks


class LabSource(EntropySource):
    """A third-party source: a counter, seeded from the settings."""

    name = "lab_counter"

    def __init__(self, start):
        self.start = start

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.mock_seed % 256)

    def fetch(self, sizes):
        data = bytes((self.start + i) % 256 for i in range(sum(sizes)))
        return split_chunks(data, sizes, source=self.name, device_id="lab-7")


class NotASource:
    pass
'''


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install a third-party distribution the way pip lays one out: a module and
    a dist-info folder whose entry_points.txt names it in our group."""
    (tmp_path / "qr_lab_plugin.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    info = tmp_path / "qr_lab_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qr-lab-plugin\nVersion: 1.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[qr_sampler.entropy_sources]\n"
        "lab_counter = qr_lab_plugin:LabSource\n"
        "lab_broken = qr_lab_plugin:NotASource\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "qr_lab_plugin", raising=False)
    return tmp_path


@pytest.mark.usefixtures("plugin_on_path")
def test_third_party_source_through_entry_point() -> None:
    assert "lab_counter" in registry.available()
    settings = _settings(entropy_source_type="lab_counter", mock_seed="10")
    src = registry.build_entropy(settings)
    assert isinstance(src, FallbackSource)
    assert type(src.primary).__module__ == "qr_lab_plugin"
    chunks = src.fetch([3, 2])
    assert [c.data for c in chunks] == [bytes([10, 11, 12]), bytes([13, 14])]
    assert all(c.source == "lab_counter" and c.device_id == "lab-7" for c in chunks)
    assert not any(c.fallback for c in chunks)
    with pytest.raises(ConfigError, match="QR_ENTROPY_SOURCE_TYPE: entry point 'lab_broken'"):
        registry.build_source(_settings(entropy_source_type="lab_broken"))
