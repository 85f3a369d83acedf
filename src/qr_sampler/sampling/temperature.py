"""Temperature strategies, batched: ``fixed`` and entropy-dependent ``edt``.

EDT: H is the Shannon entropy (nats) of softmax(logits) at temperature 1,
T = base * (H / ln V) ** exponent, clamped to [min, max].
"""

from __future__ import annotations

import math

import torch


def shannon_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per row, float32; -inf entries contribute 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.nan_to_num(logp, neginf=0.0)).sum(dim=-1)


def edt_temperature(
    entropy: torch.Tensor,
    vocab_size: int,
    base: torch.Tensor,
    exponent: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
) -> torch.Tensor:
    """T = base * (H / ln V) ** exponent, clamped to [t_min, t_max]."""
    h_norm = (entropy / math.log(max(vocab_size, 2))).clamp(0.0, 1.0)
    t = base * h_norm.pow(exponent)
    return torch.minimum(torch.maximum(t, t_min), t_max)


def temperatures(
    logits: torch.Tensor,
    is_edt: torch.Tensor,
    fixed: torch.Tensor,
    base: torch.Tensor,
    exponent: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperature and the entropy it was derived from (computed if needed)."""
    if entropy is None:
        entropy = shannon_entropy(logits)
    t_edt = edt_temperature(entropy, logits.shape[-1], base, exponent, t_min, t_max)
    return torch.where(is_edt, t_edt, fixed), entropy
