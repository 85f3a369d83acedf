"""CUDA graphs of the pipeline's device step.

On CUDA the device step is ~30 kernel launches (the row statistics, the
chunked head, the radix search's nine to twelve, the result block). Each
costs the host tens of microseconds, so up to batch 64 the step is bound by
the host, not the GPU. Once the same step shape repeats (same rows,
vocabulary, dtype and settings pattern: ``key``), :class:`StepGraphs`
captures the two halves of the step -- ``prepare`` (no u needed) and
``finish`` (u known) -- into CUDA graphs over buffers of their own, and later
steps of that shape copy their logits, settings and u into those buffers and
replay the graphs: two launches instead of ~30, the same kernels on the same
values, so the same answers.

Only a cache: a shape is captured after it has been seen :data:`AFTER` steps
in a row (a batch whose composition changes every step never pays for a
capture), at most :data:`KEEP` shapes are kept (each holds a copy of its
logits rows and its intermediates on the GPU), and any failure to capture
turns graphs off for the process with one warning: the step then runs
eagerly, as without graphs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("qr_sampler")

#: consecutive steps of one shape before it is captured
AFTER = 2
#: captured shapes kept (least recently used dropped first)
KEEP = 2

#: (rows, settings, the rows' address or None) -> what finish needs besides
#: them (device work only); with an address, the kernels read the rows there
PrepareFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], Any]
#: (rows, settings, u, prepare's output) -> (token ids, result block)
FinishFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(slots=True)
class StepGraph:
    """One captured shape: its input buffers, its outputs and the two graphs."""

    sub: torch.Tensor  # the controlled rows' logits (copied in every step)
    dev: torch.Tensor  # the per-row settings block (float64)
    u: torch.Tensor  # u per row (float64), copied in before ``finish``
    stage: Any  # prepare's output
    token_ids: torch.Tensor
    out: torch.Tensor  # the result block
    prepare: torch.cuda.CUDAGraph
    finish: torch.cuda.CUDAGraph
    #: pinned host staging of the settings block and of u (reused every step)
    host_dev: torch.Tensor
    host_u: torch.Tensor
    #: the settings block ``dev`` holds (its columns but u are never rewritten
    #: on the device, so an unchanged block is not copied again)
    block: np.ndarray | None = None
    #: recorded after the last copy out of each staging buffer (by its name):
    #: a buffer is rewritten only once its copy is done
    copied: dict[str, torch.cuda.Event] = field(default_factory=dict)
    #: a graph whose kernels read the rows through an address: that address
    #: (device int64), its pinned staging and the value it holds
    addr: torch.Tensor | None = None
    host_addr: torch.Tensor | None = None
    addr_value: int = 0

    def run_prepare(
        self, logits: torch.Tensor, row_index: torch.Tensor | None, block: np.ndarray
    ) -> torch.Tensor:
        """Bring this step's rows and settings ``block`` (float64, host) in,
        queued without a sync, and replay ``prepare``; returns the tensor the
        graphs read the rows from. A graph that reads through an address
        reads all of ``logits`` where they are when their layout is the
        captured one (no copy; the caller keeps them until the step's sync);
        otherwise the rows are copied into the graph's own buffer. The same
        block object as the last step's (see :meth:`SamplingPipeline.prepare`)
        is not copied again."""
        rows = self.sub
        if self.addr is not None and row_index is None and _same_layout(logits, self.sub):
            rows = logits
        elif row_index is None:
            self.sub.copy_(logits)
        else:
            torch.index_select(logits, 0, row_index, out=self.sub)
        if self.addr is not None and self.host_addr is not None:
            where = rows.data_ptr()
            if where != self.addr_value:
                self._stage("addr", self.host_addr, np.array([where]), self.addr)
                self.addr_value = where
        if block is not self.block:
            self._stage("dev", self.host_dev, block, self.dev)
            self.block = block
        self.prepare.replay()
        return rows

    def run_finish(self, u: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy u (float64, host) in without a sync and replay ``finish``: the
        token ids (a copy: the graph's own buffer is rewritten by the next
        step) and the result block."""
        self._stage("u", self.host_u, u, self.u)
        self.finish.replay()
        return self.token_ids.clone(), self.out

    def _stage(self, name: str, host: torch.Tensor, values: np.ndarray, to: torch.Tensor) -> None:
        """``values`` into the pinned buffer ``host``, then queued (no sync) on
        to the device buffer ``to``. The buffer's last copy is waited for
        first if it is still queued (never in the pipeline's steps: each ends
        with a sync)."""
        event = self.copied.get(name)
        if event is not None and not event.query():  # type: ignore[no-untyped-call]
            event.synchronize()
        host.numpy()[...] = values
        to.copy_(host, non_blocking=True)
        if event is None:
            event = self.copied[name] = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, device and strides, and ``a`` 16-byte aligned (the
    kernels that read through an address take it for aligned): ``a`` can be
    read as ``b``."""
    same_kind = a.dtype == b.dtype and a.device == b.device and a.data_ptr() % 16 == 0
    return same_kind and a.shape == b.shape and a.stride() == b.stride()


class StepGraphs:
    """Captured device steps of one pipeline, by step shape (see the module)."""

    def __init__(self, after: int = AFTER, keep: int = KEEP) -> None:
        self.after = after
        self.keep = keep
        self.enabled = True
        self.captures = 0  # shapes captured so far (for tests and benchmarks)
        self._graphs: OrderedDict[Hashable, StepGraph] = OrderedDict()
        self._last: Hashable = None
        self._streak = 0

    def get(self, key: Hashable) -> StepGraph | None:
        """The captured graph of this step's shape ``key``, if any (counts the
        shape's repeats: call once per step)."""
        if not self.enabled:
            return None
        self._streak = self._streak + 1 if key == self._last else 1
        self._last = key
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
        return graph

    def capture(
        self,
        key: Hashable,
        sub: torch.Tensor,
        dev: torch.Tensor,
        prepare: PrepareFn,
        finish: FinishFn,
        indirect: bool = False,
    ) -> StepGraph | None:
        """After :meth:`get` found no graph for ``key``: capture one when the
        shape has now been seen :attr:`after` + 1 steps in a row (else None:
        run this step eagerly). ``sub`` and ``dev`` are this step's rows and
        settings on the device. Every other device tensor the step reads must
        be reachable from ``prepare``'s output (the graph keeps that alive).
        ``indirect``: ``prepare`` takes the rows' address, and every kernel
        of both halves that reads the rows reads them there."""
        if not self.enabled or key != self._last or self._streak <= self.after:
            return None
        try:
            graph = _capture(sub, dev, prepare, finish, indirect)
        except Exception as exc:  # e.g. an op that cannot be captured on this setup
            self.enabled = False
            self._graphs.clear()
            logger.warning(
                "CUDA graphs of the sampling step unavailable (%s); running eagerly", exc
            )
            return None
        self.captures += 1
        self._graphs[key] = graph
        while len(self._graphs) > self.keep:
            self._graphs.popitem(last=False)
        return graph

    def clear(self) -> None:
        """Drop every captured shape (frees their GPU memory)."""
        self._graphs.clear()
        self._last, self._streak = None, 0


def _capture(
    sub: torch.Tensor,
    dev: torch.Tensor,
    prepare: PrepareFn,
    finish: FinishFn,
    indirect: bool,
) -> StepGraph:
    """Warm the step up on a side stream over new buffers, then capture its
    two halves (sharing one memory pool: they always replay in order)."""
    s_sub = sub.clone()
    s_dev = dev.clone()
    s_u = torch.full((sub.shape[0],), 0.5, dtype=torch.float64, device=sub.device)
    addr = None
    if indirect:  # the graph's own buffer until a step hands over its logits
        addr = torch.tensor([s_sub.data_ptr()], dtype=torch.int64, device=sub.device)
    side = torch.cuda.Stream(sub.device)  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream(sub.device))
    with torch.cuda.stream(side):  # compiles and lazily built state, outside the capture
        finish(s_sub, s_dev, s_u, prepare(s_sub, s_dev, addr))
    torch.cuda.current_stream(sub.device).wait_stream(side)
    torch.cuda.synchronize(sub.device)
    g_prepare = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_prepare, capture_error_mode="thread_local"):
        stage = prepare(s_sub, s_dev, addr)
    g_finish = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_finish, pool=g_prepare.pool(), capture_error_mode="thread_local"):
        token_ids, out = finish(s_sub, s_dev, s_u, stage)
    host_dev = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
    host_u = torch.empty(s_u.shape, dtype=s_u.dtype, pin_memory=True)
    graph = StepGraph(
        s_sub, s_dev, s_u, stage, token_ids, out, g_prepare, g_finish, host_dev, host_u
    )
    if addr is not None:
        graph.addr, graph.addr_value = addr, s_sub.data_ptr()
        graph.host_addr = torch.empty(1, dtype=torch.int64, pin_memory=True)
    return graph
