"""The radix search of :func:`qr_sampler.sampling.select.select_radix` in
Triton kernels: each row split over several programs, one launch per pass,
no host sync.

Same algorithm, same float operations (x = logits / T with correctly rounded
division, p = exp(x - lse) in float32 -- libdevice's ``expf`` on CUDA, as
torch's -- kept mass summed in float64), so the same answers:

* a pass splits the current key range [lo, hi) into 2**BITS buckets (BITS
  from :data:`SCHEDULE`, pass by pass); each
  program sums, over its slice of the row, the kept mass at or above each
  bucket edge of the tokens *inside* the range, into its own partial row
  (float64, no atomics: the reduction over programs is in a fixed order, so
  every program of a row and every run agree bit for bit);
* the next pass's programs reduce those partials, add the mass above the range
  (known from the pass before: the mass at or above the bucket edge after the
  chosen one), keep the last edge whose mass exceeds U = u * Z, and narrow the
  range. Pass 1's edge 0 gives Z. Tokens outside the range cost a load and a
  compare: no exponential, no per-edge sums (a block with none in range skips
  them), so passes after the first few run at memory speed;
* key edges are compared as floats (an edge's key mapped back to its float
  value, out-of-range keys to -inf/+inf): for kept tokens (finite x)
  ``x >= float(edge)`` exactly when ``key(x) >= edge``;
* the last pass's buckets are single keys: it also counts kept tokens at or
  above each edge and above the range, and the smallest id at each key, per
  program; the final kernel (one program per row) reads v*, the mass and count
  above it, the tied tokens' count and p* = exp(v* - lse), finds which
  program's slice holds the j-th tied token and, only when j > 0 there (exact
  ties at v*, rare), walks that slice in id order. A row with +inf or NaN
  logits (lse not finite) is left untouched: unresolved (result column 4 = 0)
  unless the chunked head answered it, else the exact fallback does.

Compaction: the first pass with 8 bits decided before it (:data:`COMPACT_BITS`;
the passes up to it read every token) also writes the ids of its
range's tokens, per program and in id order (at most 1 / COMPACT_SHARE of
the slice; a program with more keeps reading its whole slice), and counts the
kept tokens above its range; the next pass reads only those tokens (it
gathers their logits by id: storing x as well measured no faster). Every
later pass but the last does the same over what it read: it rewrites the
list in place with the tokens of its own (2**BITS times narrower) range and
adds its kept tokens above that range to the count, so the lists shrink pass
by pass; a program that read its whole slice starts holding ids as soon as
its range's fit. The last pass adds the count to its own. One warp per
program: a block's ids are all read before any is rewritten.

The first pass reads no u: :func:`radix_begin` queues it (the pipeline does
so before the entropy arrives), and the second on a guess of the first's
choice (its bucket holding the most mass, where U falls for most rows);
:func:`radix_end` queues the second again, which only the rows guessed wrong
work through (the others' programs skip it), and the rest.

The row statistics the search reads (max, logsumexp at T; also the entropy
at T = 1 and the finite count) come from two more kernels,
:func:`row_stats_kernel`, when no row uses EDT.

Imported only where Triton and a GPU exist (and by the tests, through Triton's
CPU interpreter).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver as _driver

from qr_sampler.sampling.select import Selection, SelectionParams, effective_temperature

#: bits of the key decided by each pass, in order (32 in all, 1 to 4 a pass).
#: A pass that reads every token costs about as much for its exponentials as
#: for its edge sums, so the passes up to and including the compacting one
#: take 2-3 bits and the later passes, over their lists, take 4 (search at
#: batch 256 / 64 on an H200, graph-captured, randn*3 logits: 949 / 316 µs
#: with 4 bits a pass, 797 / 275 µs with this schedule; 2 bits up to the
#: compacting pass 855 / 293, 3,3,2 then 4-bit passes 924 / 305). Used inside
#: a CUDA graph's capture, and eagerly from :data:`HOST_BOUND_ROWS` rows on
SCHEDULE: tuple[int, ...] = (3, 3, 2, 2, 2, 4, 4, 4, 4, 4)
#: ... and below that, eagerly: the fewest passes (each launch costs the host
#: ~65 µs against a few tens of µs of GPU time at those batches)
FEW_PASSES: tuple[int, ...] = (4, 4, 4, 4, 4, 4, 4, 4)
#: the compacting pass: the first with this many bits decided before it (the
#: passes up to it read every token: the wide ones)
COMPACT_BITS = 8
#: token ids per loop iteration of a pass
BLOCK = 128
#: warps per program (one: a block's reductions stay inside the warp)
WARPS = 1
#: programs per streaming multiprocessor in one wave of a wide pass: its
#: kernels take 117-118 registers a lane, so about 17 one-warp programs fit an
#: SM at once (was 32, which made batch 64's wide passes two waves)
PROGRAMS_PER_SM = 16
#: ... and at least this many programs per row on a GPU: at batch 256 more,
#: shorter slices beat one wave (search, graph-captured, randn*3 logits on an
#: H200: 16 programs a row 749 µs, 24 727 µs, 33 718 µs; at batch 64, 64
#: programs a row 254 µs, 49 243 µs, 33 219 µs, 24 225 µs)
ROW_PROGRAMS = 32
#: at most this many programs per row
MAX_SPLIT = 64
#: a program keeps at most 1 / COMPACT_SHARE of its slice's ids; a program with
#: more in range reads its whole slice in the later passes. A half, not a
#: quarter: on randn·3 logits, rows whose 8-bit range is [2, 8) hold ~25 % of
#: the row there, and their programs over a quarter made the next pass the
#: slowest after the wide ones (search at batch 256 on an H200: 1,014 ->
#: 893 µs; batch 64: 334 -> 303 µs)
COMPACT_SHARE = 2
#: the second pass runs on a guess before u arrives (the first pass's bucket
#: holding the most mass), beside the host's entropy work; once u is known it
#: runs again only for the rows guessed wrong (their programs alone: the
#: others skip it)
GUESS_SECOND = True
#: ... in a CUDA graph, or eagerly from this many rows on: an eager search of
#: fewer rows is bound by its launches' host time (no guess, :data:`FEW_PASSES`)
HOST_BOUND_ROWS = 128
#: slices of at most this many ids (on a GPU, every vocabulary up to
#: ROW_PROGRAMS * 32,768 ids, at any batch) hold them as int16 offsets, else
#: int32: the half-row list then takes the memory a quarter-row list of int32 took
SHORT_IDS_MAX = 32_768
#: logits per program of the row statistics (:func:`row_stats_kernel`), held
#: in registers: the row is read once
#: (on an H200, batch 256 / 64, launched eagerly: 126 / 65 µs; the other
#: slices tried, 2,048 to 16,384 ids with 4 to 16 warps: 130-137 / 77-124 µs)
STATS_CHUNK = 4096
#: warps per program of the row statistics
STATS_WARPS = 4

_SIGN: Any = tl.constexpr(2147483648)  # 2**31
_FLT_MAX: Any = tl.constexpr(3.4028234663852886e38)
_KEY_NEG_INF: Any = tl.constexpr(8388607)  # key of -inf: edges at or below it compare as -inf
_KEY_FLT_MAX: Any = tl.constexpr(4286578687)  # key of the largest float: edges above it as +inf
_NO_ID: Any = tl.constexpr(2147483647)

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not _INTERPRETED:
    from triton.language.extra import libdevice


@triton.jit
def _exp(z, EXACT_EXP: tl.constexpr):
    return libdevice.exp(z) if EXACT_EXP else tl.exp(z)


@triton.jit
def _logits_at(logits_ptr, addr_ptr, INDIRECT: tl.constexpr):
    """The logits to read: ``logits_ptr``, or with ``INDIRECT`` the address
    held in ``addr_ptr`` (int64, same dtype and row stride, a multiple of 16):
    a captured CUDA graph then reads each step's logits where the caller has
    them. The address is declared 16-byte aligned, as Triton specialises an
    aligned ``logits_ptr``: the compiler then lays the loads out alike, and the
    reductions, whose order follows that layout, give the same bits."""
    if INDIRECT:
        ptr = tl.load(addr_ptr).to(tl.pointer_type(logits_ptr.dtype.element_ty))
        return tl.multiple_of(ptr, 16)
    return logits_ptr


@triton.jit
def _scaled(raw, inside, t):
    """x = logits / T as :func:`~qr_sampler.sampling.select.scaled_logits`
    (``raw``: loaded logits, -inf outside the row): NaN -> -inf, +inf -> the
    largest float, -0.0 -> +0.0."""
    x = tl.where(inside, raw.to(tl.float32), float("-inf"))
    x = tl.div_rn(x, t)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == float("inf"), _FLT_MAX, x)
    return tl.where(x == 0.0, 0.0, x)


@triton.jit
def _kept(x, mask, lse, floor, EXACT_EXP: tl.constexpr):
    """p = exp(x - lse) as float64, and which tokens of ``mask`` are kept
    (p > 0 and p >= the min-p floor)."""
    p = _exp(x - lse, EXACT_EXP).to(tl.float64)
    return p, mask & (p > 0.0) & (p >= floor)


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
    row = tl.load(rows_ptr + i)
    t = tl.load(t_ptr + row)
    lse = tl.load(lse_ptr + row)
    p_max = _exp(tl.div_rn(tl.load(max_ptr + row), t) - lse, EXACT_EXP).to(tl.float64)
    floor = tl.load(params_ptr + row * params_stride + MINP_COL) * p_max
    u = tl.load(params_ptr + row * params_stride + U_COL)
    return row, t, lse, floor, u


@triton.jit
def _choose(
    part_ptr,
    above_ptr,
    pref_ptr,
    i,
    n,
    R,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    NB: tl.constexpr,
    NBS: tl.constexpr,
    u,
    GUESS: tl.constexpr = False,
):
    """After pass ``R``: Z (pass 0's edge 0), U, the chosen bucket (from the
    kept mass at or above each edge of pass R, reduced over the programs in a
    fixed order), and the range's lower key and the mass above it for pass R + 1.
    ``NB``: pass R's buckets, ``NBS``: the partials' row stride.
    ``GUESS``: the bucket holding the most kept mass instead (no u read)."""
    progs = tl.arange(0, SPLIT_P2)
    bins = tl.arange(0, NB)
    ok = progs[:, None] < SPLIT
    # Z from a tile of one shape in every pass and in the final kernel (a
    # reduction's order follows its tile's layout, which follows NB): every
    # pass of a search compares against the same U, to the last bit
    first = tl.load(part_ptr + ((0 * n + i) * SPLIT + progs) * NBS, mask=progs < SPLIT, other=0.0)
    total = tl.sum(first, axis=0)
    target = u * total
    parts = tl.load(
        part_ptr + ((R * n + i) * SPLIT + progs[:, None]) * NBS + bins[None, :], mask=ok, other=0.0
    )
    above = tl.load(above_ptr + R * n + i)
    g = tl.sum(parts, axis=0) + above  # [NB]
    if GUESS:
        g_up = tl.sum(tl.where(bins[None, :] == bins[:, None] + 1, g[None, :], 0.0), axis=1)
        g_up = tl.where(bins == NB - 1, above, g_up)  # the mass at or above the next edge
        pick = tl.argmax(g - g_up, axis=0).to(tl.int64)
    else:
        pick = tl.sum(((g > target) & (bins > 0)).to(tl.int64), axis=0)
    g_next = tl.sum(tl.where(bins == pick + 1, g, 0.0), axis=0)
    above_next = tl.where(pick == NB - 1, above, g_next)
    prefix = tl.load(pref_ptr + R * n + i)
    return total, target, pick, prefix, above_next


@triton.jit
def _narrow_block(
    x,
    offs,
    inside,
    cand,
    lo,
    hi,
    edges,
    lse,
    floor,
    mass,
    count,
    low,
    over,
    LAST: tl.constexpr,
    EXACT_EXP: tl.constexpr,
):
    """One block of a pass after the wide ones (``cand``: its tokens in the
    range): the kept mass at or above each edge, reduced at once, and the kept
    tokens above the range, counted into ``over``; the last pass also counts
    kept tokens at or above each edge, and the smallest id (``offs``) at each
    key. A block without a token at or above the range's low end adds
    nothing (no exponential)."""
    if tl.sum((inside & (x >= lo)).to(tl.int32), axis=0) > 0:
        p, keep = _kept(x, inside & (x >= lo), lse, floor, EXACT_EXP)
        over += (keep & (x >= hi)).to(tl.int32)
        mine = keep & cand
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            w = tl.where(mine, p, 0.0)
            ge = x[None, :] >= edges[:, None]
            mass += tl.sum(tl.where(ge, w[None, :], 0.0), axis=1)
            if LAST:
                count += tl.sum((ge & mine[None, :]).to(tl.int32), axis=1)
                at = (x[None, :] == edges[:, None]) & mine[None, :]
                low = tl.minimum(low, tl.min(tl.where(at, offs[None, :], _NO_ID), axis=1))
    return mass, count, low, over


@triton.jit
def _hold_ids(ids_ptr, cap, cand, offs, start, written):
    """Append the ids ``offs`` of the block's tokens in the range (``cand``) to
    a program's list at ``ids_ptr``, as offsets from its slice's ``start``
    (in id order; those past ``cap`` are not stored, but counted: a count
    above ``cap`` means the list is not used)."""
    at = written + tl.cumsum(cand.to(tl.int32), axis=0) - 1
    tl.store(ids_ptr + at, offs - start, mask=cand & (at < cap))
    return written + tl.sum(cand.to(tl.int32), axis=0)


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
    part_ptr,
    above_ptr,
    pref_ptr,
    cnt_ptr,
    low_ptr,
    acnt_ptr,
    kcnt_ptr,
    cid_ptr,
    ccnt_ptr,
    cover_ptr,
    n,
    chunk,
    cap,
    U_COL,
    MINP_COL,
    addr_ptr,
    R: tl.constexpr,
    ROUNDS: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    EXACT_EXP: tl.constexpr,
    WIDE: tl.constexpr,
    COMPACT: tl.constexpr,
    PHASE: tl.constexpr = 0,
    SHIFT: tl.constexpr = 28,
    PBITS: tl.constexpr = 4,
    NBS: tl.constexpr = 16,
    INDIRECT: tl.constexpr = False,
):
    """Pass ``R`` of the search, over ``BITS`` bits of the key below ``SHIFT``
    (``PBITS``: the pass before's bits); ``PHASE`` 1 runs it on a guess of the bucket
    chosen after pass R - 1 (the one holding the most mass: no u read), and
    ``PHASE`` 2 re-runs it, once u is known, only for rows guessed wrong."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    row, t, lse, floor, u = _row_scalars(
        rows_ptr, i, t_ptr, lse_ptr, max_ptr, params_ptr, params_stride, U_COL, MINP_COL, EXACT_EXP
    )
    NB: tl.constexpr = 1 << BITS
    PNB: tl.constexpr = 1 << PBITS
    bins = tl.arange(0, NB)
    if R == 0:
        prefix = tl.zeros([], dtype=tl.int64)
        above = tl.zeros([], dtype=tl.float64)
    else:
        _t, _u, pick, prev, above = _choose(
            part_ptr, above_ptr, pref_ptr, i, n, R - 1, SPLIT, SPLIT_P2, PNB, NBS, u, PHASE == 1
        )
        prefix = prev + (pick << (SHIFT + BITS))
    redo = c >= 0  # this program writes its results: always, but in phase 2
    guessed = pref_ptr + ROUNDS * n + i  # the prefix phase 1 guessed (phase 2 never writes it)
    if PHASE == 2:
        redo = prefix != tl.load(guessed)
    # masks from integer comparisons (Triton's interpreter takes no scalar bool)
    live = tl.where(redo, NB, 0)  # bins stored
    writer = tl.where(redo, 0, -1)  # the program that stores the row's values
    # every program of the row computed the same values; one writes them
    tl.store(pref_ptr + R * n + i, prefix, mask=c == writer)
    tl.store(above_ptr + R * n + i, above, mask=c == writer)
    if PHASE == 1:
        tl.store(guessed, prefix, mask=c == 0)
    edges = _key_value(prefix + (bins.to(tl.int64) << SHIFT))  # [NB]
    lo = _key_value(prefix)
    hi = _key_value(prefix + (NB << SHIFT))
    row_ptr = _logits_at(logits_ptr, addr_ptr, INDIRECT) + row * stride
    lanes = tl.arange(0, BLOCK)
    start = c * chunk
    end = tl.minimum(start + chunk, vocab)
    # passes before WIDE keep per-lane [NB, BLOCK] sums (most blocks have work);
    # later ones reduce each block with work at once ([NB] sums, few registers)
    mass = tl.zeros([NB, BLOCK], dtype=tl.float64) if R < WIDE else tl.zeros([NB], dtype=tl.float64)
    count = tl.zeros([NB], dtype=tl.int32)
    low = tl.full([NB], _NO_ID, dtype=tl.int32)
    over = tl.zeros([BLOCK], dtype=tl.int32)  # kept tokens above the range (passes from COMPACT)
    kept = tl.zeros([BLOCK], dtype=tl.int32)
    slot = i * SPLIT + c
    LAST: tl.constexpr = R == ROUNDS - 1
    # from the compacting pass on, every pass but the last writes the ids of
    # its range's tokens (in id order, over those it read) and counts the kept
    # tokens above its range; the passes after the wide ones (all later than
    # the compacting pass) hold ids unless last
    HOLD: tl.constexpr = R < ROUNDS - 1
    written = tl.zeros([], dtype=tl.int32)  # ids written by this pass
    ids = cid_ptr + slot * cap  # this program's list
    scan_end = tl.where(redo, end, start)  # the slice's end (its start: nothing to read)
    if R > COMPACT:
        held = tl.load(ccnt_ptr + slot)
        compacted = held <= cap
        scan_end = tl.where(compacted, start, scan_end)
        # the ids of the tokens in the previous pass's range, in id order; this
        # pass rewrites the same list in place with those in its own range
        # (block by block: never past what it has read)
        for s in range(0, tl.where(compacted, held, 0), BLOCK):
            k = s + lanes
            inside = k < held
            offs = start + tl.load(ids + k, mask=inside, other=0).to(tl.int32)
            raw = tl.load(row_ptr + offs, mask=inside, other=float("-inf"))
            x = _scaled(raw, inside, t)
            cand = inside & (x >= lo) & (x < hi)
            mass, count, low, over = _narrow_block(
                x, offs, inside, cand, lo, hi, edges, lse, floor, mass, count, low, over,
                LAST, EXACT_EXP,
            )  # fmt: skip
            if HOLD:
                written = _hold_ids(ids, cap, cand, offs, start, written)
    raw = tl.load(row_ptr + start + lanes, mask=start + lanes < scan_end, other=float("-inf"))
    for s in range(start, scan_end, BLOCK):
        offs = s + lanes
        inside = offs < scan_end
        x = _scaled(raw, inside, t)
        # the next block's load is in flight while this one is worked on
        ahead = s + BLOCK + lanes
        raw = tl.load(row_ptr + ahead, mask=ahead < scan_end, other=float("-inf"))
        cand = inside & (x >= lo) & (x < hi)
        if R < WIDE:
            if R == COMPACT:
                # p for the range and above it: the kept tokens above are counted
                p, kept_lo = _kept(x, inside & (x >= lo), lse, floor, EXACT_EXP)
                keep = kept_lo & (x < hi)
                over += (kept_lo & (x >= hi)).to(tl.int32)
                written = _hold_ids(ids, cap, cand, offs, start, written)
            else:
                p, keep = _kept(x, cand, lse, floor, EXACT_EXP)
            w = tl.where(keep, p, 0.0)
            mass += tl.where(x[None, :] >= edges[:, None], w[None, :], 0.0)
            if R == 0:
                kept += keep.to(tl.int32)
        else:
            mass, count, low, over = _narrow_block(
                x, offs, inside, cand, lo, hi, edges, lse, floor, mass, count, low, over,
                LAST, EXACT_EXP,
            )  # fmt: skip
            if HOLD:
                written = _hold_ids(ids, cap, cand, offs, start, written)
    base = (R * n + i) * SPLIT + c
    if R < WIDE:
        tl.store(part_ptr + base * NBS + bins, tl.sum(mass, axis=1), mask=bins < live)
    else:
        tl.store(part_ptr + base * NBS + bins, mass, mask=bins < live)
    if R == 0:
        tl.store(kcnt_ptr + slot, tl.sum(kept, axis=0))
    if R == COMPACT:
        tl.store(ccnt_ptr + slot, written)
        tl.store(cover_ptr + slot, tl.sum(over, axis=0))
    if R > COMPACT:  # noqa: SIM102 (nested: both conditions static in every Triton)
        if HOLD:
            # a program that read its whole slice holds ids from here on if they fit
            tl.store(ccnt_ptr + slot, written)
            before = tl.where(compacted, tl.load(cover_ptr + slot), 0)
            tl.store(cover_ptr + slot, before + tl.sum(over, axis=0))
    if LAST:
        tl.store(cnt_ptr + slot * NB + bins, count)
        tl.store(low_ptr + slot * NB + bins, low)
        # read in id order: the kept tokens above the ids held were counted by
        # the passes that wrote them (the ids held are all inside the range of
        # the pass before this one)
        extra = tl.where(compacted, tl.load(cover_ptr + slot), 0)
        tl.store(acnt_ptr + slot, tl.sum(over, axis=0) + extra)


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
    part_ptr,
    above_ptr,
    pref_ptr,
    cnt_ptr,
    low_ptr,
    acnt_ptr,
    kcnt_ptr,
    cid_ptr,
    ccnt_ptr,
    cover_ptr,
    n,
    chunk,
    cap,
    token_ptr,
    out_ptr,
    out_stride,
    U_COL,
    MINP_COL,
    addr_ptr,
    ROUNDS: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    EXACT_EXP: tl.constexpr,
    NBS: tl.constexpr = 16,
    INDIRECT: tl.constexpr = False,
):
    """One program per row, after the last pass (``BITS``: its bits)."""
    i = tl.program_id(0)
    row, t, lse, floor, u = _row_scalars(
        rows_ptr, i, t_ptr, lse_ptr, max_ptr, params_ptr, params_stride, U_COL, MINP_COL, EXACT_EXP
    )
    NB: tl.constexpr = 1 << BITS
    # +inf or NaN logits (lse not finite): the row's result is left as it is
    # (unresolved, or what the chunked head found) for the exact fallback
    finite = (lse == lse) & (lse != float("inf")) & (lse != float("-inf"))
    if finite:
        total, target, pick, prefix, over_mass = _choose(
            part_ptr, above_ptr, pref_ptr, i, n, ROUNDS - 1, SPLIT, SPLIT_P2, NB, NBS, u
        )
        star = prefix + pick  # the last pass's buckets are single keys
        x_star = _key_value(star)
        p_star = _exp(x_star - lse, EXACT_EXP).to(tl.float64)
        progs = tl.arange(0, SPLIT_P2)
        bins = tl.arange(0, NB)
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
        token = tl.sum(
            tl.where((progs[:, None] == holder) & (bins[None, :] == pick), lows, 0).to(tl.int64),
            axis=1,
        )
        token = tl.sum(token, axis=0)
        jj = j - before
        if jj > 0:  # past the first tied token of that slice: count them in id order
            row_ptr = _logits_at(logits_ptr, addr_ptr, INDIRECT) + row * stride
            lanes = tl.arange(0, BLOCK)
            start = holder * chunk
            end = tl.minimum(start + chunk, vocab)
            seen = tl.zeros([], dtype=tl.int64)
            for s in range(start, end, BLOCK):
                offs = s + lanes
                inside = offs < end
                raw = tl.load(row_ptr + offs, mask=inside, other=float("-inf"))
                x = _scaled(raw, inside, t)
                _p, keep = _kept(x, inside, lse, floor, EXACT_EXP)
                tied = (keep & (x == x_star)).to(tl.int64)
                pos = tl.sum((tl.cumsum(tied, axis=0) <= (jj - seen)).to(tl.int64), axis=0)
                here = tl.sum(tied, axis=0)
                token = tl.where((seen <= jj) & (jj < seen + here), s + pos, token)
                seen += here
        n_cand = tl.sum(
            tl.load(kcnt_ptr + i * SPLIT + progs, mask=ok, other=0).to(tl.int64), axis=0
        )
        tl.store(token_ptr + row, token)
        block = out_ptr + row * out_stride
        tl.store(block, token.to(tl.float64))
        tl.store(block + 1, (n_over + j).to(tl.float64))
        tl.store(block + 2, p_star / total)
        tl.store(block + 3, n_cand.to(tl.float64))
        tl.store(block + 4, 1.0)


@triton.jit
def _stats_kernel(
    logits_ptr,
    stride,
    vocab,
    t_ptr,
    part_ptr,
    cnt_ptr,
    addr_ptr,
    SPLIT: tl.constexpr,
    CHUNK: tl.constexpr,
    EXACT_EXP: tl.constexpr,
    INDIRECT: tl.constexpr = False,
):
    """Row statistics, one slice of ``CHUNK`` ids per program, held in
    registers (the slice is read once): the slice's maximum m_c and, relative
    to it, the sums of e = exp(x - m_c), of e * (x - m_c) and of
    exp((x - m_c) / T) over its finite tokens; its finite and NaN counts."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    row_ptr = _logits_at(logits_ptr, addr_ptr, INDIRECT) + i * stride
    x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    nan = x != x
    finite = x > float("-inf")  # (NaN is not)
    m = tl.max(tl.where(nan, float("-inf"), x), axis=0)
    # a slice without a finite token keeps zero sums (its m_c unused); one
    # with a +inf token, NaN sums: its row's entropy and logsumexp are NaN
    d = tl.where(finite, x - m, 0.0)
    e = tl.where(finite, _exp(d, EXACT_EXP), 0.0)
    r = 1.0 / tl.load(t_ptr + i)
    scaled = tl.where(finite, _exp(d * r, EXACT_EXP), 0.0)
    base = part_ptr + (i * SPLIT + c) * 4
    tl.store(base, m)
    tl.store(base + 1, tl.sum(e, axis=0))
    tl.store(base + 2, tl.sum(e * d, axis=0))
    tl.store(base + 3, tl.sum(scaled, axis=0))
    tl.store(cnt_ptr + (i * SPLIT + c) * 2, tl.sum(finite.to(tl.int32), axis=0))
    tl.store(cnt_ptr + (i * SPLIT + c) * 2 + 1, tl.sum(nan.to(tl.int32), axis=0))


@triton.jit
def _stats_merge_kernel(
    part_ptr,
    cnt_ptr,
    t_ptr,
    max_ptr,
    ent_ptr,
    fin_ptr,
    lse_ptr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    EXACT_EXP: tl.constexpr,
):
    """One program per row: the slices' sums rescaled to the row's maximum m,
    then max, entropy at T = 1 (log s - sum(e * d) / s), finite count and
    logsumexp(x / T) = m / T + log(sum exp((x - m) / T)); NaN entropy and
    logsumexp where m is not finite, m NaN where the row holds a NaN."""
    i = tl.program_id(0)
    progs = tl.arange(0, SPLIT_P2)
    ok = progs < SPLIT
    base = part_ptr + (i * SPLIT + progs) * 4
    mc = tl.load(base, mask=ok, other=float("-inf"))
    sc = tl.load(base + 1, mask=ok, other=0.0)
    dc = tl.load(base + 2, mask=ok, other=0.0)
    lc = tl.load(base + 3, mask=ok, other=0.0)
    finite = tl.sum(tl.load(cnt_ptr + (i * SPLIT + progs) * 2, mask=ok, other=0), axis=0)
    nans = tl.sum(tl.load(cnt_ptr + (i * SPLIT + progs) * 2 + 1, mask=ok, other=0), axis=0)
    m = tl.max(mc, axis=0)
    t = tl.load(t_ptr + i)
    has = sc > 0.0  # slices with a finite token
    shift = tl.where(has, mc - m, 0.0)
    w = tl.where(has, _exp(shift, EXACT_EXP), 0.0)
    s = tl.sum(sc * w, axis=0)
    dots = tl.sum(w * (dc + shift * sc), axis=0)
    scaled = tl.sum(lc * tl.where(has, _exp(shift * (1.0 / t), EXACT_EXP), 0.0), axis=0)
    entropy = tl.log(s) - dots / s
    lse = tl.div_rn(m, t) + tl.log(scaled)
    # (nested wheres: Triton's interpreter takes no | of scalar bools)
    bad = tl.where(nans > 0, 1, tl.where(m == float("inf"), 1, tl.where(m == float("-inf"), 1, 0)))
    nan = float("nan")
    tl.store(max_ptr + i, tl.where(nans > 0, nan, m))
    tl.store(ent_ptr + i, tl.where(bad > 0, nan, entropy))
    tl.store(lse_ptr + i, tl.where(bad > 0, nan, lse))
    tl.store(fin_ptr + i, finite.to(tl.int64))


def _split(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """Programs per row and ids per program: on a GPU, enough programs to fill
    it once in a wide pass (rounded down: a program over that count makes a
    second wave), but at least :data:`ROW_PROGRAMS` a row; at most
    :data:`MAX_SPLIT`. In Triton's interpreter (the tests), 128 programs
    shared by the rows."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        least = ROW_PROGRAMS
    else:
        sms, least = 8, 1
    split = max(least, min(MAX_SPLIT, sms * PROGRAMS_PER_SM // max(rows, 1)))
    chunk = -(-vocab // split)
    chunk = -(-chunk // BLOCK) * BLOCK
    return -(-vocab // chunk), chunk


class _Relauncher:
    """Launches one Triton kernel; after its first launch for a given
    specialisation, straight through the compiled kernel's own launcher.

    Triton binds and specialises every argument on every launch: 17-33 µs of
    host time per launch measured on an H100 host, nine launches a step, and
    up to batch ~64 the search is bound by the host. The key of the cache
    below holds everything that specialisation reads,
    so a hit launches exactly the kernel Triton would: the device, the grid,
    the compile-time constants, every integer argument's value and every
    tensor's dtype and address modulo 16. A first launch and the interpreter
    take Triton's own path; so does everything after any failure of the
    direct one."""

    #: distinct specialisations kept per kernel (batch sizes x passes)
    MAX_KEYS = 4096

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.compiled: dict[tuple[Any, ...], Any] = {}
        params = list(getattr(fn, "params", []))
        self.constexprs = [p.name for p in params if p.is_constexpr]
        n_args = len(params) - len(self.constexprs)
        # the launcher takes every parameter in order: constants must come last
        self.direct = not _INTERPRETED and all(p.is_constexpr for p in params[n_args:])

    def __call__(
        self, device: int, grid: tuple[int, ...], args: tuple[Any, ...], consts: dict[str, Any]
    ) -> None:
        """``fn[grid](*args, **consts)`` on the current ``device`` (an index)."""
        if not self.direct:
            self.fn[grid](*args, **consts)
            return
        key = (
            device,
            grid,
            *consts.values(),
            *(a if type(a) is int else (a.dtype, a.data_ptr() % 16) for a in args),
        )
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **consts)  # compiles on first use
            if kernel is not None and hasattr(kernel, "run") and hasattr(kernel, "function"):
                if len(self.compiled) >= self.MAX_KEYS:
                    self.compiled.clear()
                self.compiled[key] = kernel
            return
        values = (*args, *(consts[name] for name in self.constexprs))
        stream = _driver.active.get_current_stream(device)
        full = (grid[0], grid[1] if len(grid) > 1 else 1, 1)
        hooks = _hook_holder()
        try:  # the call Triton's own launch ends with, hooks included
            kernel.run(
                *full,
                stream,
                kernel.function,
                kernel.packed_metadata,
                kernel.launch_metadata(full, stream, *values),
                hooks.launch_enter_hook,
                hooks.launch_exit_hook,
                *values,
            )
        except Exception:  # another Triton's launcher: its own path from now on
            self.direct = False
            self.fn[grid](*args, **consts)


def _hook_holder() -> Any:
    """Where this Triton keeps its launch hooks: its knobs (3.4 and later), else
    the compiled-kernel class."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return runtime if runtime is not None else triton.compiler.CompiledKernel


_PASS = _Relauncher(_pass_kernel)
_FINAL = _Relauncher(_final_kernel)
_STATS = _Relauncher(_stats_kernel)
_STATS_MERGE = _Relauncher(_stats_merge_kernel)


class RadixSearch:
    """A search whose first pass is queued (:func:`radix_begin`): the kernel
    arguments and the scratch the later passes read. The first pass needs no u,
    so the pipeline queues it before the entropy arrives."""

    def __init__(
        self,
        args: tuple[Any, ...],
        shape: dict[str, Any],
        grid: tuple[int, int],
        schedule: tuple[int, ...],
    ) -> None:
        self.args = args  # every pass's arguments (the logits and the scratch among them)
        self.shape = shape  # the kernels' compile-time constants common to every launch
        self.grid = grid  # (rows, programs per row)
        self.schedule = schedule  # bits of the key decided by each pass
        self.compact = _compact_pass(schedule)  # the pass that writes its range's ids
        self.guessed = False  # whether the second pass was queued on a guess


def radix_begin(
    logits: torch.Tensor,
    rows: torch.Tensor,
    t: torch.Tensor,
    lse: torch.Tensor,
    max_logit: torch.Tensor,
    params: torch.Tensor,
    u_col: int,
    min_p_col: int,
    addr: torch.Tensor | None = None,
) -> RadixSearch | None:
    """Allocate the search's scratch and queue its first pass, which reads no u
    (None when ``rows`` is empty). ``t``, ``lse`` (logsumexp of logits / t) and
    ``max_logit`` are float32 per row; ``params`` is a float64 block holding
    u (read by the later passes: write it before :func:`radix_end`) and min-p
    in columns ``u_col`` and ``min_p_col``. ``addr``: a device int64 holding
    the address the kernels read the logits from (of ``logits``' dtype and
    strides, contiguous rows), in place of ``logits``' own."""
    n = rows.numel()
    if n == 0:
        return None
    logits = _contiguous_rows(logits, addr)
    vocab = logits.shape[1]
    device = logits.device
    split, chunk = _split(n, vocab, device)
    host_bound = _host_bound(n, logits)
    schedule = _schedule(host_bound)
    rounds = len(schedule)
    nbs = 1 << max(schedule)
    nb = 1 << schedule[-1]  # the last pass's buckets (single keys)
    part = torch.empty(rounds, n, split, nbs, dtype=torch.float64, device=device)
    above = torch.empty(rounds, n, dtype=torch.float64, device=device)
    pref = torch.empty(rounds + 1, n, dtype=torch.int64, device=device)  # + the guessed one
    cnt = torch.empty(n, split, nb, dtype=torch.int32, device=device)
    low = torch.empty(n, split, nb, dtype=torch.int32, device=device)
    acnt = torch.empty(n, split, dtype=torch.int32, device=device)
    kcnt = torch.empty(n, split, dtype=torch.int32, device=device)
    cap = max(1, chunk // COMPACT_SHARE)
    # ids are held as offsets in their program's slice: 16 bits where they fit
    short = chunk <= SHORT_IDS_MAX
    cid = torch.empty(n, split, cap, dtype=torch.int16 if short else torch.int32, device=device)
    ccnt = torch.empty(n, split, dtype=torch.int32, device=device)
    cover = torch.empty(n, split, dtype=torch.int32, device=device)
    t, lse, max_logit = (v.float().contiguous() for v in (t, lse, max_logit))
    common = (logits, logits.stride(0), vocab, rows, t, lse, max_logit, params, params.stride(0))
    scratch = (part, above, pref, cnt, low, acnt, kcnt, cid, ccnt, cover, n, chunk, cap)
    shape = {
        "ROUNDS": rounds,
        "BLOCK": BLOCK,
        "SPLIT": split,
        "SPLIT_P2": triton.next_power_of_2(split),
        "EXACT_EXP": not _INTERPRETED,
        "NBS": nbs,
        "INDIRECT": addr is not None,
        "num_warps": WARPS,
    }
    where = logits if addr is None else addr
    args = (*common, *scratch, u_col, min_p_col, where)
    search = RadixSearch(args, shape, (n, split), schedule)
    _launch_pass(search, 0)
    # the second pass on a guess (GUESS_SECOND) only where it is a wide pass
    # that writes no ids, and where its launch is cheap next to the work it
    # moves (not host-bound)
    if GUESS_SECOND and search.compact > 1 and not host_bound:
        _launch_pass(search, 1, phase=1)
        search.guessed = True
    return search


def _contiguous_rows(logits: torch.Tensor, addr: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with contiguous rows (a copy where they are not); logits read
    through an address (``addr``) must have them already."""
    if logits.stride(1) == 1:
        return logits
    if addr is not None:
        raise ValueError("logits read through an address must have contiguous rows")
    return logits.contiguous()


def _device_index() -> int:
    """The current device's index, as Triton's own launch reads it."""
    index: int = _driver.active.get_current_device() if not _INTERPRETED else 0
    return index


def _schedule(host_bound: bool) -> tuple[int, ...]:
    """:data:`SCHEDULE`, or :data:`FEW_PASSES` for a host-bound search; checked."""
    schedule = tuple(FEW_PASSES if host_bound else SCHEDULE)
    if sum(schedule) != 32 or not all(1 <= b <= 4 for b in schedule) or len(schedule) < 3:
        raise ValueError(
            f"radix schedule: 3 or more passes of 1 to 4 bits, 32 bits in all; got {schedule}"
        )
    return schedule


def _compact_pass(schedule: tuple[int, ...]) -> int:
    """The pass that writes its range's ids: the first with :data:`COMPACT_BITS`
    decided before it, and at the latest the one before the last."""
    decided = 0
    for r, bits in enumerate(schedule):
        if decided >= COMPACT_BITS:
            return min(r, len(schedule) - 2)
        decided += bits
    return len(schedule) - 2


def _host_bound(rows: int, logits: torch.Tensor) -> bool:
    """Whether a search is bound by its launches' host time: eager (not in a
    CUDA graph's capture) and under :data:`HOST_BOUND_ROWS` rows."""
    capturing = logits.is_cuda and torch.cuda.is_current_stream_capturing()
    return not capturing and rows < HOST_BOUND_ROWS


def _launch_pass(search: RadixSearch, r: int, phase: int = 0) -> None:
    schedule = search.schedule
    consts = {
        "R": r,
        "WIDE": search.compact + 1,  # the passes that read every token, per-lane sums
        "COMPACT": search.compact,
        "PHASE": phase,
        "BITS": schedule[r],
        "SHIFT": 32 - sum(schedule[: r + 1]),
        "PBITS": schedule[r - 1] if r else schedule[0],
    }
    consts.update(search.shape)
    _PASS(_device_index(), search.grid, search.args, consts)


def radix_end(search: RadixSearch, token_ids: torch.Tensor, out: torch.Tensor) -> None:
    """Queue the passes after the first and the final kernel: at each searched
    row, the token id into ``token_ids`` and (token, rank, probability,
    candidates, 1 = resolved) into the first five columns of the float64 block
    ``out``. No sync."""
    for r in range(1, search.shape["ROUNDS"]):
        _launch_pass(search, r, phase=2 if search.guessed and r == 1 else 0)
    args = search.args
    final_args = (*args[:-3], token_ids, out, out.stride(0), *args[-3:])
    consts = {"BITS": search.schedule[-1], **search.shape}
    _FINAL(_device_index(), (search.grid[0],), final_args, consts)


def select_radix_kernel(
    logits: torch.Tensor,
    params: SelectionParams,
    lse: torch.Tensor,
    max_logit: torch.Tensor,
) -> Selection:
    """:func:`~qr_sampler.sampling.select.select_radix` in one launch per pass of
    :data:`SCHEDULE`, and one more."""
    rows = logits.shape[0]
    device = logits.device
    block = torch.stack([params.u.double(), params.min_p.double()], dim=1).contiguous()
    token = torch.empty(rows, dtype=torch.int64, device=device)
    out = torch.empty(rows, 5, dtype=torch.float64, device=device)
    t = effective_temperature(params)
    search = radix_begin(logits, torch.arange(rows, device=device), t, lse, max_logit, block, 0, 1)
    if search is not None:
        radix_end(search, token, out)
    return Selection(
        token_ids=token,
        rank=out[:, 1].long(),
        prob=out[:, 2],
        num_candidates=out[:, 3].long(),
    )


def row_stats_kernel(
    logits: torch.Tensor, t: torch.Tensor, addr: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~qr_sampler.sampling.select.row_stats` with per-row temperatures
    ``t`` in two launches: each row's max, entropy at T = 1, finite count and
    logsumexp(logits / T), read once (rows of slices of :data:`STATS_CHUNK`
    ids, then one program per row rescales the slices' sums to the row's
    maximum). Equal to the torch statistics within float32 rounding (the sums'
    order differs); the same in every run and every CUDA graph replay.
    ``addr``: as for :func:`radix_begin`."""
    logits = _contiguous_rows(logits, addr)
    n, vocab = logits.shape
    device = logits.device
    split = max(1, -(-vocab // STATS_CHUNK))
    part = torch.empty(n, split, 4, dtype=torch.float32, device=device)
    cnt = torch.empty(n, split, 2, dtype=torch.int32, device=device)
    t = t.float().contiguous()
    m = torch.empty(n, dtype=torch.float32, device=device)
    entropy = torch.empty_like(m)
    lse = torch.empty_like(m)
    finite = torch.empty(n, dtype=torch.int64, device=device)
    if n == 0:
        return m, entropy, finite, lse
    exact = not _INTERPRETED
    index = _device_index()
    consts = {"SPLIT": split, "CHUNK": STATS_CHUNK, "EXACT_EXP": exact, "num_warps": STATS_WARPS}
    consts["INDIRECT"] = addr is not None
    where = logits if addr is None else addr
    _STATS(index, (n, split), (logits, logits.stride(0), vocab, t, part, cnt, where), consts)
    merge = {"SPLIT": split, "SPLIT_P2": triton.next_power_of_2(split), "EXACT_EXP": exact}
    _STATS_MERGE(index, (n,), (part, cnt, t, m, entropy, finite, lse), {**merge, "num_warps": 1})
    return m, entropy, finite, lse
