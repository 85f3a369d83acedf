"""CUDA graphs of the device step (qr_sampler.step_graphs).

The cache policy is tested everywhere with a stand-in for the capture (CUDA
graphs need a GPU; CI has none). The graphs themselves are tested on CUDA
only: a graphed pipeline must give, step after step, exactly the eager
pipeline's tokens and result blocks, with one host sync per step."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pytest
import torch

from qr_sampler import step_graphs
from qr_sampler.config import SamplingConfig, load_settings
from qr_sampler.entropy.mock import MockUniformSource
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none in CI)")


@pytest.fixture
def fake_capture(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Replaces the capture (which needs CUDA) by a recorder."""
    calls: list[tuple[Any, ...]] = []

    def capture(*args: Any) -> Any:
        calls.append(args)
        return f"graph {len(calls)}"

    monkeypatch.setattr(step_graphs, "_capture", capture)
    return calls


def _get(graphs: step_graphs.StepGraphs, key: str) -> Any:
    """One step's use of the cache, as the pipeline's: a lookup, then a capture
    when there is no graph yet."""
    graph = graphs.get(key)
    if graph is None:
        sub, dev = torch.zeros(1, 4), torch.zeros(1, 10)
        graph = graphs.capture(key, sub, dev, lambda *a: (), lambda *a: (a[0], a[1]))
    return graph


def test_a_shape_is_captured_once_after_repeating(fake_capture: list[Any]) -> None:
    graphs = step_graphs.StepGraphs(after=2, keep=2)
    assert [_get(graphs, "a") for _ in range(2)] == [None, None]
    assert _get(graphs, "a") == "graph 1"  # third step in a row: captured
    assert [_get(graphs, "a") for _ in range(3)] == ["graph 1"] * 3
    assert len(fake_capture) == 1 and graphs.captures == 1


def test_alternating_shapes_are_not_captured(fake_capture: list[Any]) -> None:
    graphs = step_graphs.StepGraphs(after=2, keep=2)
    for _ in range(5):
        assert _get(graphs, "a") is None
        assert _get(graphs, "b") is None
    assert not fake_capture


def test_at_most_keep_shapes_are_held(fake_capture: list[Any]) -> None:
    graphs = step_graphs.StepGraphs(after=1, keep=2)
    for key in ("a", "b", "c"):
        _get(graphs, key)
        assert _get(graphs, key) is not None
    assert list(graphs._graphs) == ["b", "c"]  # "a" was the least recently used
    assert _get(graphs, "a") is None  # dropped: it must repeat again
    assert _get(graphs, "a") == "graph 4"


def test_a_failed_capture_turns_graphs_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(step_graphs, "_capture", broken)
    graphs = step_graphs.StepGraphs(after=0, keep=2)
    with caplog.at_level(logging.WARNING, logger="qr_sampler"):
        assert _get(graphs, "a") is None
    assert not graphs.enabled
    assert "CUDA graphs of the sampling step unavailable" in caplog.text
    assert _get(graphs, "a") is None  # eager from now on


def test_close_drops_the_captured_shapes(fake_capture: list[Any]) -> None:
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(settings, source=MockUniformSource(seed=1), sink=RecordSink(None))
    pipe.graphs.after = 0
    assert _get(pipe.graphs, "a") == "graph 1"
    pipe.close()
    assert not pipe.graphs._graphs and _get(pipe.graphs, "b") == "graph 2"


def test_cpu_steps_never_consult_the_graphs(fake_capture: list[Any]) -> None:
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(settings, source=MockUniformSource(seed=1), sink=RecordSink(None))
    rows = [RowState.of(SamplingConfig(), f"r{i}") for i in range(3)]
    for _ in range(5):
        pipe.choose(torch.randn(3, 500), None, rows, np.full(3, 0.5))
    assert not fake_capture and pipe.graphs._last is None


def test_the_setting_turns_graphs_off_and_names_itself_when_bad() -> None:
    def pipe(value: str) -> SamplingPipeline:
        env = {"QR_ENTROPY_SOURCE_TYPE": "mock_uniform", "QR_CUDA_GRAPHS": value}
        settings = load_settings(env=env, env_file=None)
        return SamplingPipeline(settings, source=MockUniformSource(seed=1), sink=RecordSink(None))

    assert pipe("auto").graphs.enabled is True
    assert pipe("off").graphs.enabled is False
    with pytest.raises(ValueError, match=r"QR_CUDA_GRAPHS.*'auto' or 'off'"):
        load_settings(env={"QR_CUDA_GRAPHS": "always"}, env_file=None)


# -- on CUDA ---------------------------------------------------------------------

VOCAB = 151_936


def _pipeline(graphs: bool) -> SamplingPipeline:
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(settings, source=MockUniformSource(seed=1), sink=RecordSink(None))
    pipe.graphs.enabled = graphs
    return pipe


ROWS = {
    "default": [SamplingConfig()] * 6,
    "top_k_top_p": [SamplingConfig(top_k=50, top_p=0.9)] * 5,
    "mixed": [
        SamplingConfig(),
        SamplingConfig(top_k=50, top_p=0.9),
        SamplingConfig(fixed_temperature=0.0),
        SamplingConfig(temperature_strategy="edt"),
        SamplingConfig(min_p=0.05),
        SamplingConfig(top_p=0.5, fixed_temperature=1.3),
    ],
}


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(ROWS))
def test_graphed_steps_equal_eager_steps(kind: str, dtype: torch.dtype) -> None:
    """Eight steps with new logits and u each: the graphed pipeline (captured
    at its third step) gives the eager pipeline's tokens and result blocks
    bit for bit. From the fifth step the rows' temperatures change now and
    then (the same graph: its settings are copied in again when they
    change, and only then). Where every row is in the radix search, the
    graph reads each step's logits where they are (no copy), and at the
    fourth step (logits not 16-byte aligned) and the seventh (logits with a
    wider row stride) through its own buffer."""
    first = [RowState.of(c, f"r{i}") for i, c in enumerate(ROWS[kind])]
    hotter = [
        RowState.of(c.model_copy(update={"fixed_temperature": c.fixed_temperature * 1.5}), f"h{i}")
        for i, c in enumerate(ROWS[kind])
    ]
    n = len(first)
    graphed, eager = _pipeline(True), _pipeline(False)
    gen = torch.Generator(device="cuda").manual_seed(5)
    rng = np.random.default_rng(5)
    for step in range(8):
        logits = (torch.randn(n, VOCAB, device="cuda", generator=gen) * 3).to(dtype)
        if step % 2:
            logits[0, 7] = float("inf")  # lse not finite: the exact fallback after the sync
        u = rng.uniform(1e-10, 1 - 1e-10, n)
        a, b = logits.clone(), logits.clone()
        if step == 6:  # rows 64 elements apart more than usual: another layout
            a = torch.full((n, VOCAB + 64), float("nan"), dtype=dtype, device="cuda")[:, :VOCAB]
            a.copy_(logits)
        if step == 3:  # the same layout, one element past an aligned address
            a = torch.full((n * VOCAB + 1,), float("nan"), dtype=dtype, device="cuda")[1:]
            a = a.view(n, VOCAB)
            a.copy_(logits)
        rows = hotter if step in (4, 5, 7) else first
        ids_g, host_g = graphed.choose(a, None, rows, u)
        ids_e, host_e = eager.choose(b, None, rows, u)
        assert ids_g.tolist() == ids_e.tolist(), step
        assert np.array_equal(host_g, host_e, equal_nan=True), step
    assert graphed.graphs.captures == 1
    assert eager.graphs.captures == 0
    (graph,) = graphed.graphs._graphs.values()
    assert (graph.addr is not None) == (kind == "default")


@cuda
def test_graphed_rows_of_a_larger_batch_and_forcing() -> None:
    """``sample`` with row indices (some rows bypassed): the graph copies the
    listed rows in, forcing touches only them, and the tokens equal eager."""
    rows = [RowState.of(SamplingConfig(), f"r{i}") for i in range(3)]
    graphed, eager = _pipeline(True), _pipeline(False)
    gen = torch.Generator(device="cuda").manual_seed(8)
    for step in range(5):
        logits = torch.randn(5, VOCAB, device="cuda", generator=gen)
        a, b = logits.clone(), logits.clone()
        got = graphed.sample(a, rows, row_indices=[4, 0, 2])
        want = eager.sample(b, rows, row_indices=[4, 0, 2])
        assert got.rows == [4, 0, 2]
        assert got.token_ids == want.token_ids, step
        assert torch.equal(a[[1, 3]], logits[[1, 3]])  # bypassed rows untouched
        for row, tok in zip(got.rows, got.token_ids, strict=True):
            assert a[row, tok] == 0 and int(torch.isfinite(a[row]).sum()) == 1
    assert graphed.graphs.captures == 1


@cuda
def test_graphed_steps_fetch_in_the_calling_thread_after_queuing() -> None:
    """Eager steps fetch on the helper thread beside prepare; once the step
    replays graphs, prepare is queued first and the fetch runs in the
    calling thread (no GIL contention with a helper), after the logits exist."""
    pipe = _pipeline(True)
    calls: list[tuple[str, int]] = []
    real_prepare, real_draw = pipe.prepare, pipe.draw

    def prepare(*args: Any) -> Any:
        calls.append(("prepare", threading.get_ident()))
        return real_prepare(*args)

    def draw(rows: Any) -> Any:
        calls.append(("draw", threading.get_ident()))
        return real_draw(rows)

    pipe.prepare = prepare  # type: ignore[method-assign]
    pipe.draw = draw  # type: ignore[method-assign]
    rows = [RowState.of(SamplingConfig(), f"r{i}") for i in range(3)]
    logits = torch.randn(3, VOCAB, device="cuda")
    me = threading.get_ident()
    seen = []
    for _ in range(5):
        calls.clear()
        result = pipe.sample(logits.clone(), rows)
        seen.append(dict(calls)["draw"] == me)
        assert all(r.entropy_source == "mock_uniform" for r in result.records)
    assert seen == [False, False, False, True, True]  # captured at the third step
    assert [name for name, _ in calls] == ["prepare", "draw"]


def _syncs(fn: Any) -> list[str]:
    """The host<->device synchronisations ``fn`` performs (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as caught:  # fails when fn does not sync at all
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


@cuda
def test_a_graphed_step_syncs_once() -> None:
    """The result block's copy is the step's one sync, graphed as eagerly."""
    rows = [RowState.of(SamplingConfig(), f"r{i}") for i in range(4)]
    graphed, eager = _pipeline(True), _pipeline(False)
    logits = torch.randn(4, VOCAB, device="cuda") * 3
    for _ in range(4):
        graphed.sample(logits.clone(), rows)
        eager.sample(logits.clone(), rows)
    assert graphed.graphs.captures == 1
    work = logits.clone()
    syncs = _syncs(lambda: graphed.sample(work, rows))
    assert len(syncs) == 1, syncs
    work = logits.clone()
    syncs = _syncs(lambda: eager.sample(work, rows))
    assert len(syncs) == 1, syncs
