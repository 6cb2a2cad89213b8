"""A per-example likelihood-ratio audit in the style of U-LiRA (Hayes, Shumailov, Triantafillou, Khalifa, Papernot
2025, "Inexact unlearning needs more careful evaluations to avoid a false sense of privacy", SaTML; after LiRA,
Carlini, Chien, Nasr, Song, Terzis, Tramer 2022, "Membership inference attacks from first principles", IEEE S&P).

For every forget row x, K reference models trained the same way as the audited model are split into IN (trained with
x; for U-LiRA proper: trained with x and then unlearned by the same method) and OUT (never trained on x). The row's
membership score (a MIA score, higher = member) under each reference gives two Gaussian fits, N(mu_in, s_in^2) and
N(mu_out, s_out^2); the audited model's score s on x is then tested against OUT:

- with IN references for x: the likelihood ratio Lambda(s) = N(s; mu_in, s_in^2) / N(s; mu_out, s_out^2) (the
  Neyman-Pearson test of IN against OUT) and its exact p-value under OUT, P_{X ~ OUT}(Lambda(X) >= Lambda(s));
- with OUT references only ("offline" LiRA): the one-sided p-value 1 - Phi((s - mu_out) / s_out).

A row is still identified at false-positive rate f when its p-value is <= f. If the audited model behaves like a
model never trained on the forget rows, about f of them are (a binomial count, `statistics.binomial_excess_p_value`).

Few references: each fit uses the predictive spread of a new score, s^2 (1 + 1 / n) for a mean of n scores, and
with fewer than `FIXED_VARIANCE_BELOW` references the variance is pooled over the rows ("fixed variance", as LiRA
does with few shadow models), so that two references a side suffice. At least two OUT references per row are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets
from scipy import stats
from torch import nn

from ..evaluation.result import EvaluationResult

FIXED_VARIANCE_BELOW = 64
"""With fewer references than this, the IN and OUT variances are pooled over the rows (Carlini et al. 2022 fit one
variance for all examples when they have few shadow models)."""

MIN_STD = 1e-6


@dataclass
class ReferenceModel:
    """A reference of the likelihood-ratio audit: a model (or its evaluation: an `EvaluationResult` holding the MIA
    per-example scores of the same forget rows) and, for each forget row in order, whether it trained on it (IN) or
    not (OUT). ``members=True`` / ``False``: IN / OUT for every row."""

    source: nn.Module | EvaluationResult
    members: Sequence[bool] | bool
    name: str = "reference"

    def membership(self, rows: int) -> np.ndarray:
        """The IN flags of the `rows` forget rows."""
        if isinstance(self.members, (bool, np.bool_)):
            return np.full(rows, bool(self.members))
        flags = np.asarray(self.members)
        if flags.shape != (rows,) or flags.dtype != bool:
            raise ValueError(
                f"Reference {self.name!r}: members must be True, False or one bool per forget row ({rows}); got "
                f"{flags.shape} values of dtype {flags.dtype}."
            )
        return flags


def reference_membership(references: int, rows: int, seed: int = 0) -> np.ndarray:
    """[references, rows] IN flags where every row is IN for exactly half of the references (LiRA's sampling: a
    random half for each row, seeded). `references` must be even."""
    if references < 2 or references % 2:
        raise ValueError(f"The verifier trains an even number of references (>= 2), got {references}.")
    rng = np.random.default_rng(seed)
    flags = np.zeros((references, rows), dtype=bool)
    for row in range(rows):
        flags[rng.permutation(references)[: references // 2], row] = True
    return flags


def train_reference_models(
    train_fn: Callable[[Dataset, int], nn.Module],
    forget: Dataset,
    retain: Dataset,
    references: int = 4,
    seed: int = 0,
) -> list[ReferenceModel]:
    """`references` models trained by `train_fn(rows, seed)` (the recipe of the audited model: same base, same
    training, e.g. `sft_recipe`), reference j on the retain rows plus the forget rows IN for it
    (`reference_membership`: each forget row in exactly half of them), seeds ``seed + j``. Only for small models: it
    trains `references` models."""
    flags = reference_membership(references, len(forget), seed)
    out = []
    for j, members in enumerate(flags):
        rows = concatenate_datasets([retain, forget.select(np.flatnonzero(members).tolist())])
        out.append(ReferenceModel(train_fn(rows, seed + j), members.tolist(), name=f"reference {j}"))
    return out


def sft_recipe(tokenizer: Any, model_init: Callable[[int], nn.Module], output_dir: str, **sft_options: Any):
    """A `train_fn` for `train_reference_models`: ``model_init(seed)`` (a fresh model) finetuned on the rows with
    `erasus_hf.modeling.tiny.sft_train` (TRL's SFTTrainer, the package's recipe) and `sft_options`."""
    from ..modeling.tiny import sft_train

    def train(rows: Dataset, seed: int) -> nn.Module:
        model = model_init(seed)
        return sft_train(model, tokenizer, rows, output_dir=output_dir, seed=seed, **sft_options).eval()

    return train


@dataclass
class GaussianFits:
    """Per forget row: mean, predictive standard deviation and count of the IN and of the OUT scores (NaN mean and
    0 count where a row has no IN reference)."""

    in_mean: np.ndarray
    in_std: np.ndarray
    in_count: np.ndarray
    out_mean: np.ndarray
    out_std: np.ndarray
    out_count: np.ndarray
    fixed_variance: bool
    notes: list[str] = field(default_factory=list)


def _side_fit(scores: np.ndarray, flags: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, ...]:
    """Mean, variance (NaN where it cannot be estimated) and count per row of the scores whose flag is set."""
    count = flags.sum(0)
    total = np.where(flags, scores, 0.0).sum(0)
    mean = np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)
    squares = np.where(flags, (scores - np.nan_to_num(mean)) ** 2, 0.0).sum(0)
    if fixed_variance:
        dof = np.clip(count - 1, 0, None).sum()
        variance = np.full(count.shape, squares.sum() / dof if dof > 0 else np.nan)
    else:
        variance = np.divide(squares, count - 1, out=np.full(count.shape, np.nan), where=count > 1)
    return mean, variance, count


def _predictive_std(variance: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The spread of one new score around a mean of `count` scores: sqrt(variance (1 + 1 / count))."""
    std = np.sqrt(np.maximum(variance, MIN_STD**2))
    return np.where(count > 0, std * np.sqrt(1 + 1 / np.maximum(count, 1)), np.nan)


def fit_gaussians(scores: np.ndarray, membership: np.ndarray, fixed_variance: bool | None = None) -> GaussianFits:
    """The IN and OUT fits of `scores` [K, n] (reference k's score of forget row i) under `membership` [K, n]
    (True = reference k trained on row i). `fixed_variance`: pool each side's variance over the rows (None: when
    K < `FIXED_VARIANCE_BELOW`); otherwise each row's own sample variance (ddof 1). Where the IN variance cannot be
    estimated (one IN reference per row), the OUT variance serves both sides (equal variances). Raises when some row
    has fewer than two OUT references."""
    scores, membership = np.asarray(scores, dtype=float), np.asarray(membership, dtype=bool)
    if scores.shape != membership.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and membership {membership.shape} must both be [K, rows].")
    out_count = (~membership).sum(0)
    if out_count.min() < 2:
        rows = np.flatnonzero(out_count < 2).tolist()
        raise ValueError(
            f"The likelihood-ratio audit needs at least two OUT references (models never trained on the row) for "
            f"every forget row; rows {rows[:5]} have {out_count.min()}. Add references trained without them."
        )
    fixed = len(scores) < FIXED_VARIANCE_BELOW if fixed_variance is None else fixed_variance
    in_mean, in_variance, in_count = _side_fit(scores, membership, fixed)
    out_mean, out_variance, out_count = _side_fit(scores, ~membership, fixed)
    notes = []
    borrowed = (in_count > 0) & np.isnan(in_variance)
    if borrowed.any():
        in_variance = np.where(borrowed, out_variance, in_variance)
        notes.append(
            f"{int(borrowed.sum())} row(s) with a single IN reference use the OUT variance for IN too "
            "(equal variances)"
        )
    return GaussianFits(
        in_mean,
        _predictive_std(in_variance, in_count),
        in_count,
        out_mean,
        _predictive_std(out_variance, out_count),
        out_count,
        fixed,
        notes,
    )


def log_likelihood_ratio(score: float, in_mean: float, in_std: float, out_mean: float, out_std: float) -> float:
    """ln N(score; in_mean, in_std^2) - ln N(score; out_mean, out_std^2)."""
    return float(stats.norm.logpdf(score, in_mean, in_std) - stats.norm.logpdf(score, out_mean, out_std))


def likelihood_ratio_p_value(score: float, in_mean: float, in_std: float, out_mean: float, out_std: float) -> float:
    """P_{X ~ N(out_mean, out_std^2)}(Lambda(X) >= Lambda(score)), Lambda the IN / OUT likelihood ratio: the exact
    p-value of the Neyman-Pearson test of IN against OUT.

    ln Lambda(x) = a x^2 + b x + c with a = 1 / (2 out_std^2) - 1 / (2 in_std^2), b = in_mean / in_std^2 -
    out_mean / out_std^2, so {x : ln Lambda(x) >= ln Lambda(s)} = {x : a (x - s)(x - s') >= 0} with s' = -s - b / a:
    the two tails outside [s, s'] when a > 0, the segment between them when a < 0, a half-line when a = 0."""
    out = stats.norm(out_mean, out_std)
    a = 1 / (2 * out_std**2) - 1 / (2 * in_std**2)
    b = in_mean / in_std**2 - out_mean / out_std**2
    if abs(a) < 1e-12 * max(1 / out_std**2, 1 / in_std**2):
        if b == 0:
            return 1.0
        return float(out.sf(score) if b > 0 else out.cdf(score))
    other = -score - b / a
    low, high = min(score, other), max(score, other)
    if a > 0:
        return float(min(1.0, out.cdf(low) + out.sf(high)))
    return float(max(0.0, out.cdf(high) - out.cdf(low)))


def offline_p_value(score: float, out_mean: float, out_std: float) -> float:
    """1 - Phi((score - out_mean) / out_std): how unusually member-like `score` is for a model that never trained on
    the row (higher score = member)."""
    return float(stats.norm.sf(score, out_mean, out_std))


def audit(target: Sequence[float], fits: GaussianFits, fpr: float) -> dict[str, Any]:
    """The per-row tests of `target` (the audited model's score of each forget row) against `fits`: ``{"p_value",
    "log_lr" (None offline), "test" ("likelihood ratio" or "offline"), "identified" (p <= fpr)}`` lists, one entry per
    row, and ``"identified_count"``."""
    target = np.asarray(target, dtype=float)
    if target.shape != fits.out_mean.shape:
        raise ValueError(f"{len(target)} target scores for {len(fits.out_mean)} fitted rows.")
    p_values, ratios, tests = [], [], []
    for i, s in enumerate(target):
        out_mean, out_std = fits.out_mean[i], fits.out_std[i]
        if fits.in_count[i] > 0:
            args = (fits.in_mean[i], fits.in_std[i], out_mean, out_std)
            p_values.append(likelihood_ratio_p_value(s, *args))
            ratios.append(log_likelihood_ratio(s, *args))
            tests.append("likelihood ratio")
        else:
            p_values.append(offline_p_value(s, out_mean, out_std))
            ratios.append(None)
            tests.append("offline")
    identified = [p <= fpr for p in p_values]
    return {
        "p_value": p_values,
        "log_lr": ratios,
        "test": tests,
        "identified": identified,
        "identified_count": int(sum(identified)),
    }
