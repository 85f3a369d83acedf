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
therefore orders only a head of ``head_size`` tokens (``torch.topk``) and
resolves every row it can there; rows whose answer lies beyond the head are
recomputed with a full sort (:func:`select_sorted`, the reference). The result
is identical except when u lies within float rounding of a CDF boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def scale_logits(logits: torch.Tensor, params: SelectionParams) -> tuple[torch.Tensor, torch.Tensor]:
    """x = logits / T as float32 (greedy rows use T = 1), and the effective top_k."""
    greedy = params.temperature <= 0
    t = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    x = logits.float() / t.float().unsqueeze(1)
    x = torch.nan_to_num(x, nan=float("-inf"))
    top_k = torch.where(greedy, torch.ones_like(params.top_k), params.top_k)
    return x, top_k


def _select_window(
    vals: torch.Tensor,
    idx: torch.Tensor,
    lse_full: torch.Tensor,
    num_finite: torch.Tensor,
    vocab: int,
    top_k: torch.Tensor,
    params: SelectionParams,
) -> tuple[Selection, torch.Tensor]:
    """Select inside a rank-ordered window (the head, or the whole sorted row).

    Returns the selection and a mask of rows whose answer is exact from this
    window alone.
    """
    rows, width = vals.shape
    pos = torch.arange(width, device=vals.device)
    kk = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    in_k = pos.unsqueeze(0) < kk.unsqueeze(1)
    masked = vals.masked_fill(~in_k, float("-inf"))
    k_in_window = kk <= width
    lse = torch.where(k_in_window, torch.logsumexp(masked, dim=-1), lse_full)
    p = torch.exp(masked - lse.unsqueeze(1)).double()

    # min-p (a prefix, since p is in descending order)
    min_p = params.min_p.double().unsqueeze(1)
    keep = in_k & (p >= min_p * p[:, :1])
    minp_ends_inside = k_in_window | ~keep[:, -1]
    z_m = torch.where(minp_ends_inside, (p * keep).sum(-1), torch.ones_like(lse_full, dtype=p.dtype))
    q = p * keep / z_m.unsqueeze(1)

    # top-p on the renormalised prefix
    cum = torch.cumsum(q, dim=-1)
    top_p = params.top_p.double()
    top_p_on = (top_p < 1.0).unsqueeze(1)
    keep = keep & (~top_p_on | ((cum - q) < top_p.unsqueeze(1)))
    n_keep = keep.sum(-1)
    complete = (n_keep < width) | k_in_window
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
    lse_full = torch.logsumexp(x, dim=-1)
    num_finite = torch.isfinite(x).sum(-1)
    return _select_window(vals, idx, lse_full, num_finite, vocab, top_k, params)


def _take(params: SelectionParams, rows: torch.Tensor) -> SelectionParams:
    return SelectionParams(
        temperature=params.temperature.index_select(0, rows),
        top_k=params.top_k.index_select(0, rows),
        top_p=params.top_p.index_select(0, rows),
        min_p=params.min_p.index_select(0, rows),
        u=params.u.index_select(0, rows),
    )


def select(
    logits: torch.Tensor, params: SelectionParams, head_size: int = DEFAULT_HEAD
) -> Selection:
    """Select one token per row; head fast path, full sort only for unresolved rows.

    One host sync to learn whether any row needs the full sort; a second one
    (small) only when some does.
    """
    sel, resolved = select_head(logits, params, head_size)
    if head_size >= logits.shape[-1] or bool(resolved.all()):
        return sel
    rows = torch.nonzero(~resolved).squeeze(1)
    sub = select_sorted(logits.index_select(0, rows), _take(params, rows))
    return Selection(
        token_ids=sel.token_ids.index_copy(0, rows, sub.token_ids),
        rank=sel.rank.index_copy(0, rows, sub.rank),
        prob=sel.prob.index_copy(0, rows, sub.prob),
        num_candidates=sel.num_candidates.index_copy(0, rows, sub.num_candidates),
    )


def force_tokens(logits: torch.Tensor, rows: torch.Tensor | None, token_ids: torch.Tensor) -> None:
    """In place: 0 at each chosen token, -inf elsewhere, for the given rows (all if None)."""
    if rows is None:
        logits.fill_(float("-inf"))
        logits.scatter_(1, token_ids.unsqueeze(1), 0.0)
        return
    logits.index_fill_(0, rows, float("-inf"))
    logits.index_put_((rows, token_ids), torch.zeros_like(token_ids, dtype=logits.dtype))
