"""A slow, row-by-row reference for token selection, written from the documented
semantics only (not from the implementation), in numpy float64.

For one row: temperature (T = 0: greedy, i.e. T = 1 and top-k = 1) -> top-k
(ties: lower token id first) -> softmax -> min-p (keep p >= min_p * max p) ->
renormalise -> top-p (the shortest rank-ordered prefix whose mass reaches top_p;
the token that crosses is kept) -> renormalise -> cumulative -> the first rank
whose cumulative probability exceeds u. Tokens whose logit is -inf are never
candidates.

The implementation computes in float32 where the reference uses float64, so a
row is *fragile* when a decision lies within ``tol`` of a threshold (u near a
CDF boundary, a prefix mass near top_p, a probability ratio near min_p); tests
skip fragile rows explicitly and count them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from qr_sampler.sampling.select import SelectionParams

#: probabilities below this may underflow to 0 in float32: such tokens may or may
#: not be counted as candidates by the implementation (they can never be chosen)
TINY = 1e-30


@dataclass(frozen=True)
class RefResult:
    token: int
    rank: int
    prob: float
    #: tokens kept after all truncations
    n_cand: int
    #: of those, tokens whose probability is clearly representable in float32
    n_cand_solid: int
    #: ids of the kept tokens, in rank order
    kept: tuple[int, ...]
    #: final probabilities of the kept tokens, in rank order
    probs: tuple[float, ...]
    fragile: bool


def tolerance(logits: np.ndarray, temperature: float) -> float:
    """How far from a threshold a decision must be to survive float32 rounding."""
    t = 1.0 if temperature <= 0 else temperature
    finite = logits[np.isfinite(logits)]
    max_abs = float(np.max(np.abs(finite))) / t if finite.size else 0.0
    return 1e-6 + 4e-7 * max_abs


def ref_select(
    logits: np.ndarray,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    u: float,
    tol: float | None = None,
) -> RefResult:
    """Select one token from one row of logits (1-D) by the documented rules."""
    logits = np.asarray(logits, dtype=np.float64)
    if tol is None:
        tol = tolerance(logits, temperature)
    vocab = logits.shape[0]
    if temperature <= 0:
        t, k = 1.0, 1
    else:
        t, k = float(temperature), int(top_k)
    x = [float(v) / t for v in logits]
    order = sorted(range(vocab), key=lambda i: (-x[i], i))
    kk = k if 0 < k < vocab else vocab
    cand = [i for i in order[:kk] if x[i] != -math.inf]
    if not cand:
        raise ValueError("row has no finite logit")
    top = x[cand[0]]
    w = [math.exp(x[i] - top) for i in cand]
    total = math.fsum(w)
    p = [v / total for v in w]
    fragile = False

    # min-p
    keep = []
    for j, pj in enumerate(p):
        ratio = pj / p[0]
        if min_p > 0 and abs(ratio - min_p) <= tol * max(1.0, min_p):
            fragile = True
        if pj >= min_p * p[0]:
            keep.append(j)
    mass = math.fsum(p[j] for j in keep)
    q = [p[j] / mass for j in keep]
    ids = [cand[j] for j in keep]

    # top-p: include a token while the mass before it is below top_p
    n = len(q)
    if top_p < 1.0:
        before = 0.0
        n = 0
        for qj in q:
            if abs(before - top_p) <= tol:
                fragile = True
            if before >= top_p:
                break
            before += qj
            n += 1
    mass = math.fsum(q[:n])
    r = [v / mass for v in q[:n]]
    ids = ids[:n]

    # pick: first rank whose cumulative probability exceeds u
    cum = 0.0
    pick = n - 1
    for j, rj in enumerate(r):
        cum += rj
        if j < n - 1 and abs(cum - u) <= tol:
            fragile = True
        if cum > u:
            pick = j
            break
    solid = sum(1 for v in r if v > TINY)
    return RefResult(
        token=ids[pick],
        rank=pick,
        prob=r[pick],
        n_cand=n,
        n_cand_solid=solid,
        kept=tuple(ids),
        probs=tuple(r),
        fragile=fragile,
    )


@dataclass(frozen=True)
class RowSettings:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    u: float


def make_params(rows: list[RowSettings], device: str = "cpu") -> SelectionParams:
    """Per-row settings as the tensors the selector takes (dtypes as the pipeline uses)."""
    return SelectionParams(
        temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device),
        top_k=torch.tensor([r.top_k for r in rows], dtype=torch.int64, device=device),
        top_p=torch.tensor([r.top_p for r in rows], dtype=torch.float64, device=device),
        min_p=torch.tensor([r.min_p for r in rows], dtype=torch.float64, device=device),
        u=torch.tensor([r.u for r in rows], dtype=torch.float64, device=device),
    )


def f32(value: float) -> float:
    """The float32 value a float becomes in a float32 tensor."""
    return float(np.float32(value))


def grid_logits(
    rng: np.random.Generator,
    rows: int,
    vocab: int,
    *,
    spread: float = 8.0,
    inf_fraction: float = 0.0,
    ties: bool = False,
) -> np.ndarray:
    """Random float32 logits on a 1/64 grid (exact in float32, so the reference and
    the implementation see identical values and no near-ties), optionally with
    many exact ties and some -inf entries (at least one finite entry per row)."""
    if ties:
        out = rng.integers(-3, 4, size=(rows, vocab)).astype(np.float32)
    else:
        half = int(spread * 64)
        out = (rng.integers(-half, half + 1, size=(rows, vocab)) / 64.0).astype(np.float32)
    if inf_fraction > 0:
        mask = rng.random((rows, vocab)) < inf_fraction
        keep = rng.integers(0, vocab, size=rows)
        mask[np.arange(rows), keep] = False
        out[mask] = -np.inf
    return out
