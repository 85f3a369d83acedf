"""The sampling pipeline end to end on CPU: real entropy sources, real record
files. Chosen tokens are checked against the slow reference of
support_sampling (skipping, and counting, rows float rounding could flip), the
u of every record against an independent recomputation from the same seeded
bytes, and every provenance field for presence and consistency."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from scipy import stats
from support_sampling import grid_logits, ref_select

from qr_sampler import pipeline
from qr_sampler.config import QRSettings, SamplingConfig, load_settings, parse_request_options
from qr_sampler.entropy import registry
from qr_sampler.entropy.base import EntropyChunk, EntropySource
from qr_sampler.entropy.mock import MockUniformSource
from qr_sampler.errors import EntropyUnavailableError
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RECORD_FIELDS, RecordSink, TokenRecord, read_records


def _settings(**env: Any) -> QRSettings:
    base = {"entropy_source_type": "mock_uniform", "mock_seed": "77", "sample_count": "512"}
    base.update({k: str(v) for k, v in env.items()})
    return load_settings(env={"QR_" + k.upper(): v for k, v in base.items()}, env_file=None)


def _ref_entropy(row: np.ndarray) -> float:
    x = row[np.isfinite(row)].astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _random_rows(
    rng: np.random.Generator, n: int, defaults: SamplingConfig, vocab: int
) -> list[RowState]:
    rows = []
    for i in range(n):
        extra: dict[str, Any] = {"qr_label": f"req-{i % 3}"}
        if rng.random() < 0.5:
            extra["qr_temperature_strategy"] = "edt"
            extra["qr_edt_base_temp"] = float(rng.uniform(0.3, 2.0))
            extra["qr_edt_exponent"] = float(rng.uniform(0.1, 2.0))
        else:
            extra["qr_fixed_temperature"] = float(rng.choice([0.0, 0.4, 0.7, 1.0, 1.8]))
        if rng.random() < 0.4:
            extra["qr_top_k"] = int(rng.integers(1, vocab + 5))
        if rng.random() < 0.4:
            extra["qr_top_p"] = float(rng.uniform(0.1, 0.99))
        if rng.random() < 0.3:
            extra["qr_min_p"] = float(rng.uniform(0.01, 0.3))
        if rng.random() < 0.3:
            extra["qr_sample_count"] = int(rng.integers(1, 3000))
        if rng.random() < 0.2:
            extra["qr_population_mean"] = float(rng.uniform(120.0, 135.0))
            extra["qr_population_std"] = float(rng.uniform(60.0, 80.0))
            extra["qr_uniform_clamp_epsilon"] = float(rng.choice([1e-3, 0.05]))
        cfg = parse_request_options(extra, defaults).config
        rows.append(RowState.of(cfg, request_id=f"cmpl-{i}"))
    return rows


def _expected_temperature(row: np.ndarray, cfg: SamplingConfig) -> float:
    if cfg.temperature_strategy == "fixed":
        return cfg.fixed_temperature
    h = _ref_entropy(row) / math.log(row.shape[0])
    t = cfg.edt_base_temp * h**cfg.edt_exponent
    return min(max(t, cfg.edt_min_temp), cfg.edt_max_temp)


def _check_step(
    before: torch.Tensor,
    after: torch.Tensor,
    rows: Sequence[RowState],
    index: Sequence[int],
    records: list[TokenRecord],
    settings: QRSettings,
    replay: MockUniformSource | None,
) -> tuple[int, int]:
    """Every consistency check of one step; returns (rows checked, fragile rows)."""
    assert len(records) == len(rows)
    checked = fragile = 0
    if replay is not None:
        replayed = replay.fetch([r.config.sample_count for r in rows])
    for i, (row, rec) in enumerate(zip(rows, records, strict=True)):
        cfg = row.config
        logits = before[index[i]].float().numpy()
        # provenance fields, all filled
        assert set(RECORD_FIELDS) == set(rec.to_dict())
        assert rec.schema == 1 and rec.row == index[i]
        assert (rec.label, rec.request_id) == (cfg.label, row.request_id)
        assert rec.step_started_ns <= rec.server_timestamp_ns <= rec.time_ns, "entropy after logits"
        assert rec.byte_count == cfg.sample_count
        assert rec.entropy_source == "mock_uniform" and rec.device_id.startswith("mock:seed=")
        assert not rec.fallback and rec.fallback_reason == "" and not rec.failed
        assert rec.health == "off" and rec.sequence_id == -1
        assert rec.fetch_latency_ns > 0 and rec.sampling_latency_ns >= rec.fetch_latency_ns
        assert rec.config_hash == settings.config_hash()
        assert rec.temperature_strategy == cfg.temperature_strategy
        assert (rec.population_mean, rec.population_std) == (
            cfg.population_mean,
            cfg.population_std,
        )
        assert rec.uniform_clamp_epsilon == cfg.uniform_clamp_epsilon
        # z and u follow from the record, and from the bytes themselves
        scale = rec.population_std / math.sqrt(rec.byte_count)
        assert rec.z == pytest.approx((rec.sample_mean - rec.population_mean) / scale, rel=1e-12)
        eps = rec.uniform_clamp_epsilon
        u = min(max(0.5 * math.erfc(-rec.z / math.sqrt(2)), eps), 1 - eps)
        assert rec.u == pytest.approx(u, rel=1e-12)
        if replay is not None:
            data = np.frombuffer(replayed[i].data, dtype=np.uint8)
            assert rec.sample_mean == int(data.sum()) / data.size
        # temperature and entropy
        assert rec.shannon_entropy == pytest.approx(_ref_entropy(logits), rel=1e-4, abs=1e-5)
        want_t = _expected_temperature(logits, cfg)
        assert rec.temperature == pytest.approx(want_t, rel=1e-4, abs=1e-6)
        # the row is forced to the token
        forced = after[index[i]].float()
        assert forced[rec.token_id] == 0.0
        assert int(torch.isneginf(forced).sum()) == forced.numel() - 1
        # and the token is the one the documented rules give for this u
        ref = ref_select(logits, rec.temperature, cfg.top_k, cfg.top_p, cfg.min_p, rec.u)
        assert math.isfinite(float(logits[rec.token_id]))
        if ref.fragile:
            fragile += 1
            continue
        checked += 1
        assert (rec.token_id, rec.rank) == (ref.token, ref.rank), (i, cfg, ref)
        assert rec.probability == pytest.approx(ref.prob, rel=1e-4)
        assert ref.n_cand_solid <= rec.num_candidates <= ref.n_cand
    return checked, fragile


@pytest.mark.parametrize("head_size", [1, 4, 1024])
def test_steps_match_reference_and_records_are_complete(head_size: int) -> None:
    """Mixed per-row settings, batch sizes 1..64, some rows bypassed, several
    steps; the replay source has the same seed, so it sees the same bytes."""
    settings = _settings()
    pipe = SamplingPipeline(settings, head_size=head_size)
    replay = MockUniformSource(seed=77)
    rng = np.random.default_rng(head_size)
    checked = fragile = 0
    defaults = settings.sampling()
    for step in range(1, 9):
        batch = int(rng.integers(1, 65))
        vocab = int(rng.integers(20, 400))
        logits = torch.from_numpy(grid_logits(rng, batch, vocab, spread=6.0, inf_fraction=0.1))
        controlled = sorted(rng.choice(batch, size=int(rng.integers(1, batch + 1)), replace=False))
        rows = _random_rows(rng, len(controlled), defaults, vocab)
        before = logits.clone()
        indices = None if len(controlled) == batch else [int(c) for c in controlled]
        result = pipe.sample(logits, rows, row_indices=indices)
        index = list(range(batch)) if indices is None else indices
        assert result.rows == index
        assert result.token_ids == [r.token_id for r in result.records]
        assert all(r.step == step for r in result.records)
        c, f = _check_step(before, logits, rows, index, result.records, settings, replay)
        checked += c
        fragile += f
        for r in set(range(batch)) - set(index):  # bypassed rows: bit for bit
            assert logits[r].view(torch.int32).equal(before[r].view(torch.int32))
    assert checked >= 50 and fragile <= max(1, checked // 50)
    pipe.close()


def test_bfloat16_logits_and_explicit_step_start() -> None:
    settings = _settings(top_k="5")
    pipe = SamplingPipeline(settings)
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(grid_logits(rng, 6, 128, spread=3.0)).to(torch.bfloat16)
    before = logits.clone()
    rows = [RowState.of(settings.sampling())] * 6
    started = 1_000_000_000
    result = pipe.sample(logits, rows, step_started_ns=started)
    assert all(r.step_started_ns == started for r in result.records)
    _check_step(before, logits, rows, list(range(6)), result.records, settings, None)


def test_greedy_rows_take_the_lowest_id_of_the_top_logit() -> None:
    settings = _settings(fixed_temperature="0")
    pipe = SamplingPipeline(settings, head_size=1)
    logits = torch.zeros(3, 500)
    logits[0, [7, 100, 499]] = 4.0
    logits[1, 250:] = 1.0
    logits[2, :] = -1.0
    result = pipe.sample(logits, [RowState.of(settings.sampling())] * 3)
    assert result.token_ids == [7, 250, 0]
    assert all(r.temperature == 0.0 and r.rank == 0 for r in result.records)


def test_token_frequencies_follow_the_distribution_end_to_end() -> None:
    """4,000 rows of one logits row, each with its own 256 seeded mock bytes:
    u is uniform (KS) and the tokens follow the truncated, temperature-scaled
    distribution (chi-square); seeded, thresholds 1e-4."""
    settings = _settings(sample_count="256", fixed_temperature="0.9", top_p="0.95")
    pipe = SamplingPipeline(settings)
    base = np.array([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -4.0, -6.0], dtype=np.float32)
    n = 4000
    result = pipe.sample(
        torch.from_numpy(np.tile(base, (n, 1))), [RowState.of(settings.sampling())] * n
    )
    u = np.array([r.u for r in result.records])
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    ref = ref_select(base, float(np.float32(0.9)), 0, 0.95, 0.0, 0.5)
    counts = np.bincount(result.token_ids, minlength=base.size)
    assert counts[[t for t in range(base.size) if t not in ref.kept]].sum() == 0
    assert stats.chisquare(counts[list(ref.kept)], np.array(ref.probs) * n).pvalue > 1e-4


# ---------------------------------------------------------------------------
# failures


class DeadSource(EntropySource):
    """A real source whose device is gone: every fetch fails."""

    name: ClassVar[str] = "dead_device"
    calls = 0

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        DeadSource.calls += 1
        raise EntropyUnavailableError("device /dev/qrng0 not found")


@pytest.fixture
def dead_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._extra, "dead_device", DeadSource)


@pytest.mark.usefixtures("dead_source")
def test_fallback_is_labelled_in_every_record() -> None:
    settings = _settings(entropy_source_type="dead_device", fallback_mode="mock_uniform")
    pipe = SamplingPipeline(settings)
    logits = torch.randn(5, 64)
    result = pipe.sample(logits, [RowState.of(settings.sampling())] * 5)
    for rec in result.records:
        assert rec.fallback and rec.entropy_source == "mock_uniform"
        assert rec.fallback_reason.startswith("unavailable: device /dev/qrng0 not found")
        assert not rec.failed and 0 < rec.u < 1 and rec.byte_count == 512
        assert float(logits[rec.row, rec.token_id]) == 0.0


@pytest.mark.usefixtures("dead_source")
def test_error_mode_forces_eos_and_marks_failed(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    settings = _settings(
        entropy_source_type="dead_device", fallback_mode="error", records_path=str(path)
    )
    pipe = SamplingPipeline(settings, eos_token_id=2)
    logits = torch.randn(4, 32)
    before = logits.clone()
    result = pipe.sample(logits, [RowState.of(settings.sampling())] * 3, row_indices=[0, 1, 3])
    assert result.token_ids == [2, 2, 2]
    for rec in result.records:
        assert rec.failed and rec.token_id == 2
        assert math.isnan(rec.u) and math.isnan(rec.z) and rec.byte_count == 0
        assert rec.entropy_source == "none" and not rec.fallback
        assert rec.fallback_reason.startswith("unavailable: device /dev/qrng0 not found")
        forced = logits[rec.row]
        assert forced[2] == 0.0 and int(torch.isneginf(forced).sum()) == 31
    assert logits[2].equal(before[2])
    pipe.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])  # strict JSON: NaN is written as null
    assert first["u"] is None and first["failed"] is True


@pytest.mark.usefixtures("dead_source")
def test_error_mode_logs_a_dead_source_once_then_at_most_every_few_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A source that fails every step gives one ERROR line, not one per step;
    the next comes once ERROR_LOG_EVERY_S have passed and counts the failed
    steps it did not report. Every step's records still say it failed."""
    settings = _settings(entropy_source_type="dead_device", fallback_mode="error")
    pipe = SamplingPipeline(settings, eos_token_id=2)
    rows = [RowState.of(settings.sampling())] * 2

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]

    with caplog.at_level(logging.ERROR, logger="qr_sampler"):
        for _ in range(4):
            result = pipe.sample(torch.randn(2, 16), rows)
            assert all(rec.failed for rec in result.records)
        assert len(errors()) == 1 and "forcing EOS" in errors()[0]
        assert "more failed" not in errors()[0]
        assert pipe._error_logged_at is not None
        pipe._error_logged_at -= pipeline.ERROR_LOG_EVERY_S + 1  # as if that long ago
        pipe.sample(torch.randn(2, 16), rows)
        assert len(errors()) == 2
        assert "(3 more failed step(s) since the last message)" in errors()[1]
        pipe.sample(torch.randn(2, 16), rows)
        assert len(errors()) == 2
    pipe.close()


# ---------------------------------------------------------------------------
# records


def test_records_file_holds_every_record_exactly(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "records.jsonl"
    settings = _settings(records_path=str(path))
    pipe = SamplingPipeline(settings)
    emitted: list[TokenRecord] = []
    for _ in range(3):
        logits = torch.randn(5, 50)
        emitted += pipe.sample(logits, [RowState.of(settings.sampling(), "r")] * 5).records
    pipe.close()
    loaded = read_records(path)
    assert len(loaded) == 15
    assert loaded == [r.to_dict() for r in emitted]
    assert [d["step"] for d in loaded] == [1] * 5 + [2] * 5 + [3] * 5


def test_diagnostic_ring_and_listeners() -> None:
    settings = _settings(diagnostics_max="7")
    seen: list[list[TokenRecord]] = []
    pipe = SamplingPipeline(settings, listeners=[seen.append])
    plain = RowState.of(settings.sampling())
    diag = RowState.of(
        parse_request_options({"qr_diagnostic_mode": True}, settings.sampling()).config
    )
    pipe.sample(torch.randn(4, 20), [plain] * 4)
    assert len(pipe.sink.recent) == 0
    for _ in range(3):
        pipe.sample(torch.randn(4, 20), [diag, plain, plain, plain])
    assert len(pipe.sink.recent) == 7  # bounded
    assert [len(batch) for batch in seen] == [4, 4, 4, 4]
    assert pipe.sample(torch.randn(2, 20), []).records == []


def test_records_are_built_lazily_and_every_reader_sees_the_same_objects(tmp_path: Path) -> None:
    seen: list[list[TokenRecord]] = []
    path = tmp_path / "records.jsonl"
    settings = _settings(records_path=str(path), diagnostics_max="10")
    diag = RowState.of(
        parse_request_options({"qr_diagnostic_mode": True}, settings.sampling()).config
    )
    pipe = SamplingPipeline(settings, listeners=[seen.append])
    result = pipe.sample(torch.randn(3, 40), [diag] * 3)
    assert seen[0] is result.records  # listeners, ring and result share one list
    assert list(pipe.sink.recent) == result.records
    assert result.token_ids == [r.token_id for r in result.records]
    quiet = SamplingPipeline(_settings(records_path=str(tmp_path / "quiet.jsonl")))
    later = quiet.sample(torch.randn(2, 40), [RowState.of(settings.sampling(), "q")] * 2)
    first_step = later.records  # built once, whichever thread asked first
    quiet.sample(torch.randn(2, 40), [RowState.of(settings.sampling(), "q")] * 2)
    assert later.records is first_step and [r.step for r in first_step] == [1, 1]
    quiet.close()
    pipe.close()
    assert read_records(tmp_path / "quiet.jsonl")[:2] == [r.to_dict() for r in first_step]


class _SlowSource(EntropySource):
    """A local source whose fetch takes 0.3 s and notes when it ran."""

    name = "slow_test"

    def __init__(self) -> None:
        self.inner = MockUniformSource(seed=5)
        self.spans: list[tuple[float, float]] = []

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        start = time.monotonic()
        time.sleep(0.3)
        out = self.inner.fetch(sizes)
        self.spans.append((start, time.monotonic()))
        return out


def test_the_fetch_overlaps_the_u_independent_device_work() -> None:
    """The step starts the entropy fetch first and queues the statistics and
    the head while it is in flight (prepare runs inside the fetch's span);
    the selection, which needs u, waits for it. The answers are those of the
    sequential path (choose with the same u)."""
    source = _SlowSource()
    pipe = SamplingPipeline(_settings(), source=source, sink=RecordSink(None))
    prepared_at: list[float] = []
    real_prepare = pipe.prepare

    def prepare(*args: Any) -> Any:
        prepared_at.append(time.monotonic())
        return real_prepare(*args)

    pipe.prepare = prepare  # type: ignore[method-assign]
    rng = np.random.default_rng(4)
    logits = torch.from_numpy(grid_logits(rng, 6, 3000, spread=6.0))
    rows = [RowState.of(SamplingConfig(top_k=k)) for k in (0, 0, 50, 0, 7, 0)]
    result = pipe.sample(logits.clone(), rows)
    ((start, end),) = source.spans
    assert len(prepared_at) == 1 and start <= prepared_at[0] < end
    u = np.array([r.u for r in result.records])
    tokens, _ = pipe.choose(logits.clone(), None, rows, u)
    assert result.token_ids == tokens.tolist()
    pipe.close()


def test_the_settings_block_is_reused_only_for_the_same_rows() -> None:
    """A step over the same (or equal) rows in the same order reuses the last
    settings block object (a captured CUDA step then copies no settings);
    other rows, or the same rows reordered, get a new block with their own
    settings; a step leaves the block unchanged (u is never written into it)."""
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(settings, source=MockUniformSource(seed=3), sink=RecordSink(None))
    a = RowState.of(SamplingConfig(fixed_temperature=0.5), "a")
    b = RowState.of(SamplingConfig(top_k=5), "b")
    block = pipe._settings_block([a, b])
    assert pipe._settings_block([a, b]) is block
    twin = RowState.of(SamplingConfig(fixed_temperature=0.5), "a")  # equal, not the same
    assert twin is not a and pipe._settings_block((twin, b)) is block
    assert not block.flags.writeable
    swapped = pipe._settings_block([b, a])
    assert swapped is not block and np.array_equal(swapped, block[::-1])
    c = RowState.of(SamplingConfig(fixed_temperature=0.9), "c")
    other = pipe._settings_block([a, c])
    assert other is not swapped and other[1].tolist() == list(c.params)
    before = other.copy()
    for _ in range(2):
        pipe.sample(torch.randn(2, 64) * 3, [a, c])
    assert pipe._settings_block([a, c]) is other
    assert np.array_equal(other, before)


def test_the_step_plan_is_reused_only_for_the_same_block_and_shape() -> None:
    """The host's plan of a step (radix rows, head size, ...) is computed once
    per settings block: the same block object, vocabulary, device and mode
    give the last plan back; another block, another vocabulary or another
    chunk setting give a new plan with their own values."""
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(settings, source=MockUniformSource(seed=3), sink=RecordSink(None))
    cpu = torch.device("cpu")
    plain = RowState.of(SamplingConfig(), "plain")
    top = RowState.of(SamplingConfig(top_k=5), "top")
    block = pipe._settings_block([plain, top])
    plan = pipe._plan(block, 1000, cpu, "torch")
    assert plan.radix.tolist() == [True, False] and plan.use_radix and plan.use_head
    assert plan.head_size == 1024 and plan.small and not plan.radix.flags.writeable
    assert pipe._plan(block, 1000, cpu, "torch") is plan
    wide = pipe._plan(block, 100_000, cpu, "torch")  # another vocabulary
    assert wide is not plan and not wide.small and wide.head_now
    assert pipe._plan(block, 1000, cpu, "off").radix.tolist() == [False, False]
    only = pipe._settings_block([top])
    solo = pipe._plan(only, 1000, cpu, "torch")
    assert solo.radix.tolist() == [False] and not solo.use_radix and solo.head_size == 16
    pipe.chunk = 8
    assert pipe._plan(only, 1000, cpu, "torch") is not solo
    assert pipe._plan(only, 1000, cpu, "torch").chunk == 8
