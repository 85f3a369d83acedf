"""The radix search of :func:`qr_sampler.sampling.select.select_radix` in
Triton kernels: each row split over several programs, one launch per pass,
no host sync.

Same float operations as the torch search (x = logits / T with correctly
rounded division, p = exp(x - lse) in float32 -- libdevice's ``expf`` on CUDA,
as torch's -- kept mass summed in float64), so the same answers. The search
narrows an interval of values [lo, hi) that holds v*, the value of the chosen
token (the largest v whose kept mass at or above it, G(v), exceeds U = u * Z):

* pass 0 splits the values by distance below the row's largest x (edges at
  x_max - :data:`VALUE_EDGES`): the mass sits near the top, so one pass takes
  out most of the vocabulary. It also sums Z (its edge 0 is -inf) and counts
  the kept tokens;
* each later pass splits the interval's order-preserving 32-bit keys
  (:func:`~qr_sampler.sampling.select.value_keys`) into 2**BITS equal parts:
  at most 32 / BITS passes reach a span of 2**BITS keys, and the pass that
  starts from such a span works on single keys and also counts, per program,
  the kept tokens at or above each key and above the interval and the lowest
  id at each key ("count" pass). Passes after it return at once;
* in a pass, each program sums over its slice of the row the kept mass at or
  above each edge of the tokens *inside* the interval, into its own partial
  row (float64, no atomics: the next pass reduces them in a fixed order, so
  every program of a row and every run agree bit for bit) and adds the mass
  above the interval, known from the pass before. Tokens outside the interval
  cost a load and two compares (a block with none inside skips the rest);
* key edges are compared as floats (an edge's key mapped back to its value,
  keys outside the finite floats to -inf/+inf): for kept tokens (finite x)
  ``x >= value(edge)`` exactly when ``key(x) >= edge``;
* the final kernel (one program per row) reads v*, the mass and count above
  it, the tied tokens' count and p* = exp(v* - lse), finds which program's
  slice holds the j-th tied token and, only when j > 0 there (exact ties at
  v*), walks that slice in id order. A row with +inf or NaN logits (lse not
  finite) is left untouched: unresolved (result column 4 = 0) unless the
  chunked head answered it, else the exact fallback does.

Imported only where Triton and a GPU exist (and by the tests, through Triton's
CPU interpreter).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from qr_sampler.sampling.select import Selection, SelectionParams, effective_temperature

#: bits of the key decided per key pass
BITS = 4
#: token ids per loop iteration of a pass
BLOCK = 128
#: warps per program (one: a block's reductions stay inside the warp)
WARPS = 1
#: aim for about this many programs per streaming multiprocessor in a pass
PROGRAMS_PER_SM = 32
#: at most this many programs per row
MAX_SPLIT = 64
#: pass 0's bucket edges, as distances below the row's largest x (the first,
#: infinite, is edge 0: every token); 2**BITS of them, decreasing
VALUE_EDGES = (
    float("inf"), 32.0, 20.0, 14.0, 10.0, 8.0, 6.0, 4.5,
    3.5, 2.5, 1.75, 1.25, 0.8, 0.5, 0.25, 0.1,
)  # fmt: skip

_SIGN: Any = tl.constexpr(2147483648)  # 2**31
_FLT_MAX: Any = tl.constexpr(3.4028234663852886e38)
_KEY_NEG_INF: Any = tl.constexpr(8388607)  # key of -inf: edges at or below it compare as -inf
_KEY_FLT_MAX: Any = tl.constexpr(4286578687)  # key of the largest float: edges above it as +inf
_NO_ID: Any = tl.constexpr(2147483647)
# what a pass does for a row
_VALUE: Any = tl.constexpr(0)
_SEARCH: Any = tl.constexpr(1)
_COUNT: Any = tl.constexpr(2)
_IDLE: Any = tl.constexpr(3)

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not _INTERPRETED:
    from triton.language.extra import libdevice


@triton.jit
def _exp(z, EXACT_EXP: tl.constexpr):
    return libdevice.exp(z) if EXACT_EXP else tl.exp(z)


@triton.jit
def _scaled(raw, inside, t):
    """x = logits / T as :func:`~qr_sampler.sampling.select.scaled_logits`
    (``raw``: loaded logits): NaN -> -inf, +inf -> the largest float,
    -0.0 -> +0.0, -inf outside the row."""
    x = tl.where(inside, raw.to(tl.float32), float("-inf"))
    x = tl.div_rn(x, t)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == float("inf"), _FLT_MAX, x)
    return tl.where(x == 0.0, 0.0, x)


@triton.jit
def _key_value(key):
    """The float32 whose order-preserving key is ``key`` (int64); keys at or
    below -inf's as -inf, keys above the largest float's as +inf."""
    bits = key - _SIGN
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    x = bits.to(tl.int32).to(tl.float32, bitcast=True)
    x = tl.where(key <= _KEY_NEG_INF, float("-inf"), x)
    return tl.where(key > _KEY_FLT_MAX, float("inf"), x)


@triton.jit
def _value_key(x):
    """Order-preserving int64 key of float32 ``x`` (x not -0.0)."""
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + _SIGN


@triton.jit
def _row_scalars(
    rows_ptr,
    i,
    t_ptr,
    lse_ptr,
    max_ptr,
    params_ptr,
    params_stride,
    U_COL,
    MINP_COL,
    EXACT_EXP: tl.constexpr,
):
    """The row, T, lse, the min-p floor, u and the largest x (as scaled)."""
    row = tl.load(rows_ptr + i)
    t = tl.load(t_ptr + row)
    lse = tl.load(lse_ptr + row)
    top = tl.div_rn(tl.load(max_ptr + row), t)
    p_max = _exp(top - lse, EXACT_EXP).to(tl.float64)
    floor = tl.load(params_ptr + row * params_stride + MINP_COL) * p_max
    u = tl.load(params_ptr + row * params_stride + U_COL)
    top = tl.where(top != top, _FLT_MAX, top)  # no NaN edges: every key stays reachable
    top = tl.minimum(top, _FLT_MAX)
    return row, t, lse, floor, u, top


@triton.jit
def _reduce(
    part_ptr, above_ptr, i, n, R, u, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, NB: tl.constexpr
):
    """After pass ``R`` (R a runtime or constant index): Z (pass 0's edge 0),
    U, the chosen bucket, the kept mass at or above its next edge and above
    the interval, reduced over the programs in a fixed order."""
    progs = tl.arange(0, SPLIT_P2)
    bins = tl.arange(0, NB)
    ok = progs[:, None] < SPLIT
    first = tl.load(
        part_ptr + (i * SPLIT + progs[:, None]) * NB + bins[None, :],
        mask=ok & (bins[None, :] == 0),
        other=0.0,
    )
    total = tl.sum(tl.sum(first, axis=1), axis=0)
    target = u * total
    parts = tl.load(
        part_ptr + ((R * n + i) * SPLIT + progs[:, None]) * NB + bins[None, :], mask=ok, other=0.0
    )
    above = tl.load(above_ptr + R * n + i)
    g = tl.sum(parts, axis=0) + above  # [NB] kept mass at or above each edge
    pick = tl.sum(((g > target) & (bins > 0)).to(tl.int64), axis=0)
    g_next = tl.sum(tl.where(bins == pick + 1, g, 0.0), axis=0)
    return total, target, pick, above, tl.where(pick == NB - 1, above, g_next)


@triton.jit
def _key_edges(lo_key, hi_key, BITS: tl.constexpr):
    """Pass edges splitting keys [lo_key, hi_key) into 2**BITS equal parts."""
    bins = tl.arange(0, 1 << BITS).to(tl.int64)
    return lo_key + (((hi_key - lo_key) * bins) >> BITS)


@triton.jit
def _pass_kernel(
    logits_ptr,
    stride,
    vocab,
    rows_ptr,
    t_ptr,
    lse_ptr,
    max_ptr,
    params_ptr,
    params_stride,
    dist_ptr,
    part_ptr,
    above_ptr,
    lo_ptr,
    hi_ptr,
    mode_ptr,
    cpass_ptr,
    cnt_ptr,
    low_ptr,
    acnt_ptr,
    kcnt_ptr,
    n,
    chunk,
    U_COL,
    MINP_COL,
    R: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    EXACT_EXP: tl.constexpr,
):
    i = tl.program_id(0)
    c = tl.program_id(1)
    row, t, lse, floor, u, top = _row_scalars(
        rows_ptr, i, t_ptr, lse_ptr, max_ptr, params_ptr, params_stride, U_COL, MINP_COL, EXACT_EXP
    )
    NB: tl.constexpr = 1 << BITS
    bins = tl.arange(0, NB)
    row_ptr = logits_ptr + row * stride
    lanes = tl.arange(0, BLOCK)
    start = c * chunk
    end = tl.minimum(start + chunk, vocab)
    base = (R * n + i) * SPLIT + c
    first = c == 0  # one program writes the row's state (all computed the same)
    if R == 0:
        edges = top - tl.load(dist_ptr + bins)  # [NB] values; edge 0 is -inf
        mass = tl.zeros([NB, BLOCK], dtype=tl.float64)
        kept = tl.zeros([BLOCK], dtype=tl.int32)
        for s in range(start, end, BLOCK):
            offs = s + lanes
            inside = offs < end
            x = _scaled(tl.load(row_ptr + offs, mask=inside), inside, t)
            p = _exp(x - lse, EXACT_EXP).to(tl.float64)
            keep = inside & (p > 0.0) & (p >= floor)
            w = tl.where(keep, p, 0.0)
            mass += tl.where(x[None, :] >= edges[:, None], w[None, :], 0.0)
            kept += keep.to(tl.int32)
        tl.store(part_ptr + base * NB + bins, tl.sum(mass, axis=1))
        tl.store(kcnt_ptr + i * SPLIT + c, tl.sum(kept, axis=0))
        tl.store(above_ptr + i, 0.0, mask=first)
        tl.store(mode_ptr + i, _VALUE, mask=first)
        tl.store(cpass_ptr + i, -1, mask=first)
    else:
        # the interval from the previous pass's choice
        _total, _target, pick, _above_p, above = _reduce(
            part_ptr, above_ptr, i, n, R - 1, u, SPLIT, SPLIT_P2, NB
        )
        mode_p = tl.load(mode_ptr + (R - 1) * n + i)
        if R == 1:
            prev = top - tl.load(dist_ptr + bins)
            lo_v = tl.sum(tl.where(bins == pick, prev, 0.0), axis=0)
            hi_v = tl.sum(tl.where(bins == pick + 1, prev, 0.0), axis=0)
            lo_key = tl.where(
                lo_v == float("-inf"), 0, _value_key(tl.where(lo_v == 0.0, 0.0, lo_v))
            )
            hi_key = tl.where(
                pick == NB - 1, _KEY_FLT_MAX + 1, _value_key(tl.where(hi_v == 0.0, 0.0, hi_v))
            )
        else:
            lo_p = tl.load(lo_ptr + (R - 1) * n + i)
            hi_p = tl.load(hi_ptr + (R - 1) * n + i)
            prev_k = _key_edges(lo_p, hi_p, BITS)
            lo_key = tl.sum(tl.where(bins == pick, prev_k, 0), axis=0)
            hi_key = tl.where(
                pick == NB - 1, hi_p, tl.sum(tl.where(bins == pick + 1, prev_k, 0), axis=0)
            )
        searching = (mode_p == _VALUE) | (mode_p == _SEARCH)
        mode = tl.where(searching, tl.where(hi_key - lo_key <= NB, _COUNT, _SEARCH), _IDLE)
        tl.store(lo_ptr + R * n + i, lo_key, mask=first)
        tl.store(hi_ptr + R * n + i, hi_key, mask=first)
        tl.store(above_ptr + R * n + i, above, mask=first)
        tl.store(mode_ptr + R * n + i, mode, mask=first)
        tl.store(cpass_ptr + i, R, mask=first & (mode == _COUNT))
        edges = _key_value(_key_edges(lo_key, hi_key, BITS))
        lo = _key_value(lo_key)
        hi = _key_value(hi_key)
        mass = tl.zeros([NB], dtype=tl.float64)
        count = tl.zeros([NB], dtype=tl.int32)
        low = tl.full([NB], _NO_ID, dtype=tl.int32)
        over = tl.zeros([BLOCK], dtype=tl.int32)
        if mode == _SEARCH:
            raw = tl.load(row_ptr + start + lanes, mask=start + lanes < end)
            for s in range(start, end, BLOCK):
                offs = s + lanes
                inside = offs < end
                x = _scaled(raw, inside, t)
                ahead = s + BLOCK + lanes  # the next block's load is in flight meanwhile
                raw = tl.load(row_ptr + ahead, mask=ahead < end)
                cand = inside & (x >= lo) & (x < hi)
                if tl.sum(cand.to(tl.int32), axis=0) > 0:
                    p = _exp(x - lse, EXACT_EXP).to(tl.float64)
                    w = tl.where(cand & (p > 0.0) & (p >= floor), p, 0.0)
                    mass += tl.sum(tl.where(x[None, :] >= edges[:, None], w[None, :], 0.0), axis=1)
        elif mode == _COUNT:
            raw = tl.load(row_ptr + start + lanes, mask=start + lanes < end)
            for s in range(start, end, BLOCK):
                offs = s + lanes
                inside = offs < end
                x = _scaled(raw, inside, t)
                ahead = s + BLOCK + lanes
                raw = tl.load(row_ptr + ahead, mask=ahead < end)
                high = inside & (x >= lo)
                if tl.sum(high.to(tl.int32), axis=0) > 0:
                    p = _exp(x - lse, EXACT_EXP).to(tl.float64)
                    keep = high & (p > 0.0) & (p >= floor)
                    over += (keep & (x >= hi)).to(tl.int32)
                    mine = keep & (x < hi)
                    w = tl.where(mine, p, 0.0)
                    ge = x[None, :] >= edges[:, None]
                    mass += tl.sum(tl.where(ge, w[None, :], 0.0), axis=1)
                    count += tl.sum((ge & mine[None, :]).to(tl.int32), axis=1)
                    at = (x[None, :] == edges[:, None]) & mine[None, :]
                    low = tl.minimum(low, tl.min(tl.where(at, offs[None, :], _NO_ID), axis=1))
            mine_base = (i * SPLIT + c) * NB
            tl.store(cnt_ptr + mine_base + bins, count)
            tl.store(low_ptr + mine_base + bins, low)
            tl.store(acnt_ptr + i * SPLIT + c, tl.sum(over, axis=0))
        tl.store(part_ptr + base * NB + bins, mass)


@triton.jit
def _final_kernel(
    logits_ptr,
    stride,
    vocab,
    rows_ptr,
    t_ptr,
    lse_ptr,
    max_ptr,
    params_ptr,
    params_stride,
    dist_ptr,
    part_ptr,
    above_ptr,
    lo_ptr,
    hi_ptr,
    mode_ptr,
    cpass_ptr,
    cnt_ptr,
    low_ptr,
    acnt_ptr,
    kcnt_ptr,
    n,
    chunk,
    token_ptr,
    out_ptr,
    out_stride,
    U_COL,
    MINP_COL,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    EXACT_EXP: tl.constexpr,
):
    i = tl.program_id(0)
    row, t, lse, floor, u, _top = _row_scalars(
        rows_ptr, i, t_ptr, lse_ptr, max_ptr, params_ptr, params_stride, U_COL, MINP_COL, EXACT_EXP
    )
    NB: tl.constexpr = 1 << BITS
    block = out_ptr + row * out_stride
    cp = tl.load(cpass_ptr + i)
    # +inf or NaN logits (lse not finite) or no count pass: the row's result is
    # left as it is (unresolved, or what the chunked head found), for the
    # exact fallback
    finite = (lse == lse) & (lse != float("inf")) & (lse != float("-inf"))
    if (cp >= 0) & finite:
        total, target, pick, _a, over_mass = _reduce(
            part_ptr, above_ptr, i, n, cp, u, SPLIT, SPLIT_P2, NB
        )
        lo_key = tl.load(lo_ptr + cp * n + i)
        hi_key = tl.load(hi_ptr + cp * n + i)
        bins = tl.arange(0, NB)
        star = tl.sum(tl.where(bins == pick, _key_edges(lo_key, hi_key, BITS), 0), axis=0)
        x_star = _key_value(star)
        p_star = _exp(x_star - lse, EXACT_EXP).to(tl.float64)
        progs = tl.arange(0, SPLIT_P2)
        ok = progs < SPLIT
        grid = (i * SPLIT + progs[:, None]) * NB + bins[None, :]
        cnt = tl.load(cnt_ptr + grid, mask=ok[:, None], other=0).to(tl.int64)  # [SPLIT_P2, NB]
        acnt = tl.load(acnt_ptr + i * SPLIT + progs, mask=ok, other=0).to(tl.int64)
        at_pick = tl.sum(tl.where(bins[None, :] == pick, cnt, 0), axis=1)  # per program
        after = tl.sum(tl.where(bins[None, :] == pick + 1, cnt, 0), axis=1)
        tied_here = at_pick - after  # tokens at v*, per program
        n_tied = tl.sum(tied_here, axis=0)
        n_over = tl.sum(after, axis=0) + tl.sum(acnt, axis=0)
        j = tl.floor((target - over_mass) / p_star).to(tl.int64)
        j = tl.minimum(tl.maximum(j, 0), tl.maximum(n_tied - 1, 0))
        run = tl.cumsum(tied_here, axis=0)
        holder = tl.sum((run <= j).to(tl.int64), axis=0)  # program whose slice holds the j-th
        before = tl.sum(tl.where(progs < holder, tied_here, 0), axis=0)
        lows = tl.load(low_ptr + grid, mask=ok[:, None], other=0)
        pickd = (progs[:, None] == holder) & (bins[None, :] == pick)
        token = tl.sum(tl.sum(tl.where(pickd, lows, 0).to(tl.int64), axis=1), axis=0)
        jj = j - before
        if jj > 0:  # past the first tied token of that slice: count them in id order
            row_ptr = logits_ptr + row * stride
            lanes = tl.arange(0, BLOCK)
            start = holder * chunk
            end = tl.minimum(start + chunk, vocab)
            seen = tl.zeros([], dtype=tl.int64)
            for s in range(start, end, BLOCK):
                offs = s + lanes
                inside = offs < end
                x = _scaled(tl.load(row_ptr + offs, mask=inside), inside, t)
                p = _exp(x - lse, EXACT_EXP).to(tl.float64)
                tied = (inside & (p > 0.0) & (p >= floor) & (x == x_star)).to(tl.int64)
                pos = tl.sum((tl.cumsum(tied, axis=0) <= (jj - seen)).to(tl.int64), axis=0)
                here = tl.sum(tied, axis=0)
                token = tl.where((seen <= jj) & (jj < seen + here), s + pos, token)
                seen += here
        n_cand = tl.sum(
            tl.load(kcnt_ptr + i * SPLIT + progs, mask=ok, other=0).to(tl.int64), axis=0
        )
        tl.store(token_ptr + row, token)
        tl.store(block, token.to(tl.float64))
        tl.store(block + 1, (n_over + j).to(tl.float64))
        tl.store(block + 2, p_star / total)
        tl.store(block + 3, n_cand.to(tl.float64))
        tl.store(block + 4, 1.0)


def _split(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """Programs per row and ids per program: enough programs to fill the GPU."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    split = max(1, min(MAX_SPLIT, -(-sms * PROGRAMS_PER_SM // max(rows, 1))))
    chunk = -(-vocab // split)
    chunk = -(-chunk // BLOCK) * BLOCK
    return -(-vocab // chunk), chunk


def radix_into(
    logits: torch.Tensor,
    rows: torch.Tensor,
    t: torch.Tensor,
    lse: torch.Tensor,
    max_logit: torch.Tensor,
    params: torch.Tensor,
    u_col: int,
    min_p_col: int,
    token_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Run the search for the logits rows listed in ``rows`` (int64, on the
    device) and write, at each such row, the token id into ``token_ids`` and
    (token, rank, probability, candidates, 1 = resolved) into the first five
    columns of the float64 block ``out``. ``t``, ``lse`` (logsumexp of
    logits / t) and ``max_logit`` are float32 per row; ``params`` is a float64
    block holding u and min-p in columns ``u_col`` and ``min_p_col``.
    32 / BITS + 2 launches, no sync."""
    n = rows.numel()
    if n == 0:
        return
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    vocab = logits.shape[1]
    device = logits.device
    split, chunk = _split(n, vocab, device)
    rounds = 1 + 32 // BITS  # the value pass, then the key passes
    nb = 1 << BITS
    part = torch.empty(rounds, n, split, nb, dtype=torch.float64, device=device)
    above = torch.empty(rounds, n, dtype=torch.float64, device=device)
    lo = torch.empty(rounds, n, dtype=torch.int64, device=device)
    hi = torch.empty(rounds, n, dtype=torch.int64, device=device)
    mode = torch.empty(rounds, n, dtype=torch.int32, device=device)
    cpass = torch.empty(n, dtype=torch.int32, device=device)
    cnt = torch.empty(n, split, nb, dtype=torch.int32, device=device)
    low = torch.empty(n, split, nb, dtype=torch.int32, device=device)
    acnt = torch.empty(n, split, dtype=torch.int32, device=device)
    kcnt = torch.empty(n, split, dtype=torch.int32, device=device)
    t, lse, max_logit = (v.float().contiguous() for v in (t, lse, max_logit))
    common = (logits, logits.stride(0), vocab, rows, t, lse, max_logit, params, params.stride(0))
    state = (_value_edges(device), part, above, lo, hi, mode, cpass, cnt, low, acnt, kcnt)
    shape = {
        "BITS": BITS,
        "BLOCK": BLOCK,
        "SPLIT": split,
        "SPLIT_P2": triton.next_power_of_2(split),
        "EXACT_EXP": not _INTERPRETED,
        "num_warps": WARPS,
    }
    for r in range(rounds):
        _pass_kernel[(n, split)](*common, *state, n, chunk, u_col, min_p_col, R=r, **shape)
    _final_kernel[(n,)](
        *common, *state, n, chunk, token_ids, out, out.stride(0), u_col, min_p_col, **shape
    )


_EDGES: dict[torch.device, torch.Tensor] = {}


def _value_edges(device: torch.device) -> torch.Tensor:
    """:data:`VALUE_EDGES` on ``device`` (copied once per device)."""
    if device not in _EDGES:
        if len(VALUE_EDGES) != 1 << BITS:
            raise ValueError(f"VALUE_EDGES must hold 2**BITS = {1 << BITS} distances")
        _EDGES[device] = torch.tensor(VALUE_EDGES, dtype=torch.float32, device=device)
    return _EDGES[device]


def select_radix_kernel(
    logits: torch.Tensor,
    params: SelectionParams,
    lse: torch.Tensor,
    max_logit: torch.Tensor,
) -> Selection:
    """:func:`~qr_sampler.sampling.select.select_radix` in 32 / BITS + 2 launches."""
    rows = logits.shape[0]
    device = logits.device
    block = torch.stack([params.u.double(), params.min_p.double()], dim=1).contiguous()
    token = torch.empty(rows, dtype=torch.int64, device=device)
    out = torch.empty(rows, 5, dtype=torch.float64, device=device)
    radix_into(
        logits,
        torch.arange(rows, device=device),
        effective_temperature(params),
        lse,
        max_logit,
        block,
        0,
        1,
        token,
        out,
    )
    return Selection(
        token_ids=token,
        rank=out[:, 1].long(),
        prob=out[:, 2],
        num_candidates=out[:, 3].long(),
    )
