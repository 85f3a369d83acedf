"""The sampling pipeline: a logits batch and per-row settings in, chosen tokens
and provenance records out. Engine-agnostic; the vLLM adapter is a thin edge.

One step, for the rows qr-sampler controls (bypassed rows are never touched):

1. note the time: the logits exist now (``step_started_ns``);
2. fetch entropy just in time — one batched call for every row's bytes, on a
   helper thread, while the device already computes what needs no u
   (statistics, temperatures, the chunked head: :meth:`SamplingPipeline.prepare`);
   once a step shape replays as CUDA graphs (:mod:`qr_sampler.step_graphs`)
   that work is queued first and the fetch runs in the calling thread;
3. amplify each row's bytes into z and u (:mod:`qr_sampler.sampling.amplify`);
4. send the per-row settings (before the fetch returns) and then u to the
   logits' device, each in one pinned copy without a sync;
5. temperature per row — fixed or EDT (:mod:`qr_sampler.sampling.temperature`);
6. select by rank with u (:mod:`qr_sampler.sampling.select`): fused row
   statistics (max, entropy, logsumexp at T), then a chunked head ordered
   without sorting the vocabulary; rows it cannot resolve take the tail
   histogram or a full sort after a second, small sync (on CUDA, rows without
   top-k/top-p take the exact radix search over value keys instead, a Triton
   kernel with no second sync: :attr:`SamplingPipeline.radix`);
7. force each row to its token (0 there, -inf elsewhere) in place;
8. bring the per-row results to the host in one copy and emit one record per row.

Entropy failures never raise out of :meth:`SamplingPipeline.sample`: with a
fallback configured the source wrapper serves labelled fallback bytes; in
``error`` mode the affected rows are forced to EOS and recorded as failed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from qr_sampler.config import QRSettings, SamplingConfig
from qr_sampler.entropy.base import EntropyChunk, EntropySource
from qr_sampler.entropy.registry import build_entropy
from qr_sampler.errors import EntropyError
from qr_sampler.records import SCHEMA_VERSION, RecordBatch, RecordSink, TokenRecord
from qr_sampler.sampling.amplify import amplify
from qr_sampler.sampling.select import (
    DEFAULT_CHUNK,
    DEFAULT_HEAD,
    RowStats,
    Selection,
    SelectionParams,
    applied_temperature,
    call_fused,
    chunked_head,
    force_tokens,
    fused_ready,
    log_normalizer,
    peaked_top_tokens,
    radix_eligible,
    row_stats,
    select_in_head,
    select_radix,
    select_rest,
    select_sorted,
    set_fused_kernels,
    top_token_probability,
)
from qr_sampler.sampling.temperature import temperatures
from qr_sampler.step_graphs import StepGraph, StepGraphs

logger = logging.getLogger("qr_sampler")

Stage = tuple[torch.Tensor, ...]
Pair = tuple[torch.Tensor, torch.Tensor]

# columns of the per-row parameter block sent to the device
_U, _FIXED, _EDT, _BASE, _EXP, _TMIN, _TMAX, _TOPK, _TOPP, _MINP = range(10)
_NPARAMS = 10
# columns of the per-row result block brought back
_TOK, _RANK, _PROB, _NCAND, _RESOLVED, _TEMP, _ENT = range(7)


@dataclass(frozen=True, slots=True)
class RowState:
    """One request's settings in the form the pipeline uses every step."""

    config: SamplingConfig
    request_id: str = ""
    params: tuple[float, ...] = field(default=())

    @classmethod
    def of(cls, config: SamplingConfig, request_id: str = "") -> RowState:
        c = config
        params = (
            0.0,
            c.fixed_temperature,
            1.0 if c.temperature_strategy == "edt" else 0.0,
            c.edt_base_temp,
            c.edt_exponent,
            c.edt_min_temp,
            c.edt_max_temp,
            float(c.top_k),
            c.top_p,
            c.min_p,
        )
        return cls(config=config, request_id=request_id, params=params)


@dataclass(frozen=True, slots=True)
class Draw:
    """Entropy for one step: per-row chunks, z, u, and failure flags."""

    chunks: list[EntropyChunk | None]
    sample_mean: np.ndarray
    z: np.ndarray
    u: np.ndarray
    failed: np.ndarray  # bool: no entropy (error mode)
    fetch_latency_ns: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step chose: token ids per controlled row (host) and the records.

    ``batch`` may be handed over unbuilt (a :class:`RecordBatch` or a list);
    :attr:`records` builds it on first use and is the list the sink writes.
    """

    rows: list[int]
    token_ids: list[int]
    batch: RecordBatch | list[TokenRecord]

    def __post_init__(self) -> None:
        if not isinstance(self.batch, RecordBatch):
            object.__setattr__(self, "batch", RecordBatch.of(self.batch))

    @property
    def records(self) -> list[TokenRecord]:
        batch = self.batch
        return batch.records() if isinstance(batch, RecordBatch) else batch


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What :meth:`SamplingPipeline.prepare` queued on the device for one step."""

    sub: torch.Tensor  # the controlled rows' logits
    dev: torch.Tensor  # their settings on the device (u filled in by finish)
    mode: str  # radix mode
    radix: np.ndarray  # rows the radix search serves
    use_radix: bool
    use_head: bool
    small: bool  # vocabulary too small for a head: full sort
    stage: Stage  # _device_prepare's outputs
    search: Any = None  # the radix kernel's search, its first pass queued (radix_begin)
    graph: StepGraph | None = None  # the captured step these ran in, if any
    #: every row peaked (eager CPU, no head): each row's most likely token id
    #: and its probability (float64, host), the answer for a u below it
    top: tuple[torch.Tensor, np.ndarray] | None = None


class _Plan(NamedTuple):
    """How one step runs, from its settings block alone (host, no sync)."""

    fixed: bool  # no EDT row: fixed temperatures, known before the statistics
    radix: np.ndarray  # rows the radix search serves (read-only)
    use_radix: bool
    use_head: bool
    head_size: int
    chunk: int
    small: bool  # vocabulary too small for a head: full sort
    head_now: bool  # the chunked head is built in prepare

    @property
    def key(self) -> tuple[object, ...]:
        """The plan as a hashable key part (the radix rows as bytes)."""
        return (self.fixed, self.radix.tobytes(), *self[2:])


class SamplingPipeline:
    """Turns a logits batch into forced tokens with provenance records."""

    def __init__(
        self,
        settings: QRSettings,
        source: EntropySource | None = None,
        sink: RecordSink | None = None,
        *,
        eos_token_id: int | None = None,
        head_size: int = DEFAULT_HEAD,
        clock: Callable[[], int] = time.time_ns,
        listeners: Sequence[Callable[[list[TokenRecord]], None]] = (),
    ) -> None:
        self.settings = settings
        self.source = source if source is not None else build_entropy(settings)
        self.sink = (
            sink
            if sink is not None
            else RecordSink(settings.records_path or None, ring_size=settings.diagnostics_max)
        )
        self.eos_token_id = eos_token_id
        self.head_size = head_size
        #: token ids per chunk of the chunked head (None: 16 on accelerators, 4 on the CPU)
        self.chunk: int | None = None
        #: selection of rows without top-k/top-p: "off", "kernel", "torch" or
        #: None (kernel on CUDA where Triton imports, else off: see _radix_mode)
        self.radix: str | None = None
        self.clock = clock
        self.listeners = list(listeners)
        self.config_hash = settings.config_hash()
        self.step = 0
        #: captured CUDA graphs of the device step (see :mod:`qr_sampler.step_graphs`)
        self.graphs = StepGraphs()
        self.graphs.enabled = settings.cuda_graphs == "auto"
        self._graphed = False  # the last step replayed graphs (see sample)
        self._block_rows: list[RowState] = []  # the rows of the last settings block
        self._block = np.zeros((0, _NPARAMS))
        # the last step's plan, its settings block and what else it depends on
        self._last_plan: _Plan | None = None
        self._plan_block = self._block
        self._plan_key: tuple[object, ...] = ()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        # error mode's log: when the last ERROR line went out, steps failed since
        self._error_logged_at: float | None = None
        self._errors_unlogged = 0
        if settings.fused_kernels == "off":
            set_fused_kernels(False)
        elif settings.fused_kernels == "on":
            set_fused_kernels(True, devices=("cuda", "cpu"))

    # -- stage 2-3: entropy ------------------------------------------------
    def draw(self, rows: Sequence[RowState]) -> Draw:
        """Fetch and amplify entropy for ``rows``; never raises an EntropyError."""
        n = len(rows)
        sizes = [r.config.sample_count for r in rows]
        start = time.perf_counter_ns()
        try:
            chunks: list[EntropyChunk | None] = list(self.source.fetch(sizes))
            error = ""
        except EntropyError as exc:
            chunks = [None] * n
            error = f"{exc.reason}: {exc}"[:200]
            self._log_failed_step(n, error)
        latency = time.perf_counter_ns() - start
        failed = np.array([c is None for c in chunks], dtype=bool)
        if failed.all():
            nan = np.full(n, np.nan)
            return Draw(chunks, nan, nan, np.full(n, 0.5), failed, latency, error)
        amp = amplify(
            [c.data if c is not None else b"\x80" for c in chunks],
            population_mean=np.array([r.config.population_mean for r in rows]),
            population_std=np.array([r.config.population_std for r in rows]),
            epsilon=np.array([r.config.uniform_clamp_epsilon for r in rows]),
        )
        return Draw(chunks, amp.sample_mean, amp.z, amp.u, failed, latency, error)

    def _log_failed_step(self, n: int, error: str) -> None:
        """One ERROR line for a step without entropy (error mode), then at most
        one every :data:`ERROR_LOG_EVERY_S` seconds, counting the failed steps
        in between: a dead source fails every step, and its records say so."""
        now = time.monotonic()
        last = self._error_logged_at
        if last is not None and now - last < ERROR_LOG_EVERY_S:
            self._errors_unlogged += 1
            return
        more = self._errors_unlogged
        since = f" ({more} more failed step(s) since the last message)" if more else ""
        logger.error("no entropy for %d row(s) in error mode: %s; forcing EOS%s", n, error, since)
        self._error_logged_at, self._errors_unlogged = now, 0

    # -- stage 4-7: selection on the device ----------------------------------
    def choose(
        self,
        logits: torch.Tensor,
        row_index: torch.Tensor | None,
        rows: Sequence[RowState],
        u: np.ndarray,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Select tokens for ``rows`` (rows of ``logits`` given by ``row_index``,
        all rows if None). Returns device token ids and the host result block.

        One host<->device sync in a normal step (the result block's copy); the
        settings go over without one (pinned, non-blocking). Rows the chunked
        head cannot resolve cost a second, small sync and the tail histogram or
        a full sort of those rows; with the radix search on (``self.radix``,
        the default on CUDA), rows without top-k/top-p never do. Same as :meth:`prepare` then
        :meth:`finish`.
        """
        return self.finish(self.prepare(logits, row_index, rows), u)

    def prepare(
        self, logits: torch.Tensor, row_index: torch.Tensor | None, rows: Sequence[RowState]
    ) -> _Prepared:
        """The u-independent part of :meth:`choose`, queued on the logits'
        device without a sync: row statistics, temperatures, the normaliser and
        the chunked head. :meth:`sample` runs it while the entropy is fetched."""
        block = self._settings_block(rows)
        device = logits.device
        mode = self._radix_mode(device)
        vocab = logits.shape[-1]
        plan = self._plan(block, vocab, device, mode)
        fixed, radix, use_radix, use_head, head_size, chunk, small, head_now = plan

        def replay(graph: StepGraph) -> _Prepared:  # this step's inputs in, then replay
            sub = graph.run_prepare(logits, row_index, block)
            flags = (mode, radix, use_radix, use_head, small)
            stage, search = graph.stage
            return _Prepared(sub, graph.dev, *flags, stage, search, graph)

        graph_key: tuple[object, ...] | None = None
        if device.type == "cuda" and self.graphs.enabled:
            graph_key = (logits.dtype, row_index is None, self._plan_key, plan.key)
            graph = self.graphs.get(graph_key)
            if graph is not None:
                return replay(graph)
        dev = _to_device(block, device)
        sub = logits if row_index is None else logits.index_select(0, row_index)
        which = None
        if use_radix and mode == "kernel":  # the rows of the radix kernel, as device ids
            every = radix.all()  # (the usual case: no copy)
            which = (
                torch.arange(len(rows), device=device)
                if every
                else _to_device(np.flatnonzero(radix).astype(np.int64), device)
            )

        # fixed temperatures on CUDA with Triton: the row statistics in its kernels
        # (not after they failed once: then no graph reads through an address)
        kernel_stats = fixed and mode == "kernel" and device.type == "cuda" and _STATS_KERNEL["ok"]
        # ... and every row in the radix search: only Triton kernels read the
        # logits, so a captured step can read them where the caller has them
        indirect = kernel_stats and row_index is None and use_radix and not use_head

        def stage_on(
            s: torch.Tensor, d: torch.Tensor, head: bool, addr: torch.Tensor | None = None
        ) -> Stage:
            given = _kernel_stats(s, d, addr) if kernel_stats else None
            if addr is not None and given is None:  # the compiled statistics read ``s``
                raise RuntimeError("row statistics kernel unavailable for an indirect capture")
            return call_fused(  # type: ignore[no-any-return]
                "pipeline_prepare",
                _device_prepare,
                device,
                s,
                d,
                fixed,
                head_size,
                chunk,
                head,
                given,
            )

        def prepare_on(
            s: torch.Tensor, d: torch.Tensor, addr: torch.Tensor | None = None
        ) -> tuple[Stage, Any]:
            # the search holds ``which``: a captured graph keeps it alive through it
            st = stage_on(s, d, head_now, addr)
            return st, _radix_begin(s, which, st, d, addr)

        def finish_on(s: torch.Tensor, d: torch.Tensor, u: torch.Tensor, st: Any) -> Pair:
            return _select_on_device(s, d, u, st[0], st[1], use_head, use_radix, mode, small)

        if graph_key is not None:
            graph = self.graphs.capture(graph_key, sub, dev, prepare_on, finish_on, indirect)
            if graph is not None:
                return replay(graph)
        # eager on the CPU the host may look at the statistics for free: the head
        # is built only for rows it can plausibly resolve (see _head_where_useful)
        pick_rows = head_now and device.type == "cpu"
        search, top = None, None
        if pick_rows and not fused_ready("pipeline_prepare", device):
            stage = _head_where_useful(sub, block, stage_on(sub, dev, False), head_size, chunk)
            use_head = bool(stage[7].any())  # some row has a head (exact length > 0)
            if not (use_head or use_radix):
                # peaked rows (a language model's usual step): find their most
                # likely tokens now, while the entropy is still on its way, so
                # that finish() has only u to compare
                found = peaked_top_tokens(
                    sub, _selection_params(dev, stage[0]), _stage_stats(stage), TOP_FIRST
                )
                top = None if found is None else (found[0], found[1].numpy())
        else:
            stage, search = prepare_on(sub, dev)
        flags = (mode, radix, use_radix, use_head, small)
        return _Prepared(sub, dev, *flags, stage, search, top=top)

    def _settings_block(self, rows: Sequence[RowState]) -> np.ndarray:
        """The rows' settings as a float64 block (read-only); the last step's
        block object itself when the rows equal the last step's, in the same
        order (a steady decode batch: a captured step then copies no settings).
        Equal rows hold equal settings; the adapter's are the same objects,
        which the list comparison matches by identity, in C."""
        last = self._block_rows
        if len(last) == len(rows) and last == list(rows):
            return self._block
        block = np.array([r.params for r in rows], dtype=np.float64).reshape(len(rows), _NPARAMS)
        block.flags.writeable = False
        self._block_rows, self._block = list(rows), block
        return block

    def _plan(self, block: np.ndarray, vocab: int, device: torch.device, mode: str) -> _Plan:
        """How a step over the settings ``block`` runs (see :class:`_Plan`);
        the last step's plan when the block is the same object (read-only:
        see :meth:`_settings_block`) and nothing else it depends on changed."""
        chunk = self.chunk or (4 if device.type == "cpu" else DEFAULT_CHUNK)
        key = (vocab, device, mode, self.head_size, chunk)
        last = self._last_plan
        if last is not None and block is self._plan_block and key == self._plan_key:
            return last
        # no EDT row: the temperatures are known now and one pass gives every statistic
        fixed = not block[:, _EDT].any()
        radix = _radix_rows(block, vocab) if mode != "off" else np.zeros(len(block), bool)
        radix.flags.writeable = False
        use_radix, use_head = bool(radix.any()), not bool(radix.all())
        head_size = _head_for(block, self.head_size)
        n_full = vocab // chunk
        small = n_full == 0 or n_full + (1 if vocab % chunk else 0) <= head_size
        flags = (fixed, radix, use_radix, use_head, head_size, chunk, small, use_head and not small)
        plan = _Plan(*flags)
        self._last_plan, self._plan_block, self._plan_key = plan, block, key
        return plan

    def finish(self, prep: _Prepared, u: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The u-dependent part of :meth:`choose`: selection, the result block
        to the host (the step's sync) and the rare exact fallback."""
        sub, dev = prep.sub, prep.dev
        u64 = np.asarray(u, dtype=np.float64)
        t, entropy = prep.stage[:2]
        stats = _stage_stats(prep.stage)
        if prep.graph is not None:
            token_ids, out = prep.graph.run_finish(u64)
        elif not (prep.use_head or prep.use_radix):
            # no row has a head (eager CPU, e.g. peaked or flat plain rows): every
            # row takes the exact fallback straight away
            if prep.top is not None and bool((u64 < prep.top[1]).all()):
                # every row's u below its most likely token's probability: that
                # token, as the fallback would answer (found in prepare)
                ids, p_top = prep.top
                rest = Selection(
                    ids, torch.zeros_like(ids), torch.from_numpy(p_top), stats.num_finite
                )
            else:
                dev[:, _U] = _to_device(u64, sub.device)
                top_ids = None if prep.top is None else prep.top[0]
                rest = select_rest(sub, _selection_params(dev, t), stats, top_ids)
            return rest.token_ids, self._to_host(rest, torch.ones_like(rest.rank), t, entropy)
        else:
            flags = (prep.use_head, prep.use_radix, prep.mode, prep.small)
            u_dev = _to_device(u64, sub.device)
            token_ids, out = _select_on_device(sub, dev, u_dev, prep.stage, prep.search, *flags)
        host: np.ndarray = out.cpu().numpy()  # the one sync of a normal step
        pending = np.flatnonzero(host[:, _RESOLVED] == 0)
        if pending.size:
            params = _selection_params(dev, t)
            idx = _to_device(pending, sub.device)
            rest = select_rest(
                sub if pending.size == sub.shape[0] else sub.index_select(0, idx),
                SelectionParams(*(getattr(params, f).index_select(0, idx) for f in _PARAM_FIELDS)),
                stats.take(idx),
            )
            token_ids = token_ids.index_copy(0, idx, rest.token_ids)
            host[pending] = self._to_host(
                rest,
                torch.ones_like(rest.rank),
                t.index_select(0, idx),
                entropy.index_select(0, idx),
            )
        return token_ids, host

    def _radix_mode(self, device: torch.device) -> str:
        """How rows without top-k/top-p are selected: "off" (chunked head, then
        the tail histogram or a sort: the CPU default), "kernel" (the exact
        radix search in Triton kernels, one host sync per step: the CUDA
        default) or "torch" (the same search in torch ops, for tests).
        "kernel" falls back to "off" where Triton is missing."""
        mode = self.radix or ("kernel" if device.type == "cuda" else "off")
        if mode != "kernel":
            return mode
        if _RADIX_KERNEL.get("ok") is None:
            try:
                from qr_sampler.sampling import radix_kernel  # noqa: F401
            except Exception as exc:  # no Triton here: the head path stays exact
                logger.warning("radix kernel unavailable (%s); using the chunked head", exc)
                _RADIX_KERNEL["ok"] = False
            else:
                _RADIX_KERNEL["ok"] = True
        return "kernel" if _RADIX_KERNEL["ok"] else "off"

    @staticmethod
    def _to_host(
        sel: Selection, resolved: torch.Tensor, t: torch.Tensor, entropy: torch.Tensor
    ) -> np.ndarray:
        cols = [sel.token_ids, sel.rank, sel.prob, sel.num_candidates, resolved, t, entropy]
        if sel.token_ids.device.type == "cpu":  # the same float64 block, without torch's ops
            return np.column_stack([c.numpy().astype(np.float64) for c in cols])
        return torch.stack([c.double() for c in cols], dim=1).cpu().numpy()

    # -- the whole step --------------------------------------------------------
    def sample(
        self,
        logits: torch.Tensor,
        rows: Sequence[RowState],
        row_indices: Sequence[int] | None = None,
        step_started_ns: int | None = None,
    ) -> StepResult:
        """Sample and force ``rows`` of ``logits`` in place (all rows if
        ``row_indices`` is None, else ``rows[i]`` drives ``logits[row_indices[i]]``)."""
        started = step_started_ns if step_started_ns is not None else self.clock()
        t0 = time.perf_counter_ns()
        self.step += 1
        index_list = list(range(logits.shape[0])) if row_indices is None else list(row_indices)
        if not rows:
            return StepResult([], [], [])
        row_index = (
            None
            if row_indices is None
            else _to_device(np.array(index_list, dtype=np.int64), logits.device)
        )
        if self._graphed:
            # the last step replayed CUDA graphs: queuing the u-independent work
            # costs the host ~0.1 ms, so queue it first and fetch in this thread
            # while the device works (a helper thread would only contend with
            # this one for the GIL)
            prep = self.prepare(logits, row_index, rows)
            draw = self.draw(rows)
        else:
            # the fetch starts now (the logits exist) and runs while this thread
            # queues (eager on the CPU: computes) the u-independent work; u is
            # needed only by finish()
            fetching = self._fetcher().submit(self.draw, rows)
            try:
                prep = self.prepare(logits, row_index, rows)
            finally:
                draw = fetching.result()  # never two fetches at once, even after an error
        self._graphed = prep.graph is not None
        token_ids, host = self.finish(prep, draw.u)
        if draw.failed.any() and self.eos_token_id is not None:
            eos = torch.from_numpy(draw.failed).to(logits.device)
            token_ids = torch.where(eos, torch.full_like(token_ids, self.eos_token_id), token_ids)
            host[draw.failed, _TOK] = self.eos_token_id
        force_tokens(logits, row_index, token_ids)
        # Records are built when first read: here when listeners or the
        # diagnostics ring want them, else on the record writer's thread.
        latency, now, step = time.perf_counter_ns() - t0, self.clock(), self.step
        rows, host = list(rows), host.copy()  # the batch owns what it builds from
        batch = RecordBatch(
            len(rows),
            lambda: self._records(rows, index_list, draw, host, started, latency, now, step),
        )
        keep = any(r.config.diagnostic_mode for r in rows)
        self.sink.emit(batch, keep_recent=keep)
        if self.listeners:
            records = batch.records()
            for listener in self.listeners:
                listener(records)
        return StepResult(index_list, host[:, _TOK].astype(np.int64).tolist(), batch)

    def _records(
        self,
        rows: Sequence[RowState],
        index_list: list[int],
        draw: Draw,
        host: np.ndarray,
        started: int,
        latency_ns: int,
        now: int | None = None,
        step: int | None = None,
    ) -> list[TokenRecord]:
        now = self.clock() if now is None else now
        step = self.step if step is None else step
        failed = draw.failed
        # whole columns to Python numbers at once (per-element numpy indexing
        # costs more than building the record itself)
        tokens = host[:, _TOK].astype(np.int64).tolist()
        ranks = np.where(failed, -1, host[:, _RANK]).astype(np.int64).tolist()
        probs = np.where(failed, np.nan, host[:, _PROB]).tolist()
        ncands = host[:, _NCAND].astype(np.int64).tolist()
        temps = host[:, _TEMP].tolist()
        entropies = host[:, _ENT].tolist()
        us = np.where(failed, np.nan, draw.u).tolist()
        zs = np.asarray(draw.z, dtype=np.float64).tolist()
        means = np.asarray(draw.sample_mean, dtype=np.float64).tolist()
        fails = failed.tolist()
        config_hash, fetch_ns = self.config_hash, draw.fetch_latency_ns
        out: list[TokenRecord] = []
        for i, row in enumerate(rows):
            c = draw.chunks[i]
            cfg = row.config
            out.append(
                TokenRecord(
                    schema=SCHEMA_VERSION,
                    time_ns=now,
                    step_started_ns=started,
                    label=cfg.label,
                    request_id=row.request_id,
                    row=index_list[i],
                    step=step,
                    token_id=tokens[i],
                    rank=ranks[i],
                    probability=probs[i],
                    num_candidates=ncands[i],
                    temperature=temps[i],
                    temperature_strategy=cfg.temperature_strategy,
                    shannon_entropy=entropies[i],
                    u=us[i],
                    z=zs[i],
                    sample_mean=means[i],
                    byte_count=len(c.data) if c is not None else 0,
                    entropy_source=c.source if c is not None else "none",
                    device_id=c.device_id if c is not None else "",
                    server_timestamp_ns=c.generation_timestamp_ns if c is not None else 0,
                    sequence_id=c.sequence_id if c is not None else -1,
                    fallback=c.fallback if c is not None else False,
                    fallback_reason=c.fallback_reason if c is not None else draw.error,
                    health=c.health if c is not None else "off",
                    fetch_latency_ns=fetch_ns,
                    sampling_latency_ns=latency_ns,
                    config_hash=config_hash,
                    failed=fails[i],
                    population_mean=cfg.population_mean,
                    population_std=cfg.population_std,
                    uniform_clamp_epsilon=cfg.uniform_clamp_epsilon,
                )
            )
        return out

    def _fetcher(self) -> ThreadPoolExecutor:
        """The thread that fetches each step's entropy (one, so fetches never
        overlap; made anew in a forked child, where threads do not survive)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qr-sampler-fetch")
            self._pool_pid = os.getpid()
        return self._pool

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None
        self.graphs.clear()  # their buffers' GPU memory
        self.sink.close()
        self.source.close()


_PARAM_FIELDS = ("temperature", "top_k", "top_p", "min_p", "u")
#: error mode: after an ERROR line for a step without entropy, the next one
#: comes at the earliest this many seconds later (with the count in between)
ERROR_LOG_EVERY_S = 10.0
#: whether the Triton radix kernel imports here (decided on first use)
_RADIX_KERNEL: dict[str, bool | None] = {"ok": None}
#: whether the Triton row statistics still run (off after their first failure)
_STATS_KERNEL: dict[str, bool] = {"ok": True}


def _head_for(block: np.ndarray, head_size: int) -> int:
    """Chunks the head needs: when every row keeps at most k tokens (top-k, or
    greedy), a head of 2k chunks (a power of two, >= 16) holds the answer."""
    greedy = (block[:, _EDT] == 0) & (block[:, _FIXED] <= 0)
    k = np.where(greedy, 1.0, block[:, _TOPK])
    if k.size == 0 or (k <= 0).any():
        return head_size
    need = 16
    while need < 2 * k.max():  # ties at tau can leave the exact prefix a little short
        need *= 2
    return min(head_size, need)


def _radix_rows(block: np.ndarray, vocab: int) -> np.ndarray:
    """Rows the radix search answers (sampled, no top-k, no top-p): known on the
    host from the settings, so the device step is specialised without a sync."""
    sampled = (block[:, _EDT] > 0) | (block[:, _FIXED] > 0)
    no_k = (block[:, _TOPK] <= 0) | (block[:, _TOPK] >= vocab)
    result: np.ndarray = sampled & no_k & (block[:, _TOPP] >= 1.0)
    return result


#: a row skips the chunked head (eager CPU) when the head's mass cannot exceed this
HEAD_WORTH = 0.45
#: ... or when its most likely token is at least this likely (the exact fallback
#: answers u below that from the row statistics alone)
TOP_FIRST = 0.9


def _head_where_useful(
    sub: torch.Tensor,
    block: np.ndarray,
    stage: tuple[torch.Tensor, ...],
    head_size: int,
    chunk: int,
) -> tuple[torch.Tensor, ...]:
    """The chunked head for the rows where it can pay off; the others get an
    empty head (exact length 0: unresolved, the exact fallback answers them).

    A row without top-k, top-p or min-p whose head (``head_size * chunk``
    tokens, each at most as likely as the top one) holds under
    :data:`HEAD_WORTH` of the mass is resolved there for less than that share
    of u, while the head costs about half a tail lookup: such rows (flat
    distributions) go straight to the tail histogram. So do such rows whose
    most likely token holds at least :data:`TOP_FIRST` of the mass (peaked
    distributions): the fallback answers u below that with one comparison
    pass, and pays a tail lookup for the rest. Only a routing decision:
    every answer stays exact."""
    t, lse, max_logit = stage[0], stage[2], stage[3]
    t_eff = applied_temperature(t)
    p_top = top_token_probability(max_logit, t_eff, lse)[1].cpu().numpy()
    plain = _radix_rows(block, sub.shape[-1]) & (block[:, _MINP] <= 0)
    need = ~plain | ~(((head_size * chunk) * p_top < HEAD_WORTH) | (p_top >= TOP_FIRST))
    rows = sub.shape[0]
    if need.all():
        vals, idx, exact = chunked_head(sub, t_eff, head_size, chunk)
        return (*stage[:5], vals, idx, exact)
    head = None
    if need.any():
        which = torch.from_numpy(np.flatnonzero(need)).to(sub.device)
        head = chunked_head(
            sub.index_select(0, which), t_eff.index_select(0, which), head_size, chunk
        )
    width = 1 if head is None else head[0].shape[1]  # rows without a head take any width
    vals = torch.full((rows, width), float("-inf"), dtype=torch.float32, device=sub.device)
    idx = torch.zeros(rows, width, dtype=torch.int64, device=sub.device)
    exact = torch.zeros(rows, dtype=torch.int64, device=sub.device)
    if head is not None:
        vals.index_copy_(0, which, head[0])
        idx.index_copy_(0, which, head[1])
        exact.index_copy_(0, which, head[2])
    return (*stage[:5], vals, idx, exact)


def _radix_begin(
    sub: torch.Tensor,
    which: torch.Tensor | None,
    stage: Stage,
    dev: torch.Tensor,
    addr: torch.Tensor | None = None,
) -> Any:
    """The radix kernel's search over the rows in ``which``, its first pass
    (which needs no u) queued; None without such rows or when the kernel fails.
    ``addr``: where the kernels read the rows (see :class:`StepGraph`)."""
    if which is None:
        return None
    from qr_sampler.sampling.radix_kernel import radix_begin

    t, _entropy, lse, max_logit = stage[:4]
    try:
        return radix_begin(sub, which, t, lse, max_logit, dev, _U, _MINP, addr)
    except Exception as exc:  # e.g. the kernel fails to compile on this GPU
        _radix_failed(exc)
        return None


def _kernel_stats(
    sub: torch.Tensor, dev: torch.Tensor, addr: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...] | None:
    """The row statistics at the fixed temperatures from the Triton kernels
    (one read of the logits; the compiled torch statistics take two and run
    ~3x longer), or None where they failed once (then the compiled ones)."""
    if not _STATS_KERNEL["ok"]:
        return None
    from qr_sampler.sampling.radix_kernel import row_stats_kernel

    try:
        return row_stats_kernel(sub, _stats_temperature(dev), addr)
    except Exception as exc:  # e.g. fails to compile on this GPU
        _STATS_KERNEL["ok"] = False
        logger.warning("row statistics kernel failed (%s); using compiled torch ops", exc)
        return None


def _stats_temperature(dev: torch.Tensor) -> torch.Tensor:
    """The temperatures of the row statistics when every row's is fixed
    (float32): the fixed one, and 1 for greedy rows."""
    return torch.where(dev[:, _FIXED] > 0, dev[:, _FIXED], 1.0).float()


def _radix_failed(exc: Exception) -> None:
    _RADIX_KERNEL["ok"] = False  # its rows stay unresolved: the exact fallback answers them
    logger.warning("radix kernel failed (%s); using the chunked head", exc)


def _select_on_device(
    sub: torch.Tensor,
    dev: torch.Tensor,
    u: torch.Tensor,
    stage: Stage,
    search: Any,
    use_head: bool,
    use_radix: bool,
    mode: str,
    small: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device half of :meth:`SamplingPipeline.finish` (no sync; captured
    whole in a CUDA graph once a step shape repeats): u into the settings
    block, the selection and the rest of the radix kernel's ``search``."""
    dev[:, _U] = u
    token_ids, out = call_fused(
        "pipeline_finish",
        _device_finish,
        sub.device,
        sub,
        dev,
        *stage,
        use_head,
        use_radix and mode == "torch",
        small,
    )
    if search is not None:
        from qr_sampler.sampling.radix_kernel import radix_end

        try:
            radix_end(search, token_ids, out)
        except Exception as exc:
            _radix_failed(exc)
    return token_ids, out


def _stage_stats(stage: Stage) -> RowStats:
    """The row statistics among :func:`_device_prepare`'s outputs."""
    return RowStats(stage[3], stage[1], stage[4], stage[2])


def _selection_params(dev: torch.Tensor, t: torch.Tensor) -> SelectionParams:
    return SelectionParams(
        temperature=t,
        top_k=dev[:, _TOPK].long(),
        top_p=dev[:, _TOPP],
        min_p=dev[:, _MINP],
        u=dev[:, _U],
    )


def _device_prepare(
    sub: torch.Tensor,
    dev: torch.Tensor,
    fixed: bool,
    head_size: int,
    chunk: int,
    use_head: bool,
    given: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Stage 5 and the u-independent half of stage 6, host-sync free (compiled
    on CUDA): temperatures, entropy, logsumexp(logits / T), row maxima, finite
    counts and, with ``use_head``, the chunked head (values, ids, exact length;
    empty otherwise). ``given`` (only with ``fixed``): the row statistics at
    the fixed temperatures, already computed (max, entropy, finite count,
    logsumexp)."""
    if given is not None:
        stats = RowStats(*given)
    else:
        # no EDT row: every temperature is the fixed one (greedy rows' statistics at T = 1)
        fixed_t = _stats_temperature(dev) if fixed else None
        stats = row_stats(sub, fixed_t, fused=False)
    if fixed:
        t, entropy = dev[:, _FIXED].float(), stats.entropy
    else:
        t, entropy = temperatures(
            sub,
            is_edt=dev[:, _EDT] > 0,
            fixed=dev[:, _FIXED].float(),
            base=dev[:, _BASE].float(),
            exponent=dev[:, _EXP].float(),
            t_min=dev[:, _TMIN].float(),
            t_max=dev[:, _TMAX].float(),
            entropy=stats.entropy,
        )
    t_eff = applied_temperature(t)
    lse = stats.lse
    if lse is None:
        lse = log_normalizer(sub, stats.max_logit, t_eff, fused=False)
    if use_head:
        vals, idx, exact = chunked_head(sub, t_eff, head_size, chunk)
    else:
        vals = sub.new_zeros(sub.shape[0], 0, dtype=torch.float32)
        idx = exact = torch.zeros(sub.shape[0], 0, dtype=torch.int64, device=sub.device)
    return t, entropy, lse, stats.max_logit, stats.num_finite, vals, idx, exact


def _device_finish(
    sub: torch.Tensor,
    dev: torch.Tensor,
    t: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    max_logit: torch.Tensor,
    num_finite: torch.Tensor,
    vals: torch.Tensor,
    idx: torch.Tensor,
    exact: torch.Tensor,
    use_head: bool,
    use_radix: bool,
    small: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The u-dependent half of stage 6 (compiled on CUDA): token ids and the
    result block (float64, columns _TOK.._ENT).

    ``use_head``: rows with top-k/top-p (all rows unless the radix search is
    on) select inside the chunked head (``small``: the vocabulary is too small
    for a head; the full sort instead); ``use_radix``: rows without top-k/top-p
    take the exact radix search in torch ops (:func:`select_radix`). With
    neither, the selection columns are left 0 (unresolved) for the radix
    kernel to fill."""
    params = _selection_params(dev, t)
    zero = torch.zeros_like(num_finite)
    sel = Selection(zero, zero, zero.double(), zero)
    resolved = torch.zeros_like(zero, dtype=torch.bool)
    if use_head:
        if small:
            sel, resolved = select_sorted(sub, params), torch.ones_like(resolved)
        else:
            sel, resolved = select_in_head(vals, idx, exact, params, lse, num_finite, sub.shape[-1])
    if use_radix:
        found = select_radix(sub, params, lse, max_logit)
        finite = torch.isfinite(lse)  # else (+inf or NaN logits) the exact fallback answers
        if use_head:
            take = radix_eligible(params, sub.shape[-1]) & finite
            sel = Selection(
                *(
                    torch.where(take, getattr(found, f), getattr(sel, f))
                    for f in ("token_ids", "rank", "prob", "num_candidates")
                )
            )
            resolved = resolved | take
        else:
            sel, resolved = found, finite
    cols = [sel.token_ids, sel.rank, sel.prob, sel.num_candidates, resolved, t, entropy]
    return sel.token_ids, torch.stack([c.double() for c in cols], dim=1)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of a host array on ``device`` (never sharing the array's memory,
    which may be the cached settings block); on CUDA through pinned memory
    without a host sync."""
    if device.type != "cuda":
        return torch.from_numpy(np.array(array)).to(device)
    pinned = torch.from_numpy(np.array(array)).pin_memory()
    return pinned.to(device, non_blocking=True)
