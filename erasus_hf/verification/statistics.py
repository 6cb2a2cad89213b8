"""The statistics of the verifier: TPR at a low FPR, a seeded stratified bootstrap, two-sample tests, Clopper-Pearson
intervals and the empirical epsilon lower bound of a membership test.

The epsilon bound is the hypothesis-testing characterisation of differential privacy (Kairouz, Oh, Viswanath 2015,
"The composition theorem for differential privacy", ICML; used to audit DP training by Jagielski, Ullman, Oprea
2020, "Auditing differentially private machine learning: how private is private SGD?", NeurIPS, and Nasr, Song,
Thakurta, Papernot, Carlini 2021, "Adversary instantiation: lower bounds for differentially private machine
learning", IEEE S&P): any test of "member" against "non-member" run on an (epsilon, delta)-DP mechanism satisfies

    TPR <= e^epsilon FPR + delta    and    1 - FPR <= e^epsilon (1 - TPR) + delta,

so an attack with a measured (TPR, FPR) proves

    epsilon >= max( ln((TPR - delta) / FPR), ln((1 - delta - FPR) / (1 - TPR)) ).

Measured rates are estimates: the bound reported (`epsilon_lower_bound`) takes the one-sided Clopper-Pearson lower
bound of the TPR and upper bound of the FPR, each at alpha / 2 (divided again by the number of thresholds tried,
a union bound), so it holds with probability at least 1 - alpha. It is a lower bound: 0 means no evidence of
privacy loss, never a proof that epsilon is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05
"""The default significance level of every verdict."""

BOOTSTRAP_METHOD = "percentile bootstrap, each sample resampled separately (rows of a 2-D sample resampled together)"


def check_alpha(alpha: float, what: str = "alpha") -> None:
    """Refuse a significance level outside (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"{what} is a significance level in (0, 1) (e.g. 0.05), got {alpha!r}")


def _scores(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{what} must be a non-empty list of numbers, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds non-finite values.")
    return array


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float) -> dict[str, float]:
    """The true-positive rate of the threshold test "member if score > t" at false-positive rate at most `fpr`, t
    read off the non-member scores (higher = member).

    With n non-members, k = floor(fpr * n) false positives are allowed: t is the (k + 1)-th largest non-member score,
    so at most k non-members score above it (ties at t count as negatives). Returns ``{"tpr", "fpr"}`` (the FPR the
    threshold reaches, <= `fpr`), ``"threshold"``, ``"target_fpr"`` and ``"resolution"`` = 1 / n, the smallest
    non-zero FPR these rows can measure: below it the value is the TPR at FPR 0 (members above every non-member)."""
    members = _scores(member_scores, "member_scores")
    nonmembers = _scores(nonmember_scores, "nonmember_scores")
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}")
    allowed = math.floor(fpr * len(nonmembers) + 1e-9)
    threshold = float(np.sort(nonmembers)[::-1][allowed])
    return {
        "tpr": float(np.mean(members > threshold)),
        "fpr": float(np.mean(nonmembers > threshold)),
        "threshold": threshold,
        "target_fpr": float(fpr),
        "resolution": 1.0 / len(nonmembers),
    }


def stratified_bootstrap(
    statistic: Callable[..., float],
    samples: Sequence[Sequence[float] | np.ndarray],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """(low, high): the `level` percentile-bootstrap interval of `statistic(*samples)`.

    Each resample draws, for every sample in turn, ``len(sample)`` row indices with replacement from
    ``numpy.random.default_rng(seed)`` (``rng.integers(0, n, n)``) and evaluates the statistic on the resampled
    samples; a 2-D sample (rows x columns, e.g. the same rows scored by two models) keeps each row's columns
    together. The interval is ``numpy.percentile`` (linear interpolation) of the resampled values at
    ``100 (1 - level) / 2`` and ``100 (1 + level) / 2``. Members and non-members resampled separately keep both
    classes in every resample, as an AUC or a TPR needs."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    arrays = [np.asarray(s, dtype=float) for s in samples]
    if any(len(a) == 0 for a in arrays):
        raise ValueError("Every bootstrap sample needs at least one row.")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        values.append(float(statistic(*(a[rng.integers(0, len(a), len(a))] for a in arrays))))
    low, high = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def interval(low: float, high: float | None, level: float, method: str, **extra: Any) -> dict[str, Any]:
    """An interval entry of a check: ``{"low", "high", "level", "method", ...}``; `high` None for a one-sided
    (lower) bound."""
    return {
        "low": float(low),
        "high": None if high is None else float(high),
        "level": float(level),
        "method": method,
        **extra,
    }


def two_sample_tests(first: Sequence[float], second: Sequence[float]) -> dict[str, dict[str, float]]:
    """Two-sided two-sample tests of `first` against `second` (scipy): ``{"ks": {"statistic", "p_value"},
    "mann_whitney": {"statistic" (U of `first`), "p_value", "auc" (U / (m n): the probability that a score of
    `first` exceeds one of `second`, ties one half)}}``. Kolmogorov-Smirnov: any difference of the distributions;
    Mann-Whitney: a shift of one above the other."""
    a, b = _scores(first, "first"), _scores(second, "second")
    ks = stats.ks_2samp(a, b, alternative="two-sided")
    mw = stats.mannwhitneyu(a, b, alternative="two-sided")
    return {
        "ks": {"statistic": float(ks.statistic), "p_value": float(ks.pvalue)},
        "mann_whitney": {
            "statistic": float(mw.statistic),
            "p_value": float(mw.pvalue),
            "auc": float(mw.statistic) / (len(a) * len(b)),
        },
    }


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound of a binomial rate: the p at which P(X >= successes) =
    alpha, ``Beta(alpha; x, n - x + 1)``; 0 for no success. (All successes: alpha^(1/n).)"""
    _check_counts(successes, trials)
    return 0.0 if successes == 0 else float(stats.beta.ppf(alpha, successes, trials - successes + 1))


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson upper bound: ``Beta(1 - alpha; x + 1, n - x)``; 1 for all successes.
    (No success: 1 - alpha^(1/n).)"""
    _check_counts(successes, trials)
    return 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha, successes + 1, trials - successes))


def _check_counts(successes: int, trials: int) -> None:
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"Need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}.")


def epsilon_from_rates(tpr: float, fpr: float, delta: float = 0.0) -> float:
    """The epsilon that rates (TPR, FPR) force on an (epsilon, delta)-DP mechanism (module doc), at least 0;
    ``math.inf`` when a rate in a denominator is 0 and its numerator positive."""

    def log_ratio(numerator: float, denominator: float) -> float:
        if numerator <= 0:
            return 0.0
        return math.inf if denominator <= 0 else math.log(numerator / denominator)

    return max(0.0, log_ratio(tpr - delta, fpr), log_ratio(1 - delta - fpr, 1 - tpr))


def epsilon_lower_bound(
    true_positives: int,
    members: int,
    false_positives: int,
    nonmembers: int,
    delta: float = 0.0,
    alpha: float = ALPHA,
    comparisons: int = 1,
) -> dict[str, Any]:
    """The empirical epsilon of a membership test that flagged `true_positives` of `members` and `false_positives` of
    `nonmembers` (module doc): ``{"epsilon_lower": the bound holding with probability >= 1 - alpha, "epsilon_point":
    the bound of the measured rates (None when infinite: no false positive, or no false negative), "tpr", "fpr",
    "tpr_lower", "fpr_upper", "confidence": 1 - alpha, "delta"}``.

    `comparisons`: how many thresholds (or attacks) the caller tried and keeps the best of; each Clopper-Pearson bound
    is then taken at alpha / (2 comparisons), so that the best one still holds at 1 - alpha (a union bound)."""
    check_alpha(alpha)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    each = alpha / (2 * comparisons)
    tpr_lower = clopper_pearson_lower(true_positives, members, each)
    fpr_upper = clopper_pearson_upper(false_positives, nonmembers, each)
    point = epsilon_from_rates(true_positives / members, false_positives / nonmembers, delta)
    return {
        "epsilon_lower": epsilon_from_rates(tpr_lower, fpr_upper, delta),
        "epsilon_point": None if math.isinf(point) else point,
        "tpr": true_positives / members,
        "fpr": false_positives / nonmembers,
        "tpr_lower": tpr_lower,
        "fpr_upper": fpr_upper,
        "confidence": 1 - alpha,
        "delta": delta,
        "comparisons": comparisons,
    }


def binomial_excess_p_value(flagged: int, trials: int, rate: float) -> float:
    """P(X >= flagged) for X ~ Binomial(trials, rate): how surprising `flagged` positives are if each of `trials`
    independent tests has false-positive rate `rate` (one-sided)."""
    _check_counts(flagged, trials)
    return float(stats.binom.sf(flagged - 1, trials, rate))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order: reject every hypothesis whose adjusted
    p-value is <= alpha and the family-wise error rate is at most alpha."""
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted
