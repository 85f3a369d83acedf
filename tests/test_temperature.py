"""Temperature strategies (qr_sampler.sampling.temperature) against float64
references written here: H = -sum p ln p of softmax(logits) at T = 1, and
EDT T = base * (H / ln V) ** exponent clamped to [min, max]."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qr_sampler.sampling.temperature import edt_temperature, shannon_entropy, temperatures


def ref_entropy(row: np.ndarray) -> float:
    x = row.astype(np.float64)
    finite = x[np.isfinite(x)]
    m = finite.max()
    w = np.exp(finite - m)
    p = w / w.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def ref_edt(h: float, vocab: int, base: float, exponent: float, lo: float, hi: float) -> float:
    t = base * (h / math.log(vocab)) ** exponent
    return min(max(t, lo), hi)


def _logits(seed: int, rows: int, vocab: int, inf_fraction: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = (rng.normal(size=(rows, vocab)) * rng.uniform(0.1, 6.0, size=(rows, 1))).astype(
        np.float32
    )
    mask = rng.random((rows, vocab)) < inf_fraction
    mask[:, 0] = False
    out[mask] = -np.inf
    return out


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 32),
    vocab=st.integers(2, 500),
    inf_fraction=st.sampled_from([0.0, 0.5, 0.99]),
)
def test_entropy_matches_reference(seed: int, rows: int, vocab: int, inf_fraction: float) -> None:
    logits = _logits(seed, rows, vocab, inf_fraction)
    h = shannon_entropy(torch.from_numpy(logits))
    assert h.dtype == torch.float32 and h.shape == (rows,)
    for i in range(rows):
        assert float(h[i]) == pytest.approx(ref_entropy(logits[i]), rel=1e-4, abs=1e-5)


def test_entropy_extremes() -> None:
    vocab = 1000
    uniform = torch.zeros(1, vocab)
    one_hot = torch.full((1, vocab), float("-inf"))
    one_hot[0, 3] = 1.0
    h = shannon_entropy(torch.cat([uniform, one_hot]))
    assert float(h[0]) == pytest.approx(math.log(vocab), rel=1e-6)
    assert float(h[1]) == 0.0


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 32),
    vocab=st.integers(2, 500),
)
def test_edt_and_fixed_per_row_match_reference(seed: int, rows: int, vocab: int) -> None:
    rng = np.random.default_rng(seed)
    logits = _logits(seed, rows, vocab, 0.2)
    is_edt = rng.random(rows) < 0.5
    fixed = rng.uniform(0.0, 3.0, rows)
    base = rng.uniform(0.0, 3.0, rows)
    exponent = rng.uniform(0.0, 3.0, rows)
    lo = rng.uniform(0.0, 1.0, rows)
    hi = lo + rng.uniform(0.0, 2.0, rows)

    def f(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32)

    t, h = temperatures(
        torch.from_numpy(logits),
        torch.from_numpy(is_edt),
        f(fixed),
        f(base),
        f(exponent),
        f(lo),
        f(hi),
    )
    for i in range(rows):
        href = ref_entropy(logits[i])
        assert float(h[i]) == pytest.approx(href, rel=1e-4, abs=1e-5)
        if is_edt[i]:
            # T is EDT of an entropy within float32 accuracy of the exact one (a small
            # H has a large relative error, which the exponent multiplies)
            dh = 1e-5 * href + 1e-6
            t_lo = ref_edt(max(href - dh, 0.0), vocab, base[i], exponent[i], lo[i], hi[i])
            t_hi = ref_edt(href + dh, vocab, base[i], exponent[i], lo[i], hi[i])
            assert t_lo * (1 - 1e-5) - 1e-7 <= float(t[i]) <= t_hi * (1 + 1e-5) + 1e-7
            assert float(lo[i]) - 1e-6 <= float(t[i]) <= float(hi[i]) + 1e-6
        else:
            assert float(t[i]) == pytest.approx(fixed[i], rel=1e-7)


def test_edt_follows_entropy() -> None:
    """More uncertain rows get hotter; a certain row gets the lower clamp."""
    vocab = 64
    sharp = torch.full((1, vocab), -10.0)
    sharp[0, 0] = 10.0
    medium = torch.linspace(0, -6, vocab).unsqueeze(0)
    flat = torch.zeros(1, vocab)
    h = shannon_entropy(torch.cat([sharp, medium, flat]))
    assert float(h[0]) < float(h[1]) < float(h[2])

    def full(v: float) -> torch.Tensor:
        return torch.full((3,), v)

    t = edt_temperature(h, vocab, full(0.8), full(0.5), full(0.1), full(2.0))
    assert float(t[0]) < float(t[1]) < float(t[2])
    assert float(t[2]) == pytest.approx(0.8, rel=1e-5)  # H = ln V: T = base
    certain = torch.full((1, vocab), float("-inf"))
    certain[0, 5] = 0.0
    h0 = shannon_entropy(certain)
    t0 = edt_temperature(h0, vocab, full(0.8)[:1], full(0.5)[:1], full(0.1)[:1], full(2.0)[:1])
    assert float(t0[0]) == pytest.approx(0.1)
