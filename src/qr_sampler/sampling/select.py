"""Token selection by rank from one uniform u per row, batched in torch.

For each row, on the logits' own device:

1. temperature: x = logits / T (T = 0 means greedy: T = 1 and top_k = 1);
2. top-k: keep the k highest x (ties: lower token id first);
3. softmax over the kept tokens -> p;
4. min-p: keep p >= min_p * max(p), renormalise;
5. top-p: keep the shortest rank-ordered prefix whose mass reaches top_p
   (the token that crosses is kept), renormalise;
6. order the kept probabilities by rank, cumulate, and pick the first token
   whose cumulative probability exceeds u * total: small u -> likely tokens.

Every truncation keeps a rank-ordered *prefix*, so the whole vocabulary never
needs ordering when the prefix is short or u falls early. :func:`select`
therefore orders only a head and resolves every row it can there:

* :func:`select_chunked` (the fast path) cuts each row into chunks of a few
  token ids, picks the ``head_size`` chunks with the largest maxima (a top-k
  over chunk maxima only) and stably sorts just their tokens; every token above
  the smallest chosen maximum is among them, so that prefix is exactly the
  row's rank order. Its normaliser comes from :func:`row_stats` (fused into one
  pass on CUDA through torch.compile, see :func:`set_fused_kernels`).
* :func:`select_head` is the earlier head: ``torch.topk`` of ``head_size``
  tokens over the whole row (kept for comparison).
* Rows whose answer lies beyond the head go to :func:`select_rest`: on the CPU
  untruncated rows use :func:`select_tail` (probability mass bucketed by value,
  only the bucket holding u is ordered), everything else the full sort
  (:func:`select_sorted`, the reference).

The result is identical to :func:`select_sorted` except when u lies within
float rounding of a CDF boundary (tests/test_select_fast.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: default head width ordered by the fast path
DEFAULT_HEAD = 1024


@dataclass(frozen=True, slots=True)
class SelectionParams:
    """Per-row selection settings, each a tensor of shape [rows] on the logits' device."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # float32 (or 64); >= 1 = off
    min_p: torch.Tensor  # float32 (or 64); 0 = off
    u: torch.Tensor  # float64 in (0, 1)


@dataclass(frozen=True, slots=True)
class Selection:
    """Per-row results, tensors of shape [rows] on the logits' device."""

    token_ids: torch.Tensor  # int64
    rank: torch.Tensor  # int64, 0 = most likely
    prob: torch.Tensor  # float64, probability in the final (truncated) distribution
    num_candidates: torch.Tensor  # int64, tokens left after truncation


def scale_logits(
    logits: torch.Tensor, params: SelectionParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = logits / T as float32 (greedy rows use T = 1), and the effective top_k."""
    greedy = params.temperature <= 0
    x = scaled_logits(logits, effective_temperature(params))
    top_k = torch.where(greedy, torch.ones_like(params.top_k), params.top_k)
    return x, top_k


def scaled_logits(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x = logits / t per row as float32, NaN and -inf as -inf (every path
    orders the same x)."""
    x = logits.float() / t.float().unsqueeze(1)
    return torch.nan_to_num(x, nan=float("-inf"), neginf=float("-inf"))


def _select_window(
    vals: torch.Tensor,
    idx: torch.Tensor,
    lse_full: torch.Tensor,
    num_finite: torch.Tensor,
    vocab: int,
    top_k: torch.Tensor,
    params: SelectionParams,
    exact: torch.Tensor | None = None,
) -> tuple[Selection, torch.Tensor]:
    """Select inside a rank-ordered window (the head, or the whole sorted row).

    ``exact`` (int64 per row, optional) is how many leading window positions are
    known to be the row's true rank order; positions from there on are ignored.
    By default the whole window is. Returns the selection and a mask of rows whose
    answer is exact from this window alone.
    """
    width = vals.shape[1]
    pos = torch.arange(width, device=vals.device)
    kk = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    in_k = pos.unsqueeze(0) < kk.unsqueeze(1)
    if exact is not None:
        in_k = in_k & (pos.unsqueeze(0) < exact.unsqueeze(1))
        k_in_window = kk <= exact
    else:
        k_in_window = kk <= width
    masked = vals.masked_fill(~in_k, float("-inf"))
    lse = torch.where(k_in_window, torch.logsumexp(masked, dim=-1), lse_full)
    p = torch.exp(masked - lse.unsqueeze(1)).double()

    # min-p (a prefix, since p is in descending order)
    min_p = params.min_p.double().unsqueeze(1)
    # tokens of probability 0 (-inf logits) are never candidates, even for u = 1
    keep = in_k & (p > 0) & (p >= min_p * p[:, :1])
    if exact is not None:
        last = (exact - 1).clamp(min=0).unsqueeze(1)
        minp_ends_inside = k_in_window | ~keep.gather(1, last).squeeze(1)
    else:
        minp_ends_inside = k_in_window | ~keep[:, -1]
    z_m = torch.where(
        minp_ends_inside, (p * keep).sum(-1), torch.ones_like(lse_full, dtype=p.dtype)
    )
    q = p * keep / z_m.unsqueeze(1)

    # top-p on the renormalised prefix
    cum = torch.cumsum(q, dim=-1)
    top_p = params.top_p.double()
    top_p_on = (top_p < 1.0).unsqueeze(1)
    keep = keep & (~top_p_on | ((cum - q) < top_p.unsqueeze(1)))
    n_keep = keep.sum(-1)
    complete = (n_keep < (width if exact is None else exact)) | k_in_window
    z_f = torch.where(complete, (q * keep).sum(-1), torch.ones_like(z_m))

    # pick: first kept position whose cumulative mass exceeds u * total
    target = params.u.double() * z_f
    pick = ((cum <= target.unsqueeze(1)) & keep).sum(-1)
    pick = torch.minimum(pick, (n_keep - 1).clamp(min=0))

    # rows whose normaliser is known from the window: the top-k set lies inside it
    # (or is the whole vocabulary, lse_full) and the min-p set ends inside it (or
    # min-p is off over the whole vocabulary, whose mass is 1)
    whole = kk == vocab
    z_known = (k_in_window | whole) & (minp_ends_inside | (whole & (params.min_p <= 0)))
    untruncated = whole & (params.min_p <= 0) & (top_p >= 1.0)
    resolved = z_known & (complete | (untruncated & (target < cum[:, -1])))
    if exact is not None:
        resolved = resolved & (exact > 0)
    n_cand = torch.where(complete, n_keep, num_finite)
    prob = q.gather(1, pick.unsqueeze(1)).squeeze(1) / z_f
    token = idx.gather(1, pick.unsqueeze(1)).squeeze(1)
    sel = Selection(token_ids=token, rank=pick, prob=prob, num_candidates=n_cand)
    return sel, resolved


def select_sorted(logits: torch.Tensor, params: SelectionParams) -> Selection:
    """Reference selection with a full (stable) sort of every row."""
    x, top_k = scale_logits(logits, params)
    vocab = x.shape[-1]
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    lse_full = torch.logsumexp(x, dim=-1)
    num_finite = torch.isfinite(x).sum(-1)
    sel, _ = _select_window(vals, idx, lse_full, num_finite, vocab, top_k, params)
    return sel


def select_head(
    logits: torch.Tensor, params: SelectionParams, head_size: int = DEFAULT_HEAD
) -> tuple[Selection, torch.Tensor]:
    """Fast path: order only the top ``head_size`` tokens of each row.

    Returns the selection and the mask of rows it resolved exactly; the other
    rows must be recomputed with :func:`select_sorted`. No host sync.
    """
    x, top_k = scale_logits(logits, params)
    vocab = x.shape[-1]
    width = min(head_size, vocab)
    vals, idx = torch.topk(x, width, dim=-1, largest=True, sorted=True)
    # torch.topk orders ties arbitrarily: order them by token id (sort by id, then
    # stably by value)
    idx, by_id = torch.sort(idx, dim=-1)
    vals, by_val = torch.sort(vals.gather(1, by_id), dim=-1, descending=True, stable=True)
    idx = idx.gather(1, by_val)
    lse_full = torch.logsumexp(x, dim=-1)
    num_finite = torch.isfinite(x).sum(-1)
    sel, resolved = _select_window(vals, idx, lse_full, num_finite, vocab, top_k, params)
    if width < vocab:
        # which members of a tie class cut by the head's edge it holds is arbitrary:
        # a pick inside that class needs the full sort
        edge = vals[:, -1:]
        first = (vals > edge).sum(-1)
        straddle = (x == edge).sum(-1) > width - first
        resolved = resolved & ~(straddle & (sel.rank >= first))
    return sel, resolved


#: tokens per chunk of the chunked head (:func:`select_chunked`)
DEFAULT_CHUNK = 16


@dataclass(frozen=True, slots=True)
class RowStats:
    """Per-row statistics of the raw logits, from one fused pass where possible."""

    max_logit: torch.Tensor  # float32 (NaN when the row holds a NaN)
    entropy: torch.Tensor  # float32, nats of softmax(logits) at T = 1
    num_finite: torch.Tensor  # int64
    lse: torch.Tensor | None  # float32 logsumexp(logits / T) when T was given

    def take(self, rows: torch.Tensor) -> RowStats:
        """The statistics of the given rows (int64 indices)."""
        return RowStats(
            max_logit=self.max_logit.index_select(0, rows),
            entropy=self.entropy.index_select(0, rows),
            num_finite=self.num_finite.index_select(0, rows),
            lse=None if self.lse is None else self.lse.index_select(0, rows),
        )


#: logits per block of rows in the eager CPU statistics: a block's temporaries
#: (four or five of its size) stay in the core's cache between passes
CPU_BLOCK_ELEMENTS = 1 << 19


def _eager_cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` is worked on eagerly on the CPU (not on a GPU, not inside
    a compiled function): there a host-side look at a value costs no sync."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _in_row_blocks(
    fn: Callable[..., Any], logits: torch.Tensor, *per_row: torch.Tensor | None
) -> Any:
    """``fn(logits, *per_row)`` in blocks of rows on the CPU (eager), the per-row
    results concatenated: each pass then reads a block from cache, not the whole
    batch from memory (measured 7-10 ms -> 5-6 ms for the statistics of 32 x
    151,936 logits on two cores). Elsewhere, or compiled, one call."""
    rows, vocab = logits.shape
    per = max(1, CPU_BLOCK_ELEMENTS // max(vocab, 1))
    if not _eager_cpu(logits) or rows <= per:
        return fn(logits, *per_row)
    parts = [
        fn(logits[i : i + per], *(a if a is None else a[i : i + per] for a in per_row))
        for i in range(0, rows, per)
    ]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(
        None if parts[0][k] is None else torch.cat([p[k] for p in parts])
        for k in range(len(parts[0]))
    )


def _row_stats_eager(
    logits: torch.Tensor, t: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return _in_row_blocks(_row_stats_block, logits, t)  # type: ignore[no-any-return]


#: on the CPU (eager), x - max and (x - max) / T are clamped from below here
#: before the exponential when some value lies lower: exp of anything lower is
#: under float32's smallest normal (e^-87.34) and adds nothing to a sum that
#: holds the row maximum's 1, while torch's CPU exp takes a path 10-30x
#: slower for such inputs, -inf included (a row of 151,936: ~0.1 ms, below
#: -87.34 1.1-3.0 ms)
EXP_FLOOR = -87.0
#: ... and where more than this share of a block's logits are -inf (masked
#: rows: grammars, allowed-token lists) the entropy counts those as exactly 0
#: through a mask; fewer keep the most negative float, whose exponential is
#: 0, and pay the slow path for themselves only (cheaper than the mask's passes)
MASK_SHARE = 1 / 64


def _row_stats_block(
    logits: torch.Tensor, t: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = logits.float()
    # eager on the CPU a host-side check is free: a batch without -inf (the
    # usual case) skips the clamp and the finite count (a bool sum, the slowest
    # pass there); compiled or on a GPU both always run (fused, no sync)
    eager_cpu = _eager_cpu(x)
    m = x.amax(dim=-1, keepdim=True)
    lowest = x.amin() if eager_cpu else None
    d = x - m
    dc = d  # x - max as the entropy reads it (clamped where some value lies low)
    ninf = None  # where -inf logits are masked to 0 (eager CPU, masked rows)
    low = -math.inf  # a lower bound of d (eager CPU)
    if lowest is not None and bool(torch.isfinite(lowest)):
        num_finite = torch.full_like(m.squeeze(1), x.shape[-1], dtype=torch.int64)
        low = float(lowest - m.max())
        if low < EXP_FLOOR:
            dc = d.clamp(min=EXP_FLOOR)
    else:
        num_finite = (x > float("-inf")).sum(dim=-1)
        if eager_cpu and x.numel() - int(num_finite.sum()) > MASK_SHARE * x.numel():
            ninf = x == float("-inf")
            dc = d.clamp(min=EXP_FLOOR)
        else:
            # -inf becomes the most negative float so that exp(d) * d = 0
            dc = d = d.clamp_(min=torch.finfo(torch.float32).min)
    e = torch.exp(dc)
    if ninf is not None:
        e.masked_fill_(ninf, 0.0)
    s = e.sum(dim=-1)
    if eager_cpu:  # BLAS dot products: ~2x faster there than vecdot
        dots = torch.stack([torch.dot(e[i], dc[i]) for i in range(x.shape[0])])
    else:
        dots = torch.linalg.vecdot(e, dc)
    entropy = torch.log(s) - dots / s
    lse = None
    if t is not None:
        tt = t.float()
        # d unclamped (what lies below the floor at T = 1 need not at T > 1),
        # clamped after the division: -inf and every value below e^-87 then
        # add at most 1.6e-38 each to a sum of at least 1, which stays the same
        scaled = d.div_(tt.unsqueeze(1))  # d is not needed any more
        if eager_cpu and low / float(tt.min()) < EXP_FLOOR:
            scaled.clamp_(min=EXP_FLOOR)
        lse = m.squeeze(1) / tt + torch.log(scaled.exp_().sum(dim=-1))
    return m.squeeze(1), entropy, num_finite, lse


def _log_normalizer_eager(
    logits: torch.Tensor, max_logit: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    return _in_row_blocks(_log_normalizer_block, logits, max_logit, t)  # type: ignore[no-any-return]


def _log_normalizer_block(
    logits: torch.Tensor, max_logit: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    t = t.float()
    mx = (max_logit / t).unsqueeze(1)
    z = logits.float() / t.unsqueeze(1) - mx
    # on the CPU (eager), as the row statistics: clamped at EXP_FLOOR where
    # some value lies lower (the sum holds the maximum's 1 and stays the same)
    if _eager_cpu(z) and z.numel() and float(z.amin()) < EXP_FLOOR:
        z.clamp_(min=EXP_FLOOR)
    return (mx + torch.log(torch.exp(z).sum(dim=-1, keepdim=True))).squeeze(1)


_COMPILED: dict[str, Any] = {}
_FAILED: set[str] = set()
_COMPILE: dict[str, Any] = {
    "enabled": True,
    "dynamic": None,
    "mode": None,
    "devices": frozenset({"cuda"}),
}


def set_fused_kernels(
    enabled: bool,
    *,
    dynamic: bool | None = None,
    mode: str | None = None,
    devices: tuple[str, ...] = ("cuda",),
) -> None:
    """Turn torch.compile (fused kernels) on or off for the given device types
    (default CUDA only: on the CPU it needs a C++ compiler at run time and costs
    seconds per shape family on first use, but runs the step about 3x faster).
    ``dynamic`` and ``mode`` are passed to torch.compile (dynamic None, the
    default: the first shapes are compiled static, a changed batch size once more
    with a dynamic batch dimension, the vocabulary staying static, which keeps
    the chunk reductions fast; mode e.g. "reduce-overhead")."""
    _COMPILE["enabled"] = enabled
    _COMPILE["dynamic"] = dynamic
    _COMPILE["mode"] = mode
    _COMPILE["devices"] = frozenset(devices)
    _COMPILED.clear()
    _FAILED.clear()


def _fused(name: str, fn: Any, device: torch.device) -> Any:
    """``fn`` compiled into fused kernels on CUDA (one read of the row instead of
    several, far fewer launches); the eager function elsewhere or when
    compilation is unavailable."""
    if device.type not in _COMPILE["devices"] or not _COMPILE["enabled"] or name in _FAILED:
        return fn
    compiled = _COMPILED.get(name)
    if compiled is None:
        compiled = torch.compile(fn, dynamic=_COMPILE["dynamic"], mode=_COMPILE["mode"])
        _COMPILED[name] = compiled
    return compiled


def fused_ready(name: str, device: torch.device) -> bool:
    """Whether ``name`` runs compiled on ``device`` (enabled there and its
    compilation has not failed)."""
    return _COMPILE["enabled"] and device.type in _COMPILE["devices"] and name not in _FAILED


def call_fused(name: str, fn: Any, device: torch.device, *args: Any) -> Any:
    """``fn(*args)``, through torch.compile on CUDA (see :func:`set_fused_kernels`)."""
    impl = _fused(name, fn, device)
    if impl is fn:
        return fn(*args)
    try:
        return impl(*args)
    except Exception as exc:  # compilation unavailable here: stay correct, eagerly
        _FAILED.add(name)
        logger.warning("fused kernels for %s unavailable (%s); using eager torch ops", name, exc)
        return fn(*args)


def row_stats(
    logits: torch.Tensor, temperature: torch.Tensor | None = None, *, fused: bool = True
) -> RowStats:
    """Max, entropy at T = 1 and finite count of each row; with ``temperature``
    (per row, > 0) also logsumexp(logits / T). Fused into few passes on CUDA
    unless ``fused`` is False (inside a function that is compiled as a whole)."""
    if fused:
        m, entropy, num_finite, lse = call_fused(
            "row_stats", _row_stats_eager, logits.device, logits, temperature
        )
    else:
        m, entropy, num_finite, lse = _row_stats_eager(logits, temperature)
    return RowStats(max_logit=m, entropy=entropy, num_finite=num_finite, lse=lse)


def log_normalizer(
    logits: torch.Tensor, max_logit: torch.Tensor, temperature: torch.Tensor, *, fused: bool = True
) -> torch.Tensor:
    """logsumexp(logits / T) per row, given the row maxima (T > 0)."""
    if not fused:
        return _log_normalizer_eager(logits, max_logit, temperature)
    out: torch.Tensor = call_fused(
        "log_normalizer", _log_normalizer_eager, logits.device, logits, max_logit, temperature
    )
    return out


def effective_temperature(params: SelectionParams) -> torch.Tensor:
    """T as applied: greedy rows (T = 0) use 1."""
    return applied_temperature(params.temperature)


def applied_temperature(t: torch.Tensor) -> torch.Tensor:
    """Per-row temperatures as the selection divides by them (float32):
    greedy rows (T <= 0) use 1."""
    return torch.where(t <= 0, torch.ones_like(t), t).float()


def chunked_head(
    logits: torch.Tensor, t: torch.Tensor, head_size: int, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ordered head of :func:`select_chunked`: x = logits / t of the tokens in
    the ``head_size`` chunks with the largest maxima, stably sorted (descending),
    their token ids, and per row how many leading positions are exactly the
    row's rank order (every token above tau, the smallest selected chunk maximum).
    Only the first ``2 * head_size`` positions are returned. Needs more than
    ``head_size`` chunks."""
    rows, vocab = logits.shape
    n_full = vocab // chunk
    on_cpu = logits.device.type == "cpu"
    if on_cpu:  # the CPU's max pooling (NaN-propagating too) is 2x faster than amax here
        cmax = torch.nn.functional.max_pool1d(logits.unsqueeze(1), chunk).squeeze(1)
    else:
        cmax = logits[:, : n_full * chunk].reshape(rows, n_full, chunk).amax(dim=-1)
    if vocab % chunk:
        rest = logits[:, n_full * chunk :].amax(dim=-1, keepdim=True)
        cmax = torch.cat([cmax, rest], dim=1)
    top_values, top_chunks = _top_chunks(cmax, head_size, grouped=on_cpu)
    tau = top_values.amin(dim=-1).float() / t
    first = torch.sort(top_chunks, dim=-1).values * chunk
    ids = (first.unsqueeze(-1) + torch.arange(chunk, device=logits.device)).reshape(rows, -1)
    valid = ids < vocab
    ids = ids.clamp(max=vocab - 1)
    x = scaled_logits(logits.gather(1, ids), t).masked_fill(~valid, float("-inf"))
    width = min(x.shape[1], 2 * head_size)  # the window math needs no more
    if on_cpu:
        if rows and not torch.compiler.is_compiling():  # a host read is free here: no
            # position past the longest exact prefix is ever used
            above = int((x > tau.unsqueeze(1)).sum(dim=-1).max())
            width = max(1, min(width, above))
        # one key orders by value, then token id (the stable sort's order): the
        # CPU's top-k of the first ``width`` keys is ~2x faster than a stable sort
        key = ((value_keys(x) - (1 << 31)) << 32) + ((1 << 32) - 1 - ids)
        order = torch.topk(key, width, dim=-1, sorted=True).indices
        vals = x.gather(1, order)
    else:
        vals, order = torch.sort(x, dim=-1, descending=True, stable=True)
        vals, order = vals[:, :width], order[:, :width]
    exact = (vals > tau.unsqueeze(1)).sum(dim=-1)
    return vals, ids.gather(1, order), exact


#: chunk maxima per group in :func:`_top_chunks`'s first round
_CHUNK_GROUP = 4


def _top_chunks(
    cmax: torch.Tensor, head_size: int, *, grouped: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``head_size`` largest chunk maxima of each row and their chunk indices
    (in no order; ties at the smallest taken either way).

    ``grouped`` (the CPU, where top-k costs by its input's length): first the
    ``head_size`` groups of :data:`_CHUNK_GROUP` chunks with the largest maxima,
    then the top chunks among theirs. Same smallest value (tau), and every chunk
    above it is taken: a chunk outside those groups is at most the
    ``head_size``-th group maximum, which is at most tau, since each taken group
    holds a chunk at its maximum. Measured 3.7 -> 2.5 ms at 32 x 37,984."""
    rows, n = cmax.shape
    g = _CHUNK_GROUP
    if not grouped or n < 4 * g * head_size:
        top = torch.topk(cmax, head_size, dim=-1, sorted=False)
        return top.values, top.indices
    n_groups = n // g
    gmax = cmax[:, : n_groups * g].reshape(rows, n_groups, g).amax(dim=-1)
    groups = torch.topk(gmax, head_size, dim=-1, sorted=False).indices
    cand = (groups.unsqueeze(-1) * g + torch.arange(g, device=cmax.device)).reshape(rows, -1)
    if n % g:  # the chunks past the last whole group are always candidates
        rest = torch.arange(n_groups * g, n, device=cmax.device).expand(rows, -1)
        cand = torch.cat([cand, rest], dim=1)
    top = torch.topk(cmax.gather(1, cand), head_size, dim=-1, sorted=False)
    return top.values, cand.gather(1, top.indices)


def select_chunked(
    logits: torch.Tensor,
    params: SelectionParams,
    lse_full: torch.Tensor,
    num_finite: torch.Tensor,
    head_size: int = DEFAULT_HEAD,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Selection, torch.Tensor]:
    """Fast path without ordering (or top-k) over the whole vocabulary.

    The row is cut into chunks of ``chunk`` token ids; the ``head_size`` chunks
    with the largest maxima hold every token above tau, the smallest of those
    maxima. Only their tokens are gathered (in token-id order) and stably
    sorted, so the leading positions above tau are exactly the row's rank order
    (ties by token id); selection runs there (:func:`_select_window` with
    ``exact``). ``lse_full`` is logsumexp(logits / T) at the effective
    temperature, ``num_finite`` the finite count of each row.

    Returns the selection and the mask of rows it resolved exactly; the other
    rows must be recomputed with :func:`select_sorted`. No host sync.
    """
    rows, vocab = logits.shape
    n_full = vocab // chunk
    n_chunks = n_full + (1 if vocab % chunk else 0)
    if n_full == 0 or n_chunks <= head_size:
        sel = select_sorted(logits, params)
        return sel, torch.ones(rows, dtype=torch.bool, device=logits.device)
    vals, idx, exact = chunked_head(logits, effective_temperature(params), head_size, chunk)
    return select_in_head(vals, idx, exact, params, lse_full, num_finite, vocab)


def select_in_head(
    vals: torch.Tensor,
    idx: torch.Tensor,
    exact: torch.Tensor,
    params: SelectionParams,
    lse_full: torch.Tensor,
    num_finite: torch.Tensor,
    vocab: int,
) -> tuple[Selection, torch.Tensor]:
    """The u-dependent half of :func:`select_chunked`: selection inside a head
    from :func:`chunked_head` (which needs no u, so it can run while the
    entropy is fetched). Returns the selection and the resolved mask."""
    greedy = params.temperature <= 0
    top_k = torch.where(greedy, torch.ones_like(params.top_k), params.top_k)
    sel, resolved = _select_window(
        vals, idx, lse_full, num_finite, vocab, top_k, params, exact=exact
    )
    return sel, resolved & torch.isfinite(lse_full)


def _take(params: SelectionParams, rows: torch.Tensor) -> SelectionParams:
    return SelectionParams(
        temperature=params.temperature.index_select(0, rows),
        top_k=params.top_k.index_select(0, rows),
        top_p=params.top_p.index_select(0, rows),
        min_p=params.min_p.index_select(0, rows),
        u=params.u.index_select(0, rows),
    )


#: value buckets per nat of the tail histogram (:func:`select_tail`)
TAIL_BUCKETS_PER_NAT = 64
#: buckets of the tail histogram; the last one holds everything further down
#: (at most 32,768: the CPU's pick holds bucket numbers as int16)
TAIL_BUCKETS = 4096


def untruncated(params: SelectionParams, vocab: int) -> torch.Tensor:
    """Rows whose final distribution is the whole softmax (no top-k, min-p, top-p)."""
    whole = (params.top_k <= 0) | (params.top_k >= vocab)
    return whole & (params.temperature > 0) & (params.min_p <= 0) & (params.top_p >= 1.0)


def select_tail(
    logits: torch.Tensor,
    params: SelectionParams,
    stats: RowStats | None = None,
    top_ids: torch.Tensor | None = None,
) -> Selection:
    """Exact selection for untruncated rows (see :func:`untruncated`) without
    ordering the vocabulary: the probability mass is bucketed by value (64
    buckets per nat below the row maximum), the bucket holding u is found from
    the cumulative bucket masses, and only that bucket's tokens are ordered (by
    value, then token id). Rank = tokens in the buckets above + position there.

    ``stats``: the rows' :func:`row_stats` at their temperatures, where known.
    Then a row whose u lies below its most likely token's probability takes
    that token (the first of its maxima, the full sort's first position)
    straight from them and one comparison pass (peaked rows, most of a
    language model's, need no histogram), and the other rows reuse the
    normaliser.

    ``top_ids``: those most likely tokens' ids where already known
    (:func:`peaked_top_tokens`), saving the comparison pass.

    Meant for the few rows the head leaves (a few passes over the rows, one
    small sort of the chosen buckets' tokens; host syncs, so used on the CPU).
    """
    if stats is None or stats.lse is None:
        return _tail_histogram(logits, params, None)
    u = params.u.double()
    t = effective_temperature(params)
    x_max, p_top = top_token_probability(stats.max_logit, t, stats.lse)
    first = torch.isfinite(p_top) & (u < p_top)  # (+inf or NaN logits: not finite)
    if not bool(first.any()):
        return _tail_histogram(logits, params, stats.lse)
    zero = torch.zeros_like(stats.num_finite)
    ids = top_ids if top_ids is not None else _first_at(logits, x_max, t)
    top = Selection(ids, zero, p_top, stats.num_finite)
    if bool(first.all()):
        return top
    rest = torch.nonzero(~first).squeeze(1)
    part = _tail_histogram(
        logits.index_select(0, rest), _take(params, rest), stats.lse.index_select(0, rest)
    )
    return _merge(top, rest, part)


def peaked_top_tokens(
    logits: torch.Tensor, params: SelectionParams, stats: RowStats, threshold: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`select_tail`'s answer for a u below the most likely token's
    probability, found without u: per row that token (the first of its
    maxima) and its probability -- when every row is untruncated and that
    probability is at least ``threshold`` in each (None otherwise, before the
    comparison pass is paid)."""
    if stats.lse is None or not bool(untruncated(params, logits.shape[-1]).all()):
        return None
    t = effective_temperature(params)
    x_max, p_top = top_token_probability(stats.max_logit, t, stats.lse)
    if not bool((p_top >= threshold).all()):
        return None
    return _first_at(logits, x_max, t), p_top


def top_token_probability(
    max_logit: torch.Tensor, t: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the largest x = logits / t (from the largest logit: division by
    t > 0 keeps the order) and its probability exp(x - lse), computed as every
    selection path computes p (float32, then float64)."""
    x_max = max_logit.float() / t.float()
    return x_max, torch.exp(x_max - lse).double()


def _first_at(logits: torch.Tensor, x_max: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest token id whose x = logits / t equals ``x_max``, the
    row's largest x (finite). One comparison pass over the logits: x rounds to
    ``x_max`` only for logits within half a unit in the last place of t *
    ``x_max``, so every such token is at or above a bound two units below it;
    only those few have x computed (as every path computes it) and compared.
    Rows whose ``x_max`` is not finite get an arbitrary id."""
    rows, vocab = logits.shape
    bound = _bound_below(x_max, t)
    if _eager_cpu(logits):
        found = _first_candidate(logits, x_max, t, bound)
        if found is not None:
            return found
    hit = torch.nonzero(logits.float() >= bound.unsqueeze(1))
    r, ids = hit[:, 0], hit[:, 1]
    at_max = (logits[r, ids].float() / t[r]) == x_max[r]
    found = torch.full((rows,), vocab, dtype=torch.int64, device=logits.device)
    return found.scatter_reduce_(0, r, torch.where(at_max, ids, vocab), "amin")


def _bound_below(x_max: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per row, a logit bound that every token whose x = logit / t rounds to
    ``x_max`` reaches: t times two units in the last place below ``x_max``,
    rounded down."""
    spacing = torch.nextafter(x_max.abs(), torch.full_like(x_max, float("inf"))) - x_max.abs()
    bound = (t.double() * (x_max.double() - 2 * spacing.double())).float()
    return torch.nextafter(bound, torch.full_like(bound, float("-inf")))


def _first_candidate(
    logits: torch.Tensor, x_max: torch.Tensor, t: torch.Tensor, bound: torch.Tensor
) -> torch.Tensor | None:
    """:func:`_first_at` in the usual case, eager on the CPU: each row's first
    token at or above ``bound``, found by numpy (one comparison and an argmax
    over the bool array, ~10 us a row against ~200 for torch's comparison and
    nonzero). It is the answer when its x equals ``x_max`` (tokens before it
    are below the bound, so below the maximum); None when that fails in a row
    whose ``x_max`` is finite."""
    values = logits.float().numpy()
    xm = x_max.float().numpy()
    tt = t.float().numpy()
    first = np.argmax(values >= bound.numpy()[:, None], axis=1)
    at = values[np.arange(values.shape[0]), first]
    if not bool(((at / tt == xm) | ~np.isfinite(xm)).all()):
        return None
    return torch.from_numpy(first.astype(np.int64))


def _tail_histogram(
    logits: torch.Tensor, params: SelectionParams, lse: torch.Tensor | None
) -> Selection:
    """:func:`select_tail`'s histogram search (``lse``: the rows' normaliser
    where known)."""
    rows, vocab = logits.shape
    dev = logits.device
    t = effective_temperature(params)
    x = logits.float() / t.float().unsqueeze(1)
    m = x.amax(dim=-1, keepdim=True)
    if bool(torch.isnan(m).any()):  # NaN logits: as -inf, as on every path
        x = scaled_logits(logits, t)  # (without NaN this is the same x)
        m = x.amax(dim=-1, keepdim=True)
    if lse is None:
        lse = torch.logsumexp(x, dim=-1)
    elif not bool(torch.isfinite(lse).all()):  # e.g. a NaN logit: that row's own
        lse = torch.where(torch.isfinite(lse), lse, torch.logsumexp(x, dim=-1))
    if bool(x.amin() > float("-inf")):  # the usual case; a bool count is the slowest pass
        num_finite = torch.full((rows,), vocab, dtype=torch.int64, device=dev)
    else:
        num_finite = torch.isfinite(x).sum(dim=-1)
    # x holds no NaN (see above): a spread m - x is NaN only where m is infinite
    finite_max = bool(torch.isfinite(m).all())
    u = params.u.double()
    p = torch.sub(x, lse.unsqueeze(1)).exp_().double()
    top = TAIL_BUCKETS - 1
    spread = torch.sub(m, x).mul_(TAIL_BUCKETS_PER_NAT)
    if not finite_max:
        spread = spread.nan_to_num_(nan=top, posinf=top)
    bucket = spread.clamp_(0, top).long()
    mass = torch.zeros(rows, TAIL_BUCKETS, dtype=torch.float64, device=dev)
    mass.scatter_add_(1, bucket, p)
    cum_mass = mass.cumsum(dim=1)
    crossing = (cum_mass <= u.unsqueeze(1)).sum(dim=1)
    # u at or past the total mass (rounding): the last bucket that holds mass
    last = torch.where(mass > 0, torch.arange(TAIL_BUCKETS, device=dev), 0).amax(dim=1)
    crossing = torch.minimum(crossing, last)
    if dev.type == "cpu":  # the same buckets as int16: half the bytes of two compares a row
        return _tail_pick_rows(
            _Tail(x, p, spread.to(torch.int16), cum_mass, crossing, u, num_finite)
        )
    return _tail_pick_batched(_Tail(x, p, bucket, cum_mass, crossing, u, num_finite))


class _Tail(NamedTuple):
    """What the end of :func:`_tail_histogram` reads: x = logits / T, the
    probabilities (float64), each token's bucket, the cumulative bucket
    masses, each row's chosen bucket, u and the finite counts."""

    x: torch.Tensor
    p: torch.Tensor
    bucket: torch.Tensor
    cum_mass: torch.Tensor
    crossing: torch.Tensor
    u: torch.Tensor
    num_finite: torch.Tensor


def _tail_pick_batched(tail: _Tail) -> Selection:
    """The end of :func:`_tail_histogram`, every row at once (any device): in
    each row's chosen bucket, the token whose cumulative mass passes u."""
    x, p, bucket, cum_mass, crossing, u, num_finite = tail
    rows, dev = x.shape[0], x.device
    # the chosen buckets' tokens, every row at once: (row, id) pairs in id order,
    # then by row, value (descending) and id, through two stable sorts
    hit = torch.nonzero(bucket == crossing.unsqueeze(1))
    r, ids = hit[:, 0], hit[:, 1]
    order = torch.sort(x[r, ids], descending=True, stable=True).indices
    order = order[torch.sort(r[order], stable=True).indices]
    r, ids = r[order], ids[order]
    n = torch.bincount(r, minlength=rows)  # tokens in each row's bucket
    col = torch.arange(r.numel(), device=dev) - (torch.cumsum(n, 0) - n)[r]
    width = max(1, int(n.max()) if rows else 1)
    ps = torch.zeros(rows, width, dtype=torch.float64, device=dev)
    ps[r, col] = p[r, ids]
    bucket_ids = torch.zeros(rows, width, dtype=torch.int64, device=dev)
    bucket_ids[r, col] = ids
    below = (crossing - 1).clamp(min=0).unsqueeze(1)
    before = torch.where(crossing > 0, cum_mass.gather(1, below).squeeze(1), 0.0)
    inside = torch.arange(width, device=dev) < n.unsqueeze(1)
    j = (((before.unsqueeze(1) + torch.cumsum(ps, dim=1)) <= u.unsqueeze(1)) & inside).sum(dim=1)
    # not past the bucket's last token, nor past its last of nonzero
    # probability (they come last: rounding can leave u beyond them)
    positive = ((ps > 0) & inside).sum(dim=1)
    j = torch.minimum(j, torch.minimum(n, positive).sub(1).clamp(min=0)).unsqueeze(1)
    # the tokens in the buckets before the chosen one (one comparison pass:
    # cheaper than counting every bucket)
    above = (bucket < crossing.unsqueeze(1)).sum(dim=1)
    return Selection(
        token_ids=bucket_ids.gather(1, j).squeeze(1),
        rank=above + j.squeeze(1),
        prob=ps.gather(1, j).squeeze(1),
        num_candidates=num_finite,
    )


def _tail_pick_rows(tail: _Tail) -> Selection:
    """The end of :func:`_tail_histogram` on the CPU, row by row in numpy: the
    same answers as its all-rows torch version (the same float64 sums in the
    same order), without the 2-D nonzero, gathers and two sorts over every
    row's bucket at once, which took ~2.5 ms of ~7.5 for 8 flat rows of
    151,936 on one core. A row's bucket holds a few thousand tokens at most
    on such rows; its ids come in id order, so a stable sort by value
    (descending) orders them by value, then id, as the full sort does."""
    rows = tail.x.shape[0]
    xs, ps_all, bs = tail.x.numpy(), tail.p.numpy(), tail.bucket.numpy()
    cm, cross, us = tail.cum_mass.numpy(), tail.crossing.numpy(), tail.u.numpy()
    token = np.zeros(rows, dtype=np.int64)
    rank = np.zeros(rows, dtype=np.int64)
    prob = np.zeros(rows, dtype=np.float64)
    for i in range(rows):
        c = int(cross[i])
        ids = np.flatnonzero(bs[i] == c)
        ids = ids[np.argsort(-xs[i, ids], kind="stable")]
        ps = ps_all[i, ids]
        before = cm[i, c - 1] if c > 0 else 0.0
        j = int(np.count_nonzero(before + np.cumsum(ps) <= us[i]))
        # not past the bucket's last token, nor past its last of nonzero
        # probability (they come last: rounding can leave u beyond them)
        j = min(j, max(min(ids.size, int(np.count_nonzero(ps > 0))) - 1, 0))
        if ids.size:
            token[i], prob[i] = ids[j], ps[j]
        rank[i] = np.count_nonzero(bs[i] < c) + j
    return Selection(
        token_ids=torch.from_numpy(token),
        rank=torch.from_numpy(rank),
        prob=torch.from_numpy(prob),
        num_candidates=tail.num_finite,
    )


#: bits of the 32-bit value key decided per pass of :func:`select_radix`
RADIX_BITS = 4


def radix_eligible(params: SelectionParams, vocab: int) -> torch.Tensor:
    """Rows :func:`select_radix` answers exactly: sampled (T > 0), no top-k (off
    or >= vocab) and no top-p; min-p is allowed."""
    whole = (params.top_k <= 0) | (params.top_k >= vocab)
    return whole & (params.temperature > 0) & (params.top_p >= 1.0)


def value_keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving integer keys of float32 values, int64 in [0, 2**32):
    ``a < b`` exactly when ``key(a) < key(b)``; -0.0 and +0.0 share a key (they
    compare equal), -inf has the smallest key of any number."""
    bits = torch.where(x == 0, torch.zeros_like(x), x).view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def select_radix(
    logits: torch.Tensor,
    params: SelectionParams,
    lse: torch.Tensor,
    max_logit: torch.Tensor,
    bits: int = RADIX_BITS,
) -> Selection:
    """Exact selection by rank without ordering anything, for the rows of
    :func:`radix_eligible` (other rows get meaningless values). No host sync;
    a fixed number of passes over the row, each a fused reduction on CUDA.

    Probabilities p = exp(x - lse) (x = logits / T, float32 as in
    :func:`select_sorted`), kept where p > 0 and p >= min_p * max p; U = u * Z
    with Z the kept mass (float64). Rank order is value, then token id, so the
    chosen token is the first whose inclusive cumulative mass exceeds U, and its
    value v* is the largest v with G(v) = sum of kept p over x >= v above U.

    v* is found on order-preserving 32-bit keys of x (:func:`value_keys`), a
    bucket search over values: each pass splits the current key range into
    ``2**bits`` buckets, sums the kept mass at or above each bucket edge (one
    pass, ``2**bits - 1`` masked float64 sums) and keeps the bucket holding U;
    32 / ``bits`` passes reach a single key, i.e. a single float value. Tokens
    tied at v* (equal p) are ordered by id: with S the mass above v*, the pick
    is the j-th of them, j = floor((U - S) / p*), located by counts per block
    of ids (:func:`_nth_true`).
    Rank = kept tokens above v* + j. Equal to :func:`select_sorted` except
    when U lies within float64 rounding of a CDF boundary (tests prove it).
    """
    rows = logits.shape[0]
    t = effective_temperature(params)
    x = scaled_logits(logits, t)
    key = value_keys(x)
    lse = lse.float().unsqueeze(1)
    p = torch.exp(x - lse).double()
    p_max = torch.exp(max_logit.float() / t - lse.squeeze(1)).double()
    keep_floor = (params.min_p.double() * p_max).unsqueeze(1)
    keep = (p > 0) & (p >= keep_floor)
    w = torch.where(keep, p, torch.zeros_like(p))
    total = w.sum(dim=-1)
    target = params.u.double() * total
    # invariant: G(prefix) > target (prefix 0 holds every key: G = total)
    prefix = torch.zeros(rows, dtype=torch.int64, device=logits.device)
    high = 32
    while high > 0:
        width = min(bits, high)
        shift = high - width
        above = torch.zeros_like(prefix)
        for b in range(1, 1 << width):
            edge = (prefix + (b << shift)).unsqueeze(1)
            mass = torch.where(key >= edge, w, torch.zeros_like(w)).sum(dim=-1)
            above = above + (mass > target).long()
        prefix = prefix + (above << shift)
        high = shift
    star = prefix.unsqueeze(1)
    tied = keep & (key == star)
    over = keep & (key > star)
    mass_over = torch.where(over, w, torch.zeros_like(w)).sum(dim=-1)
    n_over = over.sum(dim=-1)
    n_tied = tied.sum(dim=-1)
    p_star = torch.where(tied, w, torch.zeros_like(w)).amax(dim=-1)
    j = torch.floor((target - mass_over) / p_star).long()
    j = torch.minimum(j.clamp(min=0), (n_tied - 1).clamp(min=0))
    token = _nth_true(tied, j, lambda ids: _tied_at(logits, t, lse, keep_floor, ids, star))
    return Selection(
        token_ids=token,
        rank=n_over + j,
        prob=p_star / total,
        num_candidates=keep.sum(dim=-1),
    )


#: token ids per block when locating the j-th tied token (:func:`_nth_true`)
TIE_BLOCK = 512


def _tied_at(
    logits: torch.Tensor,
    t: torch.Tensor,
    lse: torch.Tensor,
    keep_floor: torch.Tensor,
    ids: torch.Tensor,
    star: torch.Tensor,
) -> torch.Tensor:
    """The radix search's ``tied`` mask recomputed at token ids ``ids`` [rows, n]
    (ids >= vocab are never tied): the same float operations, so the same answer."""
    vocab = logits.shape[1]
    x = scaled_logits(logits.gather(1, ids.clamp(max=vocab - 1)), t)
    p = torch.exp(x - lse).double()
    keep = (p > 0) & (p >= keep_floor) & (ids < vocab)
    return keep & (value_keys(x) == star)


def _nth_true(
    mask: torch.Tensor, j: torch.Tensor, mask_at: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Per row, the column of the (j+1)-th True of ``mask`` (j < its count).

    Without a scan or an argmax over the whole row (both compile badly): count
    the Trues per block of :data:`TIE_BLOCK` columns, find the block from the
    small cumulative counts, then recompute that block's mask (``mask_at`` of
    its column ids) and count inside it."""
    rows, vocab = mask.shape
    blocks = -(-vocab // TIE_BLOCK)
    padded = torch.nn.functional.pad(mask, (0, blocks * TIE_BLOCK - vocab))
    per_block = padded.view(rows, blocks, TIE_BLOCK).sum(dim=-1)
    upto = torch.cumsum(per_block, dim=-1)
    block = (upto <= j.unsqueeze(1)).sum(dim=-1)
    before = torch.where(
        torch.arange(blocks, device=mask.device).unsqueeze(0) < block.unsqueeze(1),
        per_block,
        torch.zeros_like(per_block),
    ).sum(dim=-1)
    ids = (block * TIE_BLOCK).unsqueeze(1) + torch.arange(TIE_BLOCK, device=mask.device)
    inside = torch.cumsum(mask_at(ids).long(), dim=-1)
    pos = (inside <= (j - before).unsqueeze(1)).sum(dim=-1)
    return block * TIE_BLOCK + pos


def select_rest(
    logits: torch.Tensor,
    params: SelectionParams,
    stats: RowStats | None = None,
    top_ids: torch.Tensor | None = None,
) -> Selection:
    """The exact answer for a few rows the head could not resolve: the tail
    histogram for untruncated rows on the CPU (``stats``: the rows' statistics
    where known; ``top_ids``: see :func:`select_tail`), the full sort otherwise."""
    if logits.device.type != "cpu":
        return select_sorted(logits, params)
    plain = untruncated(params, logits.shape[-1])
    if not bool(plain.any()):
        return select_sorted(logits, params)
    if bool(plain.all()):  # no copy of the rows
        return select_tail(logits, params, stats, top_ids)
    tail_rows = torch.nonzero(plain).squeeze(1)
    tail = select_tail(
        logits.index_select(0, tail_rows),
        _take(params, tail_rows),
        None if stats is None else stats.take(tail_rows),
    )
    other = torch.nonzero(~plain).squeeze(1)
    rest = select_sorted(logits.index_select(0, other), _take(params, other))
    return _merge(_merge(_empty(logits.shape[0], logits.device), tail_rows, tail), other, rest)


def _empty(rows: int, device: torch.device) -> Selection:
    z = torch.zeros(rows, dtype=torch.int64, device=device)
    return Selection(z, z, torch.zeros(rows, dtype=torch.float64, device=device), z)


def _merge(base: Selection, rows: torch.Tensor, part: Selection) -> Selection:
    return Selection(
        token_ids=base.token_ids.index_copy(0, rows, part.token_ids),
        rank=base.rank.index_copy(0, rows, part.rank),
        prob=base.prob.index_copy(0, rows, part.prob),
        num_candidates=base.num_candidates.index_copy(0, rows, part.num_candidates),
    )


def select(
    logits: torch.Tensor, params: SelectionParams, head_size: int = DEFAULT_HEAD
) -> Selection:
    """Select one token per row: the chunked head (:func:`select_chunked`,
    ``head_size`` chunks); rows it cannot resolve go to :func:`select_rest`.

    One host sync to learn whether any row needs the full sort; a second one
    (small) only when some does.
    """
    t = effective_temperature(params)
    stats = row_stats(logits, t)
    assert stats.lse is not None
    sel, resolved = select_chunked(logits, params, stats.lse, stats.num_finite, head_size)
    if bool(resolved.all()):
        return sel
    rows = torch.nonzero(~resolved).squeeze(1)
    return _merge(sel, rows, select_rest(logits.index_select(0, rows), _take(params, rows)))


def force_tokens(logits: torch.Tensor, rows: torch.Tensor | None, token_ids: torch.Tensor) -> None:
    """In place: 0 at each chosen token, -inf elsewhere, for the given rows (all if None)."""
    if rows is None:
        logits.fill_(float("-inf"))
        logits.scatter_(1, token_ids.unsqueeze(1), 0.0)
        return
    logits.index_fill_(0, rows, float("-inf"))
    logits.index_put_((rows, token_ids), torch.zeros_like(token_ids, dtype=logits.dtype))
