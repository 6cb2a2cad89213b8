"""Membership-inference scores (higher = more likely a member) and their AUC.

Every score is a function of one example's teacher-forced `TokenStats` (see `scoring.py`), so a batched pass serves
every attack at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sklearn.metrics import roc_auc_score

from .scoring import TokenStats


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members (label 1) from non-members (label 0) by score, higher = member
    (scikit-learn). 0.5 = indistinguishable."""
    if not member_scores or not nonmember_scores:
        raise ValueError("An AUC needs at least one member and one non-member.")
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(nonmember_scores)))


def min_k_score(stats: TokenStats, k: float = 0.4) -> float:
    """Min-K% Prob (Shi et al. 2024, arXiv:2310.16789): the mean of the lowest k fraction of the token
    log-probs (at least one token)."""
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")
    n = max(1, int(len(stats.logprobs) * k))
    return torch.topk(stats.logprobs, n, largest=False).values.mean().item()


def min_k_plus_plus_score(stats: TokenStats, k: float = 0.4) -> float:
    """Min-K%++ (Zhang et al. 2024, arXiv:2404.02936): token scores (log p(y_t) - mu_t) / sigma_t, mu_t and sigma_t
    the mean and standard deviation of log p(z) for z drawn from the model's own next-token distribution; the mean
    of the lowest k fraction."""
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")
    token_scores = (stats.logprobs - stats.mean) / stats.std.clamp_min(1e-8)
    n = max(1, int(len(token_scores) * k))
    return torch.topk(token_scores, n, largest=False).values.mean().item()
