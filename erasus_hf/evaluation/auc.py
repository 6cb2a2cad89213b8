"""AUCs of telling members from non-members by a membership score, with their confidence intervals.

Too little data. An empty side is refused (an AUC needs a member and a non-member); fewer than `MIN_ROWS_PER_SIDE`
rows on a side draw a warning (with one row a side every AUC is 0, 0.5 or 1 whatever the model). Every AUC comes with a
95% confidence interval (`auc_interval`): the percentile bootstrap of `scipy.stats.bootstrap`, 1000 resamples,
seeded, members and non-members resampled separately (a stratified bootstrap, so that every resample holds both
classes, as an AUC needs). The MIA evaluator and MUSE's PrivLeak report their AUCs this way.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import bootstrap, rankdata
from sklearn.metrics import roc_auc_score

MIN_ROWS_PER_SIDE = 20
"""Fewer rows than this on the member or the non-member side draw a warning: the AUC moves in steps of
1 / (members x non-members) and its confidence interval spans much of [0, 1] (with 20 a side, a model that cannot
tell the sides apart still gives an interval about 0.35 wide)."""

BOOTSTRAP_RESAMPLES = 1000
CI_LEVEL = 0.95
CI_METHOD = "percentile bootstrap (scipy.stats.bootstrap), members and non-members resampled separately"


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members (label 1) from non-members (label 0) by score, higher = member
    (scikit-learn). 0.5 = indistinguishable."""
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise ValueError(
            f"An AUC needs at least one member and one non-member; got {len(member_scores)} member and "
            f"{len(nonmember_scores)} non-member scores."
        )
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(nonmember_scores)))


def _rank_auc(members: np.ndarray, nonmembers: np.ndarray, axis: int = -1) -> np.ndarray:
    """The AUC along `axis` of batched samples, by the Mann-Whitney rank sum (ties count one half, as
    `roc_auc_score`): ``(R_members - m (m + 1) / 2) / (m n)``. Vectorised for `scipy.stats.bootstrap`."""
    members, nonmembers = np.moveaxis(members, axis, -1), np.moveaxis(nonmembers, axis, -1)
    m, n = members.shape[-1], nonmembers.shape[-1]
    batch = np.broadcast_shapes(members.shape[:-1], nonmembers.shape[:-1])
    both = [np.broadcast_to(members, (*batch, m)), np.broadcast_to(nonmembers, (*batch, n))]
    ranks = rankdata(np.concatenate(both, axis=-1), axis=-1)
    return (ranks[..., :m].sum(-1) - m * (m + 1) / 2) / (m * n)


def auc_interval(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """(low, high): the `level` confidence interval of `auc`, by the percentile bootstrap of
    `scipy.stats.bootstrap` with `resamples` resamples and the generator seeded with `seed`, members and non-members
    resampled separately (`paired=False`: every resample keeps both sides' sizes, so both classes are present).

    A side with a single row cannot be resampled (scipy needs two); the interval is then the whole (0.0, 1.0): one
    row says nothing about how the AUC would vary."""
    members, nonmembers = np.asarray(member_scores, dtype=float), np.asarray(nonmember_scores, dtype=float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("An AUC interval needs at least one member and one non-member.")
    if len(members) < 2 or len(nonmembers) < 2:
        return 0.0, 1.0
    result = bootstrap(
        (members, nonmembers),
        _rank_auc,
        n_resamples=resamples,
        batch=100,
        vectorized=True,
        paired=False,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def interval_entry(low: float, high: float, resamples: int, seed: int, level: float = CI_LEVEL) -> dict[str, Any]:
    """An `EvaluationResult.intervals` entry."""
    return {"low": low, "high": high, "level": level, "method": CI_METHOD, "resamples": resamples, "seed": seed}


def warn_few_rows(counts: Mapping[str, int], what: str) -> None:
    """Warn when a side of `counts` (side name -> rows) has fewer than `MIN_ROWS_PER_SIDE` rows."""
    few = {side: n for side, n in counts.items() if n < MIN_ROWS_PER_SIDE}
    if few:
        listed = ", ".join(f"{n} {side} row{'s' if n != 1 else ''}" for side, n in few.items())
        warnings.warn(
            f"{what}: only {listed} (fewer than {MIN_ROWS_PER_SIDE} a side): the AUC moves in coarse steps (with "
            "one row a side it is 0, 0.5 or 1 whatever the model) and its confidence interval (result.intervals) "
            "is wide; evaluate more rows.",
            UserWarning,
            stacklevel=3,
        )
