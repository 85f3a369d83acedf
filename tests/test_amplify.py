"""Signal amplification (qr_sampler.sampling.amplify): z and u from bytes.

Statistical tests here either use a fixed seed (mock_uniform) or enough samples
that a false failure is below 1 in 10,000; each docstring gives the reasoning.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
from scipy import stats

from qr_sampler.config import UNIFORM_BYTE_STD
from qr_sampler.entropy.mock import MockUniformSource
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.sampling.amplify import (
    amplify,
    amplify_means,
    normal_cdf,
    row_byte_sums,
    sample_means,
)

SIGMA = math.sqrt((256**2 - 1) / 12)
WRONG_SIGMA = 255 / math.sqrt(12)


def test_exact_sigma_constant() -> None:
    assert UNIFORM_BYTE_STD == SIGMA
    # the variance of a uniform byte, from its definition
    values = np.arange(256, dtype=np.float64)
    assert math.isclose(SIGMA**2, float(np.mean((values - 127.5) ** 2)), rel_tol=1e-15)
    assert abs(SIGMA - WRONG_SIGMA) > 0.28


def test_z_and_u_by_hand() -> None:
    n = 20480
    chunks = [bytes([255]) * n, bytes([0]) * n, bytes([127, 128]) * (n // 2), bytes([130]) * n]
    amp = amplify(chunks, epsilon=1e-10)
    scale = SIGMA / math.sqrt(n)
    assert amp.sample_mean.tolist() == [255.0, 0.0, 127.5, 130.0]
    assert amp.z[0] == pytest.approx(127.5 / scale, rel=1e-12)
    assert amp.z[1] == pytest.approx(-127.5 / scale, rel=1e-12)
    assert amp.z[2] == 0.0 and amp.u[2] == 0.5
    assert amp.z[3] == pytest.approx(2.5 / scale, rel=1e-12)
    assert amp.u[3] == pytest.approx(0.5 * math.erfc(-(2.5 / scale) / math.sqrt(2)), rel=1e-12)
    # clamped to [eps, 1 - eps]
    assert amp.u[0] == 1 - 1e-10 and amp.u[1] == 1e-10


def test_per_row_parameters_and_unequal_lengths() -> None:
    rng = np.random.default_rng(11)
    chunks = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (10, 300, 7, 4096)]
    mus = np.array([127.5, 100.0, 127.5, 130.0])
    sds = np.array([SIGMA, 50.0, 10.0, SIGMA])
    eps = np.array([1e-10, 1e-3, 0.25, 1e-10])
    amp = amplify(chunks, population_mean=mus, population_std=sds, epsilon=eps)
    for i, c in enumerate(chunks):
        data = np.frombuffer(c, dtype=np.uint8)
        mean = int(data.sum()) / len(c)
        z = (mean - mus[i]) / (sds[i] / math.sqrt(len(c)))
        u = min(max(0.5 * math.erfc(-z / math.sqrt(2)), eps[i]), 1 - eps[i])
        assert amp.sample_mean[i] == mean
        assert amp.z[i] == pytest.approx(z, rel=1e-12, abs=1e-15)
        assert amp.u[i] == pytest.approx(u, rel=1e-12)


def test_sample_means_exact_for_large_chunks() -> None:
    n = 1_048_576
    means = sample_means([bytes([255]) * n, bytes([1]) * (n - 1) + bytes([0])])
    assert means[0] == 255.0
    assert means[1] == (n - 1) / n
    assert sample_means([]).shape == (0,)
    with pytest.raises(ValueError):
        sample_means([b"abc", b""])


@pytest.mark.parametrize(
    "n", [1, 255, 256, 257, 1_023, 1_024, 1_025, 20_480, 20_481, 70_000, 262_144, 300_001]
)
def test_row_byte_sums_are_exact_integer_sums(n: int) -> None:
    """Lengths around the lane width (1,024) and the fold limit (256 slices,
    262,144 bytes), where a uint16 lane would overflow one slice later."""
    rng = np.random.default_rng(n)
    block = rng.integers(0, 256, size=(5, n), dtype=np.uint8)
    block[0] = 255  # the largest partial sums: 256 x 255 per uint16 lane
    block[1] = 0
    expected = [sum(int(v) for v in row.tobytes()) for row in block]
    assert row_byte_sums(block).tolist() == expected
    assert row_byte_sums(block).dtype == np.uint64
    chunks = [row.tobytes() for row in block]
    assert sample_means(chunks).tolist() == [e / n for e in expected]


def test_normal_cdf_is_math_erfc_bit_for_bit() -> None:
    """Each u is exactly 0.5 * math.erfc(-z / sqrt 2) in Python floats (the
    analysis tools recompute u from the recorded bytes that way)."""
    z = np.concatenate(
        [np.random.default_rng(4).standard_normal(5000) * 4, [0.0, -0.0, -40.0, 40.0, 1e-300]]
    )
    want = [0.5 * math.erfc(-float(v) / math.sqrt(2.0)) for v in z]
    assert normal_cdf(z).tolist() == want


def test_normal_cdf_in_both_tails() -> None:
    z = np.concatenate([np.linspace(-37, 37, 2001), [-8.5, 8.5, 0.0]])
    assert np.allclose(normal_cdf(z), stats.norm.cdf(z), rtol=1e-12, atol=0.0)
    # the lower tail keeps its relative precision (no 1 - Phi(-z) cancellation)
    assert normal_cdf(np.array([-30.0]))[0] == pytest.approx(4.906713927148187e-198, rel=1e-12)


def _system_u(n_tokens: int, sample_count: int) -> tuple[np.ndarray, np.ndarray]:
    source = SystemEntropySource()
    zs, us = [], []
    batch = 500
    for start in range(0, n_tokens, batch):
        chunks = source.fetch([sample_count] * min(batch, n_tokens - start))
        amp = amplify([c.data for c in chunks])
        zs.append(amp.z)
        us.append(amp.u)
    return np.concatenate(zs), np.concatenate(us)


def test_system_entropy_u_is_uniform_and_z_has_unit_variance() -> None:
    """20,000 tokens of 20,480 ``system`` bytes each (the default sample count).

    KS: under the null the KS p-value is uniform on [0, 1], so requiring
    p > 1e-5 fails falsely with probability 1e-5 (< 1e-4). u is not exactly
    continuous-uniform: z lives on a lattice of spacing 1/(sigma sqrt N) ~ 9.5e-5
    and the CLT leaves an O(1/N) kurtosis term, together moving the CDF by at most
    ~2e-5, about 0.1% of the critical KS distance at this n (~0.0175): the false
    failure rate stays ~1e-5.

    Var(z): with mean 0 known, mean(z^2) estimates Var(z) = 1 exactly (the
    variance of a mean of N iid bytes is sigma^2/N, no approximation). Its
    standard error is sqrt((E z^4 - 1)/n) = sqrt(2/n) = 0.01; accepting within
    4.5 standard errors fails falsely with probability 6.8e-6.
    """
    n = 20_000
    z, u = _system_u(n, 20480)
    assert np.all((u > 0) & (u < 1))
    assert stats.kstest(u, "uniform").pvalue > 1e-5
    se = math.sqrt(2 / n)
    assert abs(float(np.mean(z**2)) - 1.0) < 4.5 * se
    assert abs(float(np.mean(z))) < 4.5 / math.sqrt(n)


def test_exact_sigma_gives_unit_variance_and_the_textbook_sigma_is_detectable() -> None:
    """Var(z) = 1 holds for any number of bytes per token, so this uses N = 8
    bytes per z and n = 3,000,000 z values from ``system`` entropy.

    For a mean of 8 uniform bytes, E z^4 = 3 - 1.2/8 = 2.85, so mean(z^2) has
    standard error s = sqrt(1.85 / n) = 7.85e-4. Acceptance: |mean(z^2) - 1| < 4.5 s
    (false failure 6.8e-6, normal approximation of a mean of 3e6 iid terms).

    With 255/sqrt(12) instead of the exact sigma every z is multiplied by
    73.9003/73.6122, so mean(z^2) grows by the factor 1.00785 *on the same data*.
    If the exact-sigma statistic passed (>= 1 - 4.5 s), the wrong one is at least
    (1 - 4.5 s) * 1.00785 - 1 = 4.4e-3 = 5.6 s above 1: outside the acceptance band
    whenever the exact one is inside it. So the test is rigorous: the exact sigma
    passes except with probability 6.8e-6, and the textbook sigma then always fails.
    """
    n, per = 3_000_000, 8
    block = np.frombuffer(os.urandom(n * per), dtype=np.uint8).reshape(n, per)
    means = block.sum(axis=1, dtype=np.uint64) / per
    s = math.sqrt((3 - 1.2 / per - 1) / n)
    good = amplify_means(means, per, 127.5, SIGMA, 1e-10)
    wrong = amplify_means(means, per, 127.5, WRONG_SIGMA, 1e-10)
    v_good = float(np.mean(good.z**2))
    v_wrong = float(np.mean(wrong.z**2))
    assert abs(v_good - 1.0) < 4.5 * s, (v_good, s)
    assert abs(v_wrong - 1.0) > 4.5 * s, (v_wrong, s)
    assert v_wrong / v_good == pytest.approx((SIGMA / WRONG_SIGMA) ** 2, rel=1e-9)


def test_half_a_unit_per_byte_bias_is_detected() -> None:
    """mock_uniform with bias +0.5 per byte (seeded): over 2,000 tokens of 20,480
    bytes, u departs from uniform with KS p < 1e-6, and the mean z shift matches
    the prediction 0.5 sqrt(N) / sigma = 0.968 within 5 standard errors (the
    standard deviation of z barely changes under this bias; 1/sqrt(2000) = 0.022).
    The unbiased generator with the same seed passes the same KS test."""
    n, count = 2000, 20480
    for bias in (0.5, 0.0):
        src = MockUniformSource(seed=12345, bias=bias)
        zs, us = [], []
        for _ in range(n // 100):
            amp = amplify([c.data for c in src.fetch([count] * 100)])
            zs.append(amp.z)
            us.append(amp.u)
        z, u = np.concatenate(zs), np.concatenate(us)
        p = stats.kstest(u, "uniform").pvalue
        if bias:
            assert p < 1e-6
            shift = bias * math.sqrt(count) / SIGMA
            assert abs(float(np.mean(z)) - shift) < 5 * float(np.std(z)) / math.sqrt(n)
        else:
            assert p > 1e-4
            assert abs(float(np.mean(z))) < 5 / math.sqrt(n)


def test_large_batches_are_summed_in_parts_on_several_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch above PART_BYTES on a 4-core process: four parts of consecutive
    rows, on the caller and helper threads, giving exactly the one-part sums
    in row order."""
    from qr_sampler import threads
    from qr_sampler.sampling import amplify as amp

    rng = np.random.default_rng(7)
    rows, n = 205, 20_480  # 4.2 MB: four parts, the last one shorter
    block = rng.integers(0, 256, size=(rows, n), dtype=np.uint8)
    chunks = [row.tobytes() for row in block]
    expected = (block.sum(axis=1, dtype=np.uint64).astype(np.float64) / n).tolist()
    seen: list[tuple[int, int]] = []
    real = amp._joined_sums

    def spy(part: list[bytes]) -> np.ndarray:
        seen.append((len(part), threading.get_ident()))
        return real(part)

    monkeypatch.setattr(amp, "_joined_sums", spy)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    assert sample_means(chunks).tolist() == expected
    assert sorted(k for k, _ in seen) == [49, 52, 52, 52]
    # the caller sums the first part; the others go to the helper threads (an
    # idle helper may take two of them, so only "not all in the caller")
    assert (52, threading.get_ident()) in seen
    assert len({t for _, t in seen}) >= 2
    seen.clear()
    monkeypatch.setattr(threads, "usable_cpus", lambda: 1)
    assert sample_means(chunks).tolist() == expected
    assert seen == [(rows, threading.get_ident())]
    seen.clear()
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    small = chunks[: (amp.PART_BYTES // n) * 2 - 1]  # just under two parts' worth
    assert sample_means(small).tolist() == expected[: len(small)]
    assert [k for k, _ in seen] == [len(small)]
