"""The radix search of :func:`qr_sampler.sampling.select.select_radix` as one
Triton kernel: one program per row, every pass over the row inside it.

Same algorithm, same float operations (x = logits / T with correctly rounded
division, p = exp(x - lse) in float32, kept mass summed in float64), one launch
and no host sync:

* passes 1 to 32 / BITS: accumulate, for the 2**BITS edges of the current key
  range, the kept mass at or above each edge (float64); keep the last edge
  whose mass exceeds U = u * Z. Pass 1's first edge is key 0, so it also gives
  Z and the candidate count.
* the last pass's buckets are single keys: it also counts tokens at or above
  each edge and the smallest token id at each key, so the tied tokens' count,
  the mass above v* and the first tied id come out of it; p* is recomputed from
  v* itself (exact).
* only when u falls past the first of several tied tokens, one more pass
  locates the j-th of them by a running count (rare: exact ties at v*).

Imported only where Triton and a GPU exist (and by the tests, through Triton's
CPU interpreter).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from qr_sampler.sampling.select import Selection, SelectionParams, effective_temperature

#: bits of the key decided per pass (32 must be a multiple)
BITS = 4
#: token ids per loop iteration of a pass
BLOCK = 128

_SIGN: Any = tl.constexpr(2147483648)  # 2**31
_FLT_MAX: Any = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _scaled_keyed(row_ptr, offs, vocab, t, lse, floor):
    inside = offs < vocab
    x = tl.load(row_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32)
    x = tl.div_rn(x, t)
    x = tl.where(x != x, float("-inf"), x)  # NaN -> -inf (as nan_to_num)
    x = tl.where(x == float("inf"), _FLT_MAX, x)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: one key for equal values
    p = tl.exp(x - lse).to(tl.float64)
    keep = inside & (p > 0.0) & (p >= floor)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + _SIGN
    return key, tl.where(keep, p, 0.0), keep


@triton.jit
def _radix_kernel(
    logits_ptr,
    stride,
    vocab,
    rows_ptr,
    t_ptr,
    lse_ptr,
    max_ptr,
    params_ptr,
    params_stride,
    token_ptr,
    out_ptr,
    out_stride,
    U_COL: tl.constexpr,
    MINP_COL: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.load(rows_ptr + tl.program_id(0))
    row_ptr = logits_ptr + row * stride
    t = tl.load(t_ptr + row)
    lse = tl.load(lse_ptr + row)
    p_max = tl.exp(tl.div_rn(tl.load(max_ptr + row), t) - lse).to(tl.float64)
    floor = tl.load(params_ptr + row * params_stride + MINP_COL) * p_max
    u = tl.load(params_ptr + row * params_stride + U_COL)
    NB: tl.constexpr = 1 << BITS
    ROUNDS: tl.constexpr = 32 // BITS
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, NB).to(tl.int64)
    prefix = tl.zeros([1], dtype=tl.int64)
    total = tl.zeros([1], dtype=tl.float64)
    target = tl.zeros([1], dtype=tl.float64)
    n_cand = tl.zeros([1], dtype=tl.int64)
    star = tl.zeros([1], dtype=tl.int64)
    n_over = tl.zeros([1], dtype=tl.int64)
    n_tied = tl.zeros([1], dtype=tl.int64)
    first = tl.zeros([1], dtype=tl.int64)
    for r in tl.static_range(ROUNDS):
        shift = 32 - BITS * (r + 1)
        edges = prefix + (bins << shift)  # [NB]
        top = prefix + (NB << shift)  # [1]
        mass = tl.zeros([NB, BLOCK], dtype=tl.float64)
        count = tl.zeros([NB, BLOCK], dtype=tl.int32)
        low_id = tl.full([NB, BLOCK], 2147483647, dtype=tl.int32)
        above = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            key, w, keep = _scaled_keyed(row_ptr, offs, vocab, t, lse, floor)
            ge = key[None, :] >= edges[:, None]
            mass += tl.where(ge, w[None, :], 0.0)
            if r == ROUNDS - 1:
                count += (ge & keep[None, :]).to(tl.int32)
                at = (key[None, :] == edges[:, None]) & keep[None, :]
                low_id = tl.minimum(low_id, tl.where(at, offs[None, :], 2147483647))
                above += (keep & (key >= top)).to(tl.int32)
            if r == 0:
                above += keep.to(tl.int32)
        g = tl.sum(mass, axis=1)  # [NB] kept mass at or above each edge
        if r == 0:
            total = tl.sum(tl.where(bins == 0, g, 0.0), axis=0) + total
            target = u * total
            n_cand = tl.sum(above, axis=0).to(tl.int64) + n_cand
        pick = tl.sum((g > target) & (bins > 0), axis=0).to(tl.int64)  # edges past the first
        prefix = prefix + (pick << shift)
        if r == ROUNDS - 1:
            c = tl.sum(count, axis=1).to(tl.int64)  # [NB] kept tokens at or above each edge
            n_top = tl.sum(above, axis=0).to(tl.int64)
            c_at = tl.sum(tl.where(bins == pick, c, 0), axis=0)
            c_next = tl.sum(tl.where(bins == pick + 1, c, 0), axis=0)
            c_next = tl.where(pick == NB - 1, n_top, c_next)
            star = prefix
            n_over = c_next
            n_tied = c_at - c_next
            low = tl.sum(tl.where(bins == pick, tl.min(low_id, axis=1), 0), axis=0)
            first = tl.zeros([1], dtype=tl.int64) + low.to(tl.int64)
            mass_next = tl.sum(tl.where(bins == pick + 1, g, 0.0), axis=0)
    # the mass above v*: for the last bin, recomputed (keys above the range)
    over_mass = tl.zeros([1], dtype=tl.float64)
    need_top = pick == NB - 1
    # v* itself and its probability, exactly as each token's p
    bits_star = star - _SIGN
    bits_star = tl.where(bits_star < 0, bits_star ^ 0x7FFFFFFF, bits_star)
    x_star = bits_star.to(tl.int32).to(tl.float32, bitcast=True)
    p_star = tl.exp(x_star - lse).to(tl.float64)
    if need_top:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            key, w, keep = _scaled_keyed(row_ptr, offs, vocab, t, lse, floor)
            acc += tl.where(key > star, w, 0.0)
        over_mass = tl.sum(acc, axis=0) + over_mass
    else:
        over_mass = mass_next + over_mass
    j = tl.floor((target - over_mass) / p_star).to(tl.int64)
    j = tl.minimum(tl.maximum(j, 0), tl.maximum(n_tied - 1, 0))
    token = first
    if tl.sum(j, axis=0) > 0:  # past the first of several tied tokens: count them in id order
        seen = tl.zeros([1], dtype=tl.int64)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            key, w, keep = _scaled_keyed(row_ptr, offs, vocab, t, lse, floor)
            tied = (keep & (key == star)).to(tl.int64)
            run = tl.cumsum(tied, axis=0)
            here = tl.sum(tied, axis=0)
            pos = tl.sum((run <= (j - seen)).to(tl.int64), axis=0)
            hit = (seen <= j) & (j < seen + here)
            token = tl.where(hit, start + pos, token)
            seen += here
    one = tl.arange(0, 1)
    tl.store(token_ptr + row + one, token)
    block = out_ptr + row * out_stride + one
    tl.store(block, token.to(tl.float64))
    tl.store(block + 1, (n_over + j).to(tl.float64))
    tl.store(block + 2, p_star / total)
    tl.store(block + 3, n_cand.to(tl.float64))
    tl.store(block + 4, tl.full([1], 1.0, dtype=tl.float64))


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
    block holding u and min-p in columns ``u_col`` and ``min_p_col``. One launch."""
    if rows.numel() == 0:
        return
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    _radix_kernel[(rows.numel(),)](
        logits,
        logits.stride(0),
        logits.shape[1],
        rows,
        t.float().contiguous(),
        lse.float().contiguous(),
        max_logit.float().contiguous(),
        params,
        params.stride(0),
        token_ids,
        out,
        out.stride(0),
        U_COL=u_col,
        MINP_COL=min_p_col,
        BITS=BITS,
        BLOCK=BLOCK,
    )


def select_radix_kernel(
    logits: torch.Tensor,
    params: SelectionParams,
    lse: torch.Tensor,
    max_logit: torch.Tensor,
) -> Selection:
    """:func:`~qr_sampler.sampling.select.select_radix` in one kernel launch."""
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
