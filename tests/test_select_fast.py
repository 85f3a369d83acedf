"""The fast selection path (chunked head, fused row statistics, the pipeline's
device step) gives the full-sort answer.

The claim under test (qr_sampler.sampling.select): the ``head_size`` chunks with
the largest maxima hold every token above tau, so after a stable sort of only
their tokens the leading ``exact`` positions are exactly the row's rank order
(value, then token id); rows decided there equal :func:`select_sorted`, rows
that are not are reported unresolved and recomputed by the full sort.

Rows whose answer float rounding could flip (u, a prefix mass or a probability
ratio near a threshold; ``support_sampling.ref_select`` flags them) are skipped
and counted; the sweep asserts they are rare. The CUDA test runs the compiled
path and is skipped where no GPU exists (CI); it was run on an H100/H200.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from support_sampling import RowSettings, f32, grid_logits, make_params, ref_select

from qr_sampler.config import SamplingConfig, load_settings
from qr_sampler.entropy.mock import MockUniformSource
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink
from qr_sampler.sampling import select as select_module
from qr_sampler.sampling.select import (
    Selection,
    SelectionParams,
    chunked_head,
    effective_temperature,
    log_normalizer,
    radix_eligible,
    row_stats,
    select,
    select_chunked,
    select_radix,
    select_sorted,
    select_tail,
    value_keys,
)
from qr_sampler.sampling.temperature import shannon_entropy


def _logits(rng: np.random.Generator, kind: str, rows: int, vocab: int) -> np.ndarray:
    """Test logits of several shapes: grid values (ties possible), heavy ties,
    -inf entries, bf16-rounded (many exact ties), peaked and flat rows."""
    if kind == "grid":
        return grid_logits(rng, rows, vocab, spread=8.0)
    if kind == "ties":
        return grid_logits(rng, rows, vocab, ties=True)
    if kind == "inf":
        return grid_logits(rng, rows, vocab, spread=4.0, inf_fraction=0.9)
    if kind == "bf16":
        x = torch.from_numpy(rng.standard_normal((rows, vocab)).astype(np.float32) * 4)
        return x.to(torch.bfloat16).float().numpy()
    if kind == "peaked":
        x = rng.standard_normal((rows, vocab)).astype(np.float32)
        x[:, rng.integers(0, vocab, 5)] += 12.0
        return x
    if kind == "flat":
        return (rng.standard_normal((rows, vocab)) * 0.3).astype(np.float32)
    raise ValueError(kind)


def _settings(rng: np.random.Generator, rows: int, vocab: int) -> list[RowSettings]:
    out = []
    for _ in range(rows):
        out.append(
            RowSettings(
                temperature=float(rng.choice([0.0, 0.3, 0.7, 1.0, 2.5])),
                top_k=int(rng.choice([0, 0, 1, 7, 50, 300, vocab + 2])),
                top_p=float(rng.choice([1.0, 1.0, 0.5, 0.9, 0.999])),
                min_p=float(rng.choice([0.0, 0.0, 0.01, 0.2])),
                u=float(rng.uniform(1e-10, 1 - 1e-10)),
            )
        )
    return out


def _check(
    sel: Selection, i: int, logits: np.ndarray, row: RowSettings, ref_sorted: Selection
) -> bool:
    """Row ``i`` equals the full sort (and the float64 reference); False if fragile."""
    ref = ref_select(logits[i], f32(row.temperature), row.top_k, row.top_p, row.min_p, row.u)
    if ref.fragile:
        return False
    assert int(sel.token_ids[i]) == ref.token == int(ref_sorted.token_ids[i]), (i, row, ref)
    assert int(sel.rank[i]) == ref.rank == int(ref_sorted.rank[i]), (i, row)
    assert float(sel.prob[i]) == pytest.approx(float(ref_sorted.prob[i]), rel=1e-5, abs=1e-12)
    assert float(sel.prob[i]) == pytest.approx(ref.prob, rel=1e-4, abs=1e-12)
    assert ref.n_cand_solid <= int(sel.num_candidates[i]) <= ref.n_cand, (i, row, ref)
    return True


KINDS = ["grid", "ties", "inf", "bf16", "peaked", "flat"]


def _checked_against_full_sort(
    logits: np.ndarray,
    rows: list[RowState],
    u: np.ndarray,
    token_ids: torch.Tensor,
    host: np.ndarray,
) -> int:
    """Check a pipeline's ``choose`` result (token ids and the host block) row
    by row against the full sort at the temperatures it applied; returns how
    many rows were checked (fragile ones are skipped)."""
    temps = torch.from_numpy(host[:, 5]).float()
    params = SelectionParams(
        temperature=temps,
        top_k=torch.tensor([r.config.top_k for r in rows]),
        top_p=torch.tensor([r.config.top_p for r in rows], dtype=torch.float64),
        min_p=torch.tensor([r.config.min_p for r in rows], dtype=torch.float64),
        u=torch.from_numpy(u),
    )
    ref_sorted = select_sorted(torch.from_numpy(logits), params)
    got = Selection(
        token_ids=token_ids,
        rank=torch.from_numpy(host[:, 1]).long(),
        prob=torch.from_numpy(host[:, 2]),
        num_candidates=torch.from_numpy(host[:, 3]).long(),
    )
    checked = 0
    for i, r in enumerate(rows):
        row = RowSettings(float(temps[i]), r.config.top_k, r.config.top_p, r.config.min_p, u[i])
        checked += _check(got, i, logits, row, ref_sorted)
    return checked


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("vocab", "head", "chunk"),
    [(1000, 8, 16), (1237, 32, 4), (3000, 4, 64), (3001, 8, 4), (2048, 16, 2)],
)
def test_exact_prefix_is_the_full_sort(kind: str, vocab: int, head: int, chunk: int) -> None:
    """The leading ``exact`` positions of the chunked head are the stable full
    sort's first positions, values and token ids alike. The last two shapes
    have at least 16 chunks per head chunk, so on the CPU the chunks are first
    taken by groups (3001: a partial group at the end) and the head ordered by
    one value-then-id key."""
    rng = np.random.default_rng(KINDS.index(kind) * 100_000 + vocab * 100 + head)
    logits = torch.from_numpy(_logits(rng, kind, 24, vocab))
    t = torch.tensor(rng.choice([0.3, 0.7, 1.0, 2.5], 24), dtype=torch.float32)
    vals, idx, exact = chunked_head(logits, t, head, chunk)
    x = torch.nan_to_num(logits / t.unsqueeze(1), nan=float("-inf"))
    full_vals, full_idx = torch.sort(x, dim=-1, descending=True, stable=True)
    covered = 0
    for i in range(24):
        n = int(exact[i])
        assert torch.equal(vals[i, :n], full_vals[i, :n]), i
        assert torch.equal(idx[i, :n], full_idx[i, :n]), i
        covered += n
    if kind != "ties":  # seven distinct values: every chunk's maximum ties at tau
        assert covered >= 24, "the exact head is too short to test anything"


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_selection_equals_full_sort(kind: str) -> None:
    """Every row the chunked head resolves equals the full sort; ``select``
    (head plus fallback) equals it on every row."""
    rng = np.random.default_rng(KINDS.index(kind) + 100)
    checked = skipped = resolved_rows = 0
    for vocab, head, chunk in [(2000, 16, 16), (1501, 64, 4), (4096, 8, 32), (3001, 8, 4)]:
        logits = _logits(rng, kind, 48, vocab)
        rows = _settings(rng, 48, vocab)
        x = torch.from_numpy(logits)
        params = make_params(rows)
        stats = row_stats(x, effective_temperature(params))
        assert stats.lse is not None
        fast, resolved = select_chunked(x, params, stats.lse, stats.num_finite, head, chunk)
        full = select(x, params, head_size=head)
        ref_sorted = select_sorted(x, params)
        for i, row in enumerate(rows):
            if not _check(full, i, logits, row, ref_sorted):
                skipped += 1
                continue
            checked += 1
            if bool(resolved[i]):
                resolved_rows += 1
                _check(fast, i, logits, row, ref_sorted)
    assert skipped <= 0.1 * (checked + skipped), (checked, skipped)
    if kind != "ties":  # all chunk maxima tie there: every row takes the full sort
        assert resolved_rows >= 0.3 * checked, "too few rows took the fast path to test it"


@pytest.mark.parametrize("given_stats", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_tail_histogram_equals_full_sort(kind: str, given_stats: bool) -> None:
    """Untruncated rows through the value-bucket histogram (no vocabulary sort)
    equal the full sort, whatever u (deep tails included); with
    ``given_stats`` the row statistics are given, as in the pipeline: rows
    whose u is below the top token's probability take it from them, the
    others reuse the normaliser. A NaN logit ranks as -inf (then the
    statistics are NaN, and the tail computes its own)."""
    rng = np.random.default_rng(KINDS.index(kind) + 300)
    vocab = 3000
    logits = _logits(rng, kind, 40, vocab)
    rows = [
        RowSettings(float(rng.choice([0.3, 0.7, 1.0, 2.5])), 0, 1.0, 0.0, float(u))
        for u in np.concatenate([rng.uniform(1e-10, 1 - 1e-10, 30), 1 - rng.uniform(0, 1e-3, 10)])
    ]
    params = make_params(rows)

    def tail_of(values: np.ndarray) -> Selection:
        x = torch.from_numpy(values)
        stats = row_stats(x, effective_temperature(params)) if given_stats else None
        return select_tail(x, params, stats)

    tail = tail_of(logits)
    ref_sorted = select_sorted(torch.from_numpy(logits), params)
    checked = sum(_check(tail, i, logits, row, ref_sorted) for i, row in enumerate(rows))
    assert checked >= 25, checked  # deep-tail rows are often fragile (tiny probabilities)
    with_nan, with_inf = logits.copy(), logits.copy()
    with_nan[3, 17], with_inf[3, 17] = np.nan, -np.inf
    a, b = tail_of(with_nan), tail_of(with_inf)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.rank, b.rank)
    # a row with a +inf logit and a row of -inf only (their rows' answers are
    # the exact fallback's business) leave the other rows' answers as they were
    odd = logits.copy()
    odd[5, 9], odd[6, :] = np.inf, -np.inf
    c = tail_of(odd)
    others = torch.tensor([i for i in range(len(rows)) if i not in (5, 6)])
    assert torch.equal(c.token_ids[others], tail.token_ids[others])
    assert torch.equal(c.rank[others], tail.rank[others])


def test_tail_pick_row_by_row_equals_all_rows_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's row-by-row end of the tail histogram (numpy) returns exactly
    what the all-rows torch version (the one GPUs use) returns on the same
    buckets: token, rank and probability to the bit, on every kind of row
    (ties, -inf, NaN, a +inf logit, a row of -inf only) and u from 1e-12 to
    just below 1, deep tails included. It fails if the bucket's tokens are
    ordered by id alone, or if u past a row's last nonzero mass is not held
    back."""
    calls: list[int] = []
    real = select_module._tail_pick_rows

    def both(tail: Any) -> Selection:
        got, want = real(tail), select_module._tail_pick_batched(tail)
        for name in ("token_ids", "rank", "prob", "num_candidates"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        calls.append(tail.x.shape[0])
        return got

    monkeypatch.setattr(select_module, "_tail_pick_rows", both)
    rng = np.random.default_rng(909)
    for kind in KINDS:
        logits = _logits(rng, kind, 32, 2500)
        logits[0, 11] = np.nan
        logits[1, 5] = np.inf
        logits[2, :] = -np.inf
        us = np.concatenate(
            [rng.uniform(1e-12, 1 - 1e-12, 24), [1e-12, 0.5], 1 - rng.uniform(0, 1e-6, 6)]
        )
        rows = [
            RowSettings(float(rng.choice([0.3, 0.7, 1.0, 2.5])), 0, 1.0, 0.0, float(u)) for u in us
        ]
        select_tail(torch.from_numpy(logits), make_params(rows))
    assert calls == [32] * len(KINDS)
    # u past the chosen bucket's mass, whose last tokens have probability 0
    # (rounding can leave u there): the last token of nonzero probability
    x = torch.tensor([[0.0, -1.0, -200.0, -300.0]])
    p = torch.tensor([[0.5, 0.3, 0.0, 0.0]], dtype=torch.float64)
    bucket = torch.zeros(1, 4, dtype=torch.int64)
    cum_mass = torch.tensor([[0.8] + [0.8] * (select_module.TAIL_BUCKETS - 1)])
    got = both(
        select_module._Tail(
            x, p, bucket, cum_mass, torch.tensor([0]), torch.tensor([0.9]), torch.tensor([4])
        )
    )
    assert (got.token_ids.item(), got.rank.item(), got.prob.item()) == (1, 1, 0.3)


def _spy_rows(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Wrap ``module.name``; the returned list receives the row count of the
    tensor passed first to each call."""
    calls: list[int] = []
    real = getattr(module, name)

    def spy(first: torch.Tensor, *args: Any) -> Any:
        calls.append(first.shape[0])
        return real(first, *args)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_tail_top_token_follows_the_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the row statistics given, rows whose u is below the most likely
    token's probability take that token without the histogram, as the full
    sort's first position: the first of the maxima of x = logits / T, also
    when two different logits round to the same x (the larger logit comes
    later: the earlier id wins) and for exact ties. The other rows go through
    the histogram, and only they."""
    vocab = 3000
    rng = np.random.default_rng(77)
    logits = (rng.standard_normal((5, vocab)) * 0.5).astype(np.float32)
    temps = [2.5, 0.7, 0.7, 0.7, 1.0]
    # row 0: find a logit whose next float up divides by 2.5 to the same x, and
    # whose own quotient was rounded up to it (it lies below 2.5 * x)
    low, t = np.float32(40.0), torch.tensor(2.5, dtype=torch.float32)
    while True:
        high = np.nextafter(low, np.float32(np.inf))
        x_low = torch.tensor(low) / t
        if torch.equal(x_low, torch.tensor(high) / t) and float(low) < 2.5 * float(x_low):
            break
        low = high
    logits[0, 100], logits[0, 2000] = low, high  # the larger logit has the larger id
    logits[1, 50] = logits[1, 7] = 9.0  # an exact tie
    logits[2, 1234] = 12.0  # peaked, u below the top token's probability
    logits[3, 321] = 5.0  # its top token holds ~0.25, u above it
    us = [0.1, 0.2, 0.5, 0.6, 0.3]  # row 4 is flat: no token holds 0.3
    rows = [RowSettings(temps[i], 0, 1.0, 0.0, us[i]) for i in range(5)]
    params = make_params(rows)
    x = torch.from_numpy(logits)
    stats = row_stats(x, effective_temperature(params))
    histogram_rows = _spy_rows(monkeypatch, select_module, "_tail_histogram")
    got = select_tail(x, params, stats)
    want = select_sorted(x, params)
    assert got.token_ids.tolist()[:3] == [100, 7, 1234]
    assert torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.rank, want.rank)
    assert got.rank.tolist()[:3] == [0, 0, 0]
    assert torch.allclose(got.prob, want.prob, rtol=1e-6)
    assert torch.equal(got.num_candidates, want.num_candidates)
    assert histogram_rows == [2]  # rows 3 and 4


def _quick(x: torch.Tensor, x_max: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """numpy's quick answer for the top token's id, with :func:`_first_at`'s bound."""
    return select_module._first_candidate(x, x_max, t, select_module._bound_below(x_max, t))


def test_first_maximum_when_an_earlier_token_is_just_below_it() -> None:
    """The top token's id (the first maximum of x = logits / T): numpy's quick
    answer, the first token at or above the bound, is refused when that token's
    x is below the maximum (here one float below it, earlier in the row), and
    the comparison pass then finds the true first maximum; rows without such a
    token keep the quick answer."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((3, 500)) * 0.5).astype(np.float32)
    top = np.float32(6.0)
    logits[0, 40], logits[0, 10] = top, np.nextafter(top, np.float32(0))  # earlier, just below
    logits[1, 300] = top
    logits[2, 90] = logits[2, 60] = top  # an exact tie: the earlier id
    x = torch.from_numpy(logits)
    t = torch.ones(3, dtype=torch.float32)
    x_max = x.amax(dim=-1) / t
    want = [int(np.flatnonzero(row / 1.0 == row.max())[0]) for row in logits]
    assert want == [40, 300, 60]
    assert select_module._first_at(x, x_max, t).tolist() == want
    assert _quick(x, x_max, t) is None  # row 0 refuses it
    assert select_module._first_at(x[1:], x_max[1:], t[1:]).tolist() == want[1:]
    quick = _quick(x[1:], x_max[1:], t[1:])
    assert quick is not None and quick.tolist() == want[1:]
    # a row whose maximum is not finite does not matter (it never takes the top token)
    x_max[2] = float("nan")
    quick = _quick(x[1:], x_max[1:], t[1:])
    assert quick is not None and quick.tolist()[0] == want[1]


@pytest.mark.parametrize("block_rows", [0, 3])
def test_row_stats_match_float64(block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entropy at T = 1, finite count and logsumexp(logits / T) against float64;
    ``block_rows`` 3: the eager CPU passes run in blocks of 3 rows (16 rows:
    five whole blocks and a partial one; -inf only in some blocks)."""
    if block_rows:
        monkeypatch.setattr(select_module, "CPU_BLOCK_ELEMENTS", 3000 * block_rows)
    rng = np.random.default_rng(7)
    logits = grid_logits(rng, 16, 3000, spread=8.0, inf_fraction=0.3)
    x = torch.from_numpy(logits)
    t = torch.tensor(rng.uniform(0.2, 3.0, 16), dtype=torch.float32)
    stats = row_stats(x, t)
    x64 = x.double()
    logp = torch.log_softmax(x64, dim=-1)
    ent = -(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum(-1)
    assert torch.allclose(stats.entropy.double(), ent, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.entropy, shannon_entropy(x), rtol=1e-5, atol=1e-6)
    assert stats.num_finite.tolist() == torch.isfinite(x).sum(-1).tolist()
    assert stats.lse is not None
    lse = torch.logsumexp(x64 / t.double().unsqueeze(1), dim=-1)
    assert torch.allclose(stats.lse.double(), lse, rtol=1e-6, atol=1e-5)
    assert torch.equal(stats.max_logit, x.amax(-1))
    again = log_normalizer(x, stats.max_logit, t)
    assert torch.allclose(again.double(), lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("block_rows", [0, 1, 3])
def test_row_stats_rows_with_nan_or_inf(block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN or +inf logit makes its row's statistics NaN, and the finite
    count counts every logit above -inf (eager on the CPU a block without -inf
    or NaN skips the clamp and the count); the other rows keep exact
    statistics, in their own block or in the same one (``block_rows`` 0: one
    block for all)."""
    if block_rows:
        monkeypatch.setattr(select_module, "CPU_BLOCK_ELEMENTS", 3000 * block_rows)
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((6, 3000)) * 2).astype(np.float32)
    logits[1, 5] = np.nan
    logits[2, 9] = np.inf
    logits[3, :100] = -np.inf
    x = torch.from_numpy(logits)
    t = torch.full((6,), 0.7)
    stats = row_stats(x, t)
    assert stats.lse is not None
    assert stats.num_finite.tolist() == [3000, 2999, 3000, 2900, 3000, 3000]
    for row in (1, 2):
        assert not bool(torch.isfinite(stats.entropy[row]) | torch.isfinite(stats.lse[row]))
    good = [0, 3, 4, 5]
    x64 = x[good].double()
    logp = torch.log_softmax(x64, dim=-1)
    ent = -(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum(-1)
    assert torch.allclose(stats.entropy[good].double(), ent, rtol=1e-5, atol=1e-6)
    lse = torch.logsumexp(x64 / 0.7, dim=-1)
    assert torch.allclose(stats.lse[good].double(), lse, rtol=1e-6, atol=1e-5)


def _mixed_batch(
    pipe: SamplingPipeline,
    rng: np.random.Generator,
    table: list[tuple[int, float, float]],
    temperature_strategy: str,
    vocab: int,
) -> tuple[np.ndarray, torch.Tensor, np.ndarray, int]:
    """40 rows cycling through ``table``'s (top_k, top_p, min_p), half peaked and
    half bf16 logits, one ``choose``; returns the logits, the pipeline's token
    ids and host block, and how many rows matched the full sort."""
    configs = [
        SamplingConfig(temperature_strategy=temperature_strategy, top_k=k, top_p=p, min_p=m)
        for k, p, m in table
    ]
    rows = [RowState.of(configs[i % len(configs)]) for i in range(40)]
    logits = np.concatenate([_logits(rng, "peaked", 20, vocab), _logits(rng, "bf16", 20, vocab)])
    u = rng.uniform(1e-10, 1 - 1e-10, 40)
    token_ids, host = pipe.choose(torch.from_numpy(logits.copy()), None, rows, u)
    return logits, token_ids, host, _checked_against_full_sort(logits, rows, u, token_ids, host)


@pytest.mark.parametrize("strategy", ["fixed", "edt", "top_k_only"])
def test_pipeline_step_equals_full_sort(strategy: str) -> None:
    """The pipeline's device stage (choose: fused statistics, chunked head --
    narrowed to 2k chunks when every row has top_k <= k --, fallback) agrees with
    the full sort at the temperatures it applied."""
    rng = np.random.default_rng(["fixed", "edt", "top_k_only"].index(strategy) + 11)
    vocab = 5000
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    head = 1024 if strategy == "top_k_only" else 8
    pipe = SamplingPipeline(
        settings, source=MockUniformSource(seed=3), sink=RecordSink(None), head_size=head
    )
    table = [(0, 1.0, 0.0), (50, 0.9, 0.0), (0, 0.95, 0.05), (0, 1.0, 0.0)]
    if strategy == "top_k_only":
        table = [(50, 0.9, 0.0), (7, 1.0, 0.0), (50, 1.0, 0.1), (1, 1.0, 0.0)]
    temperature_strategy = "edt" if strategy == "edt" else "fixed"
    logits, token_ids, host, checked = _mixed_batch(pipe, rng, table, temperature_strategy, vocab)
    assert host[:, 0].astype(np.int64).tolist() == token_ids.tolist()
    assert checked >= 36
    ent = shannon_entropy(torch.from_numpy(logits))
    assert torch.allclose(torch.from_numpy(host[:, 6]).float(), ent, rtol=1e-5, atol=1e-6)
    pipe.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none in CI)")
def test_cuda_compiled_path_equals_full_sort() -> None:
    """On CUDA (compiled statistics and pipeline step) the answers equal the
    full sort computed on the CPU, at the benchmark's vocabulary."""
    rng = np.random.default_rng(5)
    vocab = 151_936
    logits = np.concatenate(
        [
            _logits(rng, "peaked", 8, vocab),
            _logits(rng, "bf16", 8, vocab),
            _logits(rng, "flat", 4, vocab),
        ]
    )
    rows_cfg = _settings(rng, 20, 2000)
    params = make_params(rows_cfg)
    ref_sorted = select_sorted(torch.from_numpy(logits), params)
    got = select(torch.from_numpy(logits).cuda(), make_params(rows_cfg, device="cuda"))
    checked = 0
    for i in range(len(rows_cfg)):
        ref = ref_sorted
        if abs(float(ref.prob[i])) < 1e-6:
            continue  # near-zero picks sit at float boundaries; covered on the CPU
        if int(got.token_ids[i]) == int(ref.token_ids[i]):
            checked += 1
            assert int(got.rank[i]) == int(ref.rank[i])
    assert checked >= 18, checked


def _untruncated_rows(rng: np.random.Generator, rows: int) -> list[RowSettings]:
    """Rows for the radix search: no top-k/top-p, min-p sometimes, u anywhere
    (a quarter of them deep in the tail)."""
    u = np.concatenate(
        [rng.uniform(1e-10, 1 - 1e-10, rows - rows // 4), 1 - rng.uniform(0, 1e-3, rows // 4)]
    )
    return [
        RowSettings(
            float(rng.choice([0.3, 0.7, 1.0, 2.5])),
            int(rng.choice([0, 0, 10**9])),
            1.0,
            float(rng.choice([0.0, 0.0, 0.01, 0.2])),
            float(v),
        )
        for v in u
    ]


def test_value_keys_preserve_float_order() -> None:
    """Keys order exactly as the floats (ties stay ties): negative and positive
    values, both zeros, subnormals, the largest finite values and -inf."""
    specials = [float("-inf"), -3.4e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, 3.4e38]
    rng = np.random.default_rng(0)
    values = np.concatenate([specials, rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38)])
    x = torch.from_numpy(values.astype(np.float32))
    keys = value_keys(x)
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**32
    order = torch.argsort(x, stable=True)
    sx, sk = x[order], keys[order]
    assert torch.all(sk[1:] >= sk[:-1])
    assert torch.equal(sk[1:] == sk[:-1], sx[1:] == sx[:-1])


@pytest.mark.parametrize("kind", KINDS)
def test_radix_search_equals_full_sort(kind: str) -> None:
    """The radix search over value keys (no ordering at all) gives the full
    sort's token, rank, probability and candidate count on every row it serves:
    ties (the j-th tied token by id), -inf entries, min-p, u deep in the tail."""
    rng = np.random.default_rng(KINDS.index(kind) + 500)
    checked = deep = 0
    for vocab in (1000, 3001):
        logits = _logits(rng, kind, 32, vocab)
        rows = _untruncated_rows(rng, 32)
        x = torch.from_numpy(logits)
        params = make_params(rows)
        assert bool(radix_eligible(params, vocab).all())
        stats = row_stats(x, effective_temperature(params))
        assert stats.lse is not None
        got = select_radix(x, params, stats.lse, stats.max_logit)
        ref_sorted = select_sorted(x, params)
        for i, row in enumerate(rows):
            if _check(got, i, logits, row, ref_sorted):
                checked += 1
                deep += row.u > 0.999
                assert int(got.num_candidates[i]) == int(ref_sorted.num_candidates[i])
    assert checked >= 56, checked
    assert deep >= 4, deep


def test_radix_eligibility() -> None:
    """Only sampled rows without top-k (or top-k >= vocab) and without top-p."""
    rows = [
        RowSettings(0.7, 0, 1.0, 0.0, 0.5),
        RowSettings(0.7, 0, 1.0, 0.3, 0.5),
        RowSettings(0.7, 100, 1.0, 0.0, 0.5),
        RowSettings(0.7, 0, 0.9, 0.0, 0.5),
        RowSettings(0.0, 0, 1.0, 0.0, 0.5),
        RowSettings(0.7, 100, 1.0, 0.0, 0.5),
    ]
    got = radix_eligible(make_params(rows), 100)
    assert got.tolist() == [True, True, True, False, False, True]
    assert radix_eligible(make_params(rows), 101).tolist()[2] is False


RADIX_KERNEL_SCRIPT = """
import json, sys
import numpy as np, torch
sys.path.insert(0, "tests")
from support_sampling import make_params
from test_select_fast import _logits, _untruncated_rows, KINDS
from qr_sampler.sampling.select import effective_temperature, row_stats, select_radix
from qr_sampler.sampling import radix_kernel as rk
from qr_sampler.sampling.radix_kernel import select_radix_kernel
KINDS4 = ("ties", "bf16", "inf", "peaked")
dev = "cuda" if torch.cuda.is_available() else "cpu"
rng = np.random.default_rng(9)
out = {"rows": 0, "same": 0, "tied_past_first": 0, "compacted": 0, "whole_slice": 0}
out.update(joined=0, shrunk=0, int16=0, guessed=0, guessed_right=0, guessed_wrong=0, u_late_same=0)
out["passes"] = []
launch = rk._launch_pass
def watched(search, r, phase=0):  # how many ids each program holds after each pass
    launch(search, r, phase=phase)
    if r == 0:
        searches.append(search)
        held.clear()
    held[r] = search.args[17].clone()
rk._launch_pass = watched
held = {}
# 1 / COMPACT_SHARE of a slice's ids are kept: 1 keeps them all, 64 overflows
# often; held as int16 offsets, or as int32 where SHORT_IDS_MAX is 0; the second
# pass guessed before u in two cases of three (eagerly, from HOST_BOUND_ROWS rows on;
# below that FEW_PASSES is the schedule); passes of 4 bits each, or of 2 and 3
# bits up to the compacting pass
cases = [
    (2, 32_768, 0, (4,) * 8),
    (1, 0, 10**9, (3, 3, 2, 2, 2, 4, 4, 4, 4, 4)),
    (64, 32_768, 0, (2,) * 6 + (4,) * 5),
]
defaults = rk.SCHEDULE, rk.FEW_PASSES
for (share, short, min_rows, schedule), kind in [(c, k) for c in cases for k in KINDS4]:
    rk.COMPACT_SHARE, rk.SHORT_IDS_MAX, rk.HOST_BOUND_ROWS = share, short, min_rows
    # the schedule expected, and the other one eight passes of 4 bits
    if min_rows:
        rk.SCHEDULE, rk.FEW_PASSES = (4,) * 8, schedule
    else:
        rk.SCHEDULE, rk.FEW_PASSES = schedule, (4,) * 8
    searches = []
    logits = torch.from_numpy(_logits(rng, kind, 6, 700))
    rows6 = _untruncated_rows(rng, 6)
    params = make_params(rows6)
    stats = row_stats(logits, effective_temperature(params))
    want = select_radix(logits, params, stats.lse, stats.max_logit)
    on = make_params(rows6, device=dev)
    st = row_stats(logits.to(dev), effective_temperature(on))
    got = select_radix_kernel(logits.to(dev), on, st.lse, st.max_logit)
    cap, first, last = searches[0].args[21], held[searches[0].compact], held[len(held) - 2]
    pref = searches[0].args[11]  # the prefix after each pass, then the second pass's guess
    out["guessed"] += int(searches[0].guessed)
    out["passes"].append(len(held))  # passes launched
    if searches[0].guessed:
        out["guessed_right"] += int((pref[-1] == pref[1]).sum())
        out["guessed_wrong"] += int((pref[-1] != pref[1]).sum())
    # the passes queued before u (the first, the guessed second) read none: NaN until then
    block = torch.stack([on.u.double(), on.min_p.double()], dim=1).contiguous()
    real, block[:, 0] = block[:, 0].clone(), float("nan")
    lg, t_on = logits.to(dev), effective_temperature(on)
    idx = torch.arange(6, device=dev)
    search = rk.radix_begin(lg, idx, t_on, st.lse, st.max_logit, block, 0, 1)
    block[:, 0] = real
    token = torch.empty(6, dtype=torch.int64, device=dev)
    rk.radix_end(search, token, torch.empty(6, 5, dtype=torch.float64, device=dev))
    out["u_late_same"] += int(torch.equal(token.cpu(), got.token_ids.cpu()))
    out["int16"] += int(searches[0].args[16].dtype == torch.int16)  # the ids held
    out["compacted"] += int((first <= cap).sum())  # read only their ids from the next pass on
    out["whole_slice"] += int((first > cap).sum())
    out["joined"] += int(((first > cap) & (last <= cap)).sum())  # held ids from a later pass on
    out["shrunk"] += int(((first <= cap) & (last < first)).sum())  # rewrote a shorter list
    for i in range(6):
        out["rows"] += 1
        out["same"] += int(
            int(got.token_ids[i]) == int(want.token_ids[i])
            and int(got.rank[i]) == int(want.rank[i])
            and int(got.num_candidates[i]) == int(want.num_candidates[i])
            and abs(float(got.prob[i]) - float(want.prob[i])) <= 1e-6 * float(want.prob[i])
        )
        x = logits[i] / effective_temperature(params)[i]
        out["tied_past_first"] += int(
            int((x == x[int(want.token_ids[i])]).sum()) > 1
            and int(torch.nonzero(x == x[int(want.token_ids[i])])[0]) != int(want.token_ids[i])
        )
from qr_sampler.config import SamplingConfig, load_settings
from qr_sampler.entropy.mock import MockUniformSource
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink
rk.COMPACT_SHARE, rk.SHORT_IDS_MAX, (rk.SCHEDULE, rk.FEW_PASSES) = 2, 32_768, defaults
settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
table = [(0, 1.0, 0.0), (50, 0.9, 0.0), (0, 1.0, 0.1), (0, 1.0, 0.0)]
rows = [RowState.of(SamplingConfig(top_k=k, top_p=p, min_p=m)) for k, p, m in table] * 3
logits = torch.from_numpy(_logits(rng, "bf16", 12, 900))
logits[3, 17] = float("inf")  # lse not finite: both modes leave these rows to the fallback
logits[7, 40:60] = float("nan")
u = rng.uniform(1e-10, 1 - 1e-10, 12)
blocks = {}
for mode in ("kernel", "torch"):
    pipe = SamplingPipeline(settings, source=MockUniformSource(seed=1), sink=RecordSink(None))
    pipe.radix = mode
    tokens, host = pipe.choose(logits.clone().to(dev if mode == "kernel" else "cpu"), None, rows, u)
    blocks[mode] = (tokens.tolist(), host.tolist())
(tk, hk), (tt, ht) = blocks["kernel"], blocks["torch"]
# token, rank, candidates, resolved exactly; probability, temperature and
# entropy to float rounding (on a GPU the statistics come from other kernels;
# the entropy of a row with +inf or NaN logits is NaN in both)
out["pipeline_same"] = tk == tt and all(
    a[:2] == b[:2]
    and a[3:5] == b[3:5]
    and all(
        abs(a[c] - b[c]) <= 1e-5 * abs(b[c]) + 1e-7 or (a[c] != a[c] and b[c] != b[c])
        for c in (2, 5, 6)
    )
    for a, b in zip(hk, ht)
)
print(json.dumps(out))
"""


def _triton_child(script: str) -> Any:
    """Run ``script`` in a child process (Triton compiled where a GPU exists,
    else its CPU interpreter, as in CI); the JSON of its last output line."""
    path = [p for p in ("src", "tests", os.environ.get("PYTHONPATH", "")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


STATS_KERNEL_SCRIPT = """
import json, torch
from qr_sampler.sampling import radix_kernel as rk
from qr_sampler.sampling.select import row_stats
dev = "cuda" if torch.cuda.is_available() else "cpu"
rk.STATS_CHUNK = 256  # four slices of a row of 1,000, the last one partial
g = torch.Generator().manual_seed(5)
wide = torch.randn(9, 1100, generator=g) * 3
x = wide[:, :1000]  # rows 1,100 apart: the kernel reads the row stride
x[1, 5] = float("nan")
x[2, 7] = float("inf")
x[3] = float("-inf")
x[4, :600] = float("-inf")  # two whole slices without a finite token
x[5, 300:] = float("-inf")
x[6] *= 1e-3  # flat
x[7, 999] = 60.0  # peaked, in the partial slice
x[8, 2] = -float("inf")
t = torch.tensor([0.7, 1.0, 0.5, 1.3, 0.9, 2.0, 0.7, 0.25, 1.0])
out = {"checked": 0, "same": 0, "close_to_float64": 0}
def close(a, b):  # equal to float32 rounding, or both NaN
    a, b = float(a), float(b)
    if a != a or b != b:
        return a != a and b != b
    return abs(a - b) <= 1e-6 * abs(b) + 1e-5
for dtype in (torch.float32, torch.bfloat16):
    xs = x.to(dtype)
    m, ent, fin, lse = (v.cpu() for v in rk.row_stats_kernel(xs.to(dev), t.to(dev)))
    ref = row_stats(xs, t, fused=False)
    lse64 = torch.logsumexp(xs.double() / t.double().unsqueeze(1), dim=-1)
    # the entropy against float64: torch's float32 one on the CPU was seen to
    # differ by ~3e-5 (rows with -inf) in one fresh process of about fifteen
    p64 = torch.softmax(xs.double(), dim=-1)
    ent64 = -torch.special.xlogy(p64, p64).sum(dim=-1)
    for i in range(x.shape[0]):
        out["checked"] += 1
        a, b = m[i], ref.max_logit[i]
        h = ref.entropy[i] if bool(ref.entropy[i].isnan()) else ent64[i]
        out["same"] += int(
            bool(a == b or (a.isnan() and b.isnan()))
            and int(fin[i]) == int(ref.num_finite[i])
            and close(ent[i], h)
            and close(lse[i], ref.lse[i])
        )
        if torch.isfinite(ref.lse[i]):
            out["close_to_float64"] += int(abs(float(lse[i]) - float(lse64[i])) <= 1e-5)
# read through an address (as inside a CUDA graph): the same statistics and
# the same search's answers as from the logits themselves
xs = x.contiguous().to(dev)
decoy = torch.zeros_like(xs)
addr = torch.tensor([xs.data_ptr()], dtype=torch.int64, device=dev)
td = t.to(dev)
direct, through = rk.row_stats_kernel(xs, td), rk.row_stats_kernel(decoy, td, addr)
out["stats_through_address"] = all(
    torch.equal(p.isnan(), q.isnan()) and torch.equal(p.nan_to_num(), q.nan_to_num())
    for p, q in zip(direct, through)
)
good = torch.tensor([0, 4, 5, 6, 7, 8], device=dev)  # rows with a finite logsumexp
u = torch.linspace(0.05, 0.95, 9, dtype=torch.float64)
block = torch.stack([u, torch.zeros(9, dtype=torch.float64)], dim=1).contiguous().to(dev)
answers = []
for logits, where in ((xs, None), (decoy, addr)):
    search = rk.radix_begin(logits, good, td, direct[3], direct[0], block, 0, 1, where)
    token = torch.full((9,), -1, dtype=torch.int64, device=dev)
    rk.radix_end(search, token, torch.zeros(9, 5, dtype=torch.float64, device=dev))
    answers.append(token.cpu().tolist())
found = min(answers[0][i] for i in (0, 4, 5, 6, 7, 8)) >= 0
out["search_through_address"] = found and answers[0] == answers[1]
print(json.dumps(out))
"""


def test_row_stats_kernel_matches_torch_statistics() -> None:
    """The Triton row statistics (the pipeline's on CUDA at fixed temperatures;
    in a child process, by Triton's CPU interpreter in CI) give torch's
    maxima and finite counts exactly, its logsumexp to float32 rounding and
    the float64 entropy to float32 rounding, for float32 and bf16 rows with
    NaN, +inf, all -inf, whole slices of -inf, flat and peaked rows, read
    through a row stride; their
    logsumexp within 1e-5 of float64's where finite. Read through an address
    held on the device (as a captured CUDA step does), the statistics and a
    radix search give what they give from the logits themselves."""
    out = _triton_child(STATS_KERNEL_SCRIPT)
    assert out["checked"] == 18, out
    assert out["same"] == 18, out
    assert out["close_to_float64"] == 12, out  # rows 1, 2, 3 have no finite logsumexp
    assert out["stats_through_address"], out
    assert out["search_through_address"], out


def test_radix_split_fills_one_wave_with_at_least_32_programs_a_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search's launch shape on a GPU of 132 SMs (its properties faked:
    none in CI): 16 programs an SM in one wave, but at least 32 a row and at
    most 64; the slices cover the row in whole blocks."""
    from types import SimpleNamespace

    from qr_sampler.sampling import radix_kernel as rk

    props = SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    vocab = 151_936
    got = {}
    for rows in (1, 8, 33, 64, 128, 256, 1024):
        split, chunk = rk._split(rows, vocab, torch.device("cuda"))
        assert chunk % rk.BLOCK == 0 and (split - 1) * chunk < vocab <= split * chunk
        got[rows] = split
    # (64 programs of whole blocks cover the row in 63)
    assert got == {1: 63, 8: 63, 33: 63, 64: 33, 128: 32, 256: 32, 1024: 32}


def test_radix_kernel_equals_torch_search() -> None:
    """The Triton kernel (in a child process: compiled where a GPU exists, else
    run by Triton's CPU interpreter, as in CI) gives the torch radix search's
    answers, ties included, alone and inside the pipeline (result block
    written in place). Programs that hold their range's ids after the
    compacting pass and programs with too many of them (reading their whole
    slice) are both exercised, by varying the share of ids kept, as are
    lists rewritten shorter by later passes, programs that start holding
    ids after reading their whole slice, ids held as 16-bit and as 32-bit
    offsets, second passes guessed right and wrong before u (u written
    only after they were queued), and three schedules of key bits per pass. On an H200
    the compiled kernel was also compared with the full sort at vocabulary
    151,936 (benchmarks/probe_radix.py)."""
    out = _triton_child(RADIX_KERNEL_SCRIPT)
    assert out["rows"] == 72
    assert out["same"] == 72, out
    assert out["tied_past_first"] >= 1, out  # the tie-locating pass ran
    # both ways of reading the passes after the compacting one were taken;
    # later passes rewrote shorter lists, and programs that read their whole
    # slice after the compacting pass held ids from a later pass on
    assert out["compacted"] >= 10 and out["whole_slice"] >= 10, out
    assert out["shrunk"] >= 10 and out["joined"] >= 10, out
    assert out["int16"] == 8, out  # 16-bit offsets in two cases of three, 32-bit in one
    # the second pass ran on a guess before u: right for most rows, re-run for the others
    assert out["guessed"] == 8, out  # in 8 of the 12 searches checked
    assert out["guessed_right"] >= 10 and out["guessed_wrong"] >= 4, out
    assert out["u_late_same"] == 12, out  # u written after the first two passes were queued
    assert sorted(set(out["passes"])) == [8, 10, 11], out  # one per schedule's pass
    assert out["pipeline_same"], "the pipeline's kernel mode differs from its torch mode"


class _FakeCompiled:
    """Stands in for a compiled Triton kernel (none can be compiled in CI)."""

    function = "function handle"
    packed_metadata = "packed"

    def __init__(self) -> None:
        self.launches: list[tuple[Any, ...]] = []
        self.fail = False

    def launch_metadata(self, grid: tuple[int, ...], stream: Any, *values: Any) -> Any:
        return ("metadata", grid)

    def run(self, *call: Any) -> None:
        if self.fail:
            raise TypeError("this launcher takes other arguments")
        self.launches.append(call)


class _FakeKernel:
    """Stands in for a ``@triton.jit`` function: ``fn[grid](*args, **consts)``
    is Triton's own launch (binding, specialisation), returning the compiled
    kernel. Parameters: two arguments, then two constants."""

    params = tuple(
        SimpleNamespace(name=name, is_constexpr=const)
        for name, const in (("x", False), ("n", False), ("A", True), ("B", True))
    )

    def __init__(self) -> None:
        self.own_launches: list[tuple[Any, ...]] = []
        self.kernel = _FakeCompiled()

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(*args: Any, **consts: Any) -> _FakeCompiled:
            self.own_launches.append((grid, args, consts))
            return self.kernel

        return launch


def test_relauncher_reuses_a_kernel_only_for_the_same_specialisation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The radix kernels' direct relaunch (Triton's binding skipped after a
    first launch): a repeated launch with the same integers, dtypes, address
    alignments, grid and constants goes straight to the compiled kernel's
    launcher, with every parameter in signature order and Triton's hooks; any
    difference goes through Triton again; a launcher that refuses the call
    turns the direct path off. Triton cannot compile here (no GPU in CI), so
    the Triton objects are stand-ins (run on an H100: same tokens, ranks and
    probabilities as Triton's own launch, 67 GPU tests passed)."""
    from qr_sampler.sampling import radix_kernel

    monkeypatch.setattr(radix_kernel, "_INTERPRETED", False)
    streams = SimpleNamespace(get_current_stream=lambda device: f"stream {device}")
    monkeypatch.setattr(radix_kernel, "_driver", SimpleNamespace(active=streams))
    fake = _FakeKernel()
    launch = radix_kernel._Relauncher(fake)
    x = torch.zeros(8)
    consts = {"B": 7, "A": 5, "num_warps": 1}  # another order than the signature's
    launch(0, (2, 3), (x, 32), consts)
    launch(0, (2, 3), (x, 32), consts)
    assert len(fake.own_launches) == 1
    ((*head, metadata, enter, leave, v_x, v_n, v_a, v_b),) = fake.kernel.launches
    hooks = radix_kernel._hook_holder()
    assert head == [2, 3, 1, "stream 0", "function handle", "packed"]
    assert metadata == ("metadata", (2, 3, 1))
    assert (enter, leave) == (hooks.launch_enter_hook, hooks.launch_exit_hook)
    assert (v_x, v_n, v_a, v_b) == (x, 32, 5, 7)
    # another integer value, a misaligned address, another grid, another
    # constant, another device, another dtype: Triton's own launch each time
    for device, grid, args, const in [
        (0, (2, 3), (x, 33), consts),
        (0, (2, 3), (torch.zeros(9)[1:], 32), consts),
        (0, (4, 3), (x, 32), consts),
        (0, (2, 3), (x, 32), {**consts, "A": 6}),
        (1, (2, 3), (x, 32), consts),
        (0, (2, 3), (x.double(), 32), consts),
    ]:
        launch(device, grid, args, const)
    assert len(fake.own_launches) == 7 and len(fake.kernel.launches) == 1
    fake.kernel.fail = True
    launch(0, (2, 3), (x, 32), consts)
    assert len(fake.own_launches) == 8 and not launch.direct
    launch(0, (2, 3), (x, 32), consts)
    assert len(fake.own_launches) == 9


@pytest.mark.parametrize("strategy", ["fixed", "edt"])
def test_pipeline_radix_mode_equals_full_sort(strategy: str) -> None:
    """With the radix search on (torch ops here), a batch mixing untruncated,
    min-p, top-k and top-p rows still equals the full sort on every row."""
    rng = np.random.default_rng(["fixed", "edt"].index(strategy) + 41)
    vocab = 5000
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(
        settings, source=MockUniformSource(seed=3), sink=RecordSink(None), head_size=8
    )
    pipe.radix = "torch"
    table = [(0, 1.0, 0.0), (50, 0.9, 0.0), (0, 0.95, 0.05), (0, 1.0, 0.1), (0, 1.0, 0.0)]
    _logits_used, _ids, host, checked = _mixed_batch(pipe, rng, table, strategy, vocab)
    assert checked >= 36
    assert (host[:, 4] == 1).all()  # every row resolved in the one pass
    pipe.close()


def test_pipeline_radix_mode_leaves_non_finite_rows_to_the_fallback() -> None:
    """Rows with +inf or NaN logits have no finite normaliser: the radix search
    marks them unresolved and the exact fallback answers them (the full sort's
    result), while the other rows stay resolved in the one pass."""
    rng = np.random.default_rng(61)
    vocab = 500
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(settings, source=MockUniformSource(seed=3), sink=RecordSink(None))
    pipe.radix = "torch"
    rows = [RowState.of(SamplingConfig())] * 6
    logits = _logits(rng, "peaked", 6, vocab)
    logits[1, 17] = np.inf
    logits[3, 40:90] = np.nan
    u = rng.uniform(1e-10, 1 - 1e-10, 6)
    token_ids, host = pipe.choose(torch.from_numpy(logits.copy()), None, rows, u)
    assert (host[:, 4] == 1).all()  # the fallback resolved the two rows
    finite = [0, 2, 4, 5]
    checked = _checked_against_full_sort(
        logits[finite], [rows[i] for i in finite], u[finite], token_ids[finite], host[finite]
    )
    assert checked >= 3
    # the reference model has no +inf; the full sort puts all mass on the +inf id
    params = SelectionParams(
        temperature=torch.from_numpy(host[:, 5]).float(),
        top_k=torch.zeros(6, dtype=torch.int64),
        top_p=torch.ones(6, dtype=torch.float64),
        min_p=torch.zeros(6, dtype=torch.float64),
        u=torch.from_numpy(u),
    )
    ref = select_sorted(torch.from_numpy(logits), params)
    for i in (1, 3):
        assert int(token_ids[i]) == int(ref.token_ids[i])
        assert int(host[i, 1]) == int(ref.rank[i])
    assert int(token_ids[1]) == 17
    pipe.close()


def test_flat_rows_skip_the_head_and_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager on the CPU, untruncated rows whose head cannot hold HEAD_WORTH of
    the mass (flat distributions) get no head and go to the tail histogram;
    rows with top-k/top-p or a peaked distribution keep it. Every answer
    still equals the full sort."""
    import qr_sampler.pipeline as pipeline_mod

    seen = _spy_rows(monkeypatch, pipeline_mod, "chunked_head")
    rng = np.random.default_rng(61)
    vocab = 20_000
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(
        settings, source=MockUniformSource(seed=3), sink=RecordSink(None), head_size=16
    )
    configs = [SamplingConfig(), SamplingConfig(top_k=50, top_p=0.9), SamplingConfig()]
    rows = [RowState.of(configs[i % 3]) for i in range(24)]
    logits = _logits(rng, "flat", 24, vocab)
    logits[16:] = _logits(rng, "peaked", 8, vocab)
    u = rng.uniform(1e-10, 1 - 1e-10, 24)
    token_ids, host = pipe.choose(torch.from_numpy(logits.copy()), None, rows, u)
    plain_flat = sum(1 for i in range(16) if i % 3 != 1)
    assert seen == [24 - plain_flat], seen  # only the rows that can use it
    checked = _checked_against_full_sort(logits, rows, u, token_ids, host)
    assert checked >= 20, checked
    # a batch of plain flat rows only: no head at all, so no head selection
    # either (every row straight to the exact fallback), still exact
    finishes = _spy_rows(monkeypatch, pipeline_mod, "_device_finish")
    flat, plain = _logits(rng, "flat", 8, vocab), [RowState.of(SamplingConfig())] * 8
    u = rng.uniform(1e-10, 1 - 1e-10, 8)
    token_ids, host = pipe.choose(torch.from_numpy(flat.copy()), None, plain, u)
    assert seen == [24 - plain_flat], seen
    assert finishes == [], finishes
    assert _checked_against_full_sort(flat, plain, u, token_ids, host) >= 7
    token_ids, host = pipe.choose(torch.from_numpy(logits.copy()), None, rows, u=u.repeat(3))
    assert finishes == [24], finishes  # rows with a head: the head selection runs
    pipe.close()


def test_peaked_rows_take_their_top_token_found_before_u(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager on the CPU, a batch of plain rows whose most likely token holds at
    least TOP_FIRST of the mass has those tokens found in prepare (before u);
    finish then compares u only. Tokens and result block equal, bit for bit,
    those of the same pipeline with that step removed, for u all below the
    top probabilities (compared only), some above (the fallback, given the
    ids), EDT rows among them, and a batch with one flat row (not found
    early); and they equal the full sort."""
    import qr_sampler.pipeline as pipeline_mod

    real = pipeline_mod.peaked_top_tokens
    found: list[bool] = []

    def spy(*args: Any) -> Any:
        out = real(*args)
        found.append(out is not None)
        return out

    rng = np.random.default_rng(83)
    vocab = 20_000
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(  # a small head: the flat row gets none either
        settings, source=MockUniformSource(seed=3), sink=RecordSink(None), head_size=16
    )
    configs = [SamplingConfig(), SamplingConfig(temperature_strategy="edt"), SamplingConfig()]
    rows = [RowState.of(configs[i % 3]) for i in range(8)]
    logits = rng.standard_normal((8, vocab)).astype(np.float32)
    logits[np.arange(8), rng.integers(0, vocab, 8)] += 16.0  # p_top > 0.99
    flat_too = logits.copy()
    flat_too[5] = _logits(rng, "flat", 1, vocab)[0]
    cases = [
        (logits, rng.uniform(1e-10, 0.5, 8), True),  # all below: compared only
        (logits, np.where(np.arange(8) % 4 == 0, 1 - 1e-10, 0.3), True),  # two above
        (flat_too, rng.uniform(1e-10, 0.5, 8), False),  # a flat row: not found early
    ]
    for values, u, early in cases:
        results = []
        for on in (True, False):
            monkeypatch.setattr(pipeline_mod, "peaked_top_tokens", spy if on else lambda *a: None)
            found.clear()
            token_ids, host = pipe.choose(torch.from_numpy(values.copy()), None, rows, u)
            if on:
                assert found == [early]
            results.append((token_ids.tolist(), host))
        assert results[0][0] == results[1][0]
        assert np.array_equal(results[0][1], results[1][1])
        # (rows with u at 1 - 1e-10 pick among the last, float-fragile ranks: skipped)
        checked = _checked_against_full_sort(values, rows, u, torch.tensor(results[0][0]), host)
        assert checked >= 6, checked
    pipe.close()
