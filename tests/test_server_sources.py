"""The serve command's byte generators (qr_sampler.server.sources): the
urandom source draws large requests in pieces on several threads at once."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from qr_sampler import threads
from qr_sampler.server import sources


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Each os.urandom call's size and thread (the real generator still runs)."""
    seen: list[tuple[int, int]] = []
    real: Callable[[int], bytes] = os.urandom

    def spy(n: int) -> bytes:
        seen.append((n, threading.get_ident()))
        return real(n)

    monkeypatch.setattr(os, "urandom", spy)
    return seen


@pytest.mark.parametrize(
    "n",
    [0, 1, 20_480, sources.PARALLEL_BYTES - 1, sources.PARALLEL_BYTES, 1_310_720, 1_310_723],
)
def test_exactly_n_bytes(n: int) -> None:
    assert len(sources.urandom(n)) == n


def test_a_token_is_one_call_in_the_calling_thread(calls: list[tuple[int, int]]) -> None:
    sources.urandom(20_480)
    assert calls == [(20_480, threading.get_ident())]


def test_a_batch_is_drawn_in_pieces_on_several_threads(
    calls: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    n = 64 * 20_480
    data = sources.urandom(n)
    assert len(data) == n
    assert sorted(size for size, _ in calls) == [n // 2, n // 2]
    assert len({thread for _, thread in calls}) == 2
    assert data[: n // 2] != data[n // 2 :]


def test_one_core_draws_in_one_piece(
    calls: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: 1)
    sources.urandom(1 << 20)
    assert calls == [(1 << 20, threading.get_ident())]


def test_pieced_bytes_are_uniform() -> None:
    """Byte frequencies of 4 MiB drawn in pieces: chi-square against uniform
    (a false failure at p < 1e-6: one run in a million)."""
    data = np.frombuffer(sources.urandom(4 << 20), dtype=np.uint8)
    counts = np.bincount(data, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6
