"""The verifier's statistics computed by hand: the epsilon lower bound of (TPR, FPR, n) with its Clopper-Pearson
bounds, TPR at a low FPR, the seeded stratified bootstrap, the two-sample tests, Holm's correction, and the
per-example likelihood-ratio score of the U-LiRA-style audit (Gaussian fits written out)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from erasus_hf.evaluation.auc import auc
from erasus_hf.verification.lira import (
    audit,
    fit_gaussians,
    likelihood_ratio_p_value,
    log_likelihood_ratio,
    offline_p_value,
    reference_membership,
)
from erasus_hf.verification.relearning import compare_curves, curve_from_table, split_rows
from erasus_hf.verification.statistics import (
    binomial_excess_p_value,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
    holm,
    stratified_bootstrap,
    tpr_at_fpr,
    two_sample_tests,
)
from erasus_hf.verification.verifier import Check, VerificationResult, pair_auc

# ---- the epsilon lower bound ----------------------------------------------------------------------------------------


def test_epsilon_bound_of_a_perfect_attack_by_hand():
    # 100 members all flagged, 0 of 100 non-members: the point estimate is unbounded. At alpha = 0.05 each one-sided
    # Clopper-Pearson bound is at 0.025: TPR >= 0.025^(1/100) = exp(ln(0.025) / 100) = exp(-0.0368888) = 0.963783,
    # FPR <= 1 - 0.963783 = 0.036217, so epsilon >= ln(0.963783 / 0.036217) = ln(26.6113) = 3.28133.
    bound = epsilon_lower_bound(100, 100, 0, 100, alpha=0.05)
    assert bound["tpr_lower"] == pytest.approx(0.963783, abs=1e-6)
    assert bound["fpr_upper"] == pytest.approx(0.036217, abs=1e-6)
    assert bound["epsilon_lower"] == pytest.approx(3.28133, abs=1e-4)
    assert bound["epsilon_point"] is None  # ln(1 / 0): unbounded, reported as None (JSON has no infinity)
    assert bound["confidence"] == 0.95
    # delta = 0.01: ln((0.963783 - 0.01) / 0.036217) = ln(26.3352) = 3.27090
    assert epsilon_lower_bound(100, 100, 0, 100, delta=0.01)["epsilon_lower"] == pytest.approx(3.27090, abs=1e-4)
    # 4 thresholds tried: each bound at 0.05 / 8 = 0.00625; q = 0.00625^(1/100) = exp(-0.0507517) = 0.950514,
    # ln(q / (1 - q)) = ln(19.2078) = 2.95533
    assert epsilon_lower_bound(100, 100, 0, 100, comparisons=4)["epsilon_lower"] == pytest.approx(2.95533, abs=1e-4)


def test_epsilon_bound_of_measured_rates():
    # TPR 0.9, FPR 0.1: both forms give ln(0.9 / 0.1) = ln 9 = 2.19722 as the point estimate
    bound = epsilon_lower_bound(90, 100, 10, 100)
    assert bound["epsilon_point"] == pytest.approx(math.log(9), abs=1e-9)
    # the Clopper-Pearson bounds are those of their definitions: P(X >= 90 | TPR_low) = P(X <= 10 | FPR_up) = 0.025
    assert stats.binom.sf(89, 100, bound["tpr_lower"]) == pytest.approx(0.025, abs=1e-9)
    assert stats.binom.cdf(10, 100, bound["fpr_upper"]) == pytest.approx(0.025, abs=1e-9)
    low = math.log(bound["tpr_lower"] / bound["fpr_upper"])
    assert bound["epsilon_lower"] == pytest.approx(
        max(low, math.log((1 - bound["fpr_upper"]) / (1 - bound["tpr_lower"])))
    )
    assert 0 < bound["epsilon_lower"] < math.log(9)
    # an attack no better than chance proves nothing: the bound is 0, not negative
    assert epsilon_lower_bound(10, 100, 10, 100)["epsilon_lower"] == 0.0
    assert epsilon_from_rates(0.5, 0.5) == 0.0
    assert epsilon_from_rates(0.9, 0.0) == math.inf


def test_clopper_pearson_closed_forms_and_bad_counts():
    assert clopper_pearson_lower(0, 20, 0.05) == 0.0
    assert clopper_pearson_upper(20, 20, 0.05) == 1.0
    assert clopper_pearson_lower(20, 20, 0.05) == pytest.approx(0.05 ** (1 / 20))
    assert clopper_pearson_upper(0, 20, 0.05) == pytest.approx(1 - 0.05 ** (1 / 20))
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        clopper_pearson_lower(5, 4, 0.05)
    with pytest.raises(ValueError, match="significance level"):
        epsilon_lower_bound(1, 2, 0, 2, alpha=1.5)


# ---- TPR at low FPR, the bootstrap, the two-sample tests ------------------------------------------------------------

MEMBERS = [0.9, 0.8, 0.5, 0.1]
NONMEMBERS = [0.7, 0.5, 0.2, 0.0, -0.1, -0.3, -0.5, -0.6, -0.8, -0.9]


def test_tpr_at_fpr_by_hand():
    # 10 non-members: FPR 0.1 allows 1 false positive, so the threshold is the 2nd largest non-member (0.5); members
    # strictly above: 0.9 and 0.8 (0.5 ties the threshold and counts as negative)
    at_10 = tpr_at_fpr(MEMBERS, NONMEMBERS, 0.1)
    assert at_10 == {"tpr": 0.5, "fpr": 0.1, "threshold": 0.5, "target_fpr": 0.1, "resolution": 0.1}
    # FPR 1% < 1/10: no false positive allowed, the threshold is the largest non-member
    assert tpr_at_fpr(MEMBERS, NONMEMBERS, 0.01)["threshold"] == 0.7
    assert tpr_at_fpr(MEMBERS, NONMEMBERS, 0.01)["fpr"] == 0.0
    # FPR 0.25: 2 allowed, threshold 0.2, members above it 3 of 4, non-members above it 2 of 10
    at_25 = tpr_at_fpr(MEMBERS, NONMEMBERS, 0.25)
    assert (at_25["tpr"], at_25["fpr"], at_25["threshold"]) == (0.75, 0.2, 0.2)


def test_seeded_bootstrap_by_hand():
    # default_rng(0).integers(0, 3, 3) four times: [2 1 1], [0 0 0], [0 0 0], [2 1 2]; resampled means of [1, 2, 4]:
    # (4 + 2 + 2) / 3 = 2.6667, 1, 1, (4 + 2 + 4) / 3 = 3.3333. Sorted [1, 1, 2.6667, 3.3333]; numpy's linear
    # percentiles at 25 and 75: position 0.75 -> 1.0, position 2.25 -> 2.6667 + 0.25 (3.3333 - 2.6667) = 2.8333.
    low, high = stratified_bootstrap(np.mean, [[1.0, 2.0, 4.0]], resamples=4, seed=0, level=0.5)
    assert low == pytest.approx(1.0)
    assert high == pytest.approx(2.8333333, abs=1e-6)
    # two samples: each resample draws the first sample's indices, then the second's ([1 1] then [1 0 0] for seed 0)
    draws = []
    stratified_bootstrap(lambda a, b: draws.append((a.tolist(), b.tolist())) or 0.0, [[5.0, 6.0], [7.0, 8.0, 9.0]], 1)
    assert draws == [([6.0, 6.0], [8.0, 7.0, 7.0])]
    # a 2-D sample keeps each row's columns together (rows = the same example under two models)
    pairs = []
    stratified_bootstrap(lambda a: pairs.append(a.tolist()) or 0.0, [[[1.0, 10.0], [2.0, 20.0]]], resamples=3)
    assert all(row[1] == 10 * row[0] for sample in pairs for row in sample)


def test_two_sample_tests_by_hand():
    # [1, 2, 3] against [4, 5, 6]: every score below, KS D = 1; of the C(6, 3) = 20 equally likely splits, 2 are
    # this extreme (either way), so both exact two-sided p-values are 2 / 20 = 0.1; U = 0, so P(first > second) = 0
    tests = two_sample_tests([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert tests["ks"] == {"statistic": 1.0, "p_value": pytest.approx(0.1)}
    assert tests["mann_whitney"]["statistic"] == 0.0
    assert tests["mann_whitney"]["p_value"] == pytest.approx(0.1)
    assert tests["mann_whitney"]["auc"] == 0.0


def test_pair_auc_is_the_evaluation_auc():
    rng = np.random.default_rng(3)
    members, nonmembers = rng.normal(0.5, 1, 30).round(1), rng.normal(0, 1, 25).round(1)  # rounded: ties too
    assert pair_auc(members, nonmembers) == pytest.approx(auc(members.tolist(), nonmembers.tolist()))


def test_holm_and_binomial_by_hand():
    # sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, 1 x 0.04 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # P(X >= 2), X ~ Bin(40, 0.05) = 1 - 0.95^40 - 40 x 0.05 x 0.95^39
    expected = 1 - 0.95**40 - 40 * 0.05 * 0.95**39
    assert binomial_excess_p_value(2, 40, 0.05) == pytest.approx(expected)
    assert binomial_excess_p_value(0, 40, 0.05) == 1.0


# ---- the likelihood-ratio audit -------------------------------------------------------------------------------------


def test_per_example_likelihood_ratio_by_hand():
    # one row, 4 references: IN scores 2 and 4, OUT scores 0 and 2
    scores = np.array([[2.0], [4.0], [0.0], [2.0]])
    membership = np.array([[True], [True], [False], [False]])
    fits = fit_gaussians(scores, membership, fixed_variance=False)
    # IN: mean 3, sample variance ((2-3)^2 + (4-3)^2) / 1 = 2; the predictive spread of a new score adds the mean's
    # own uncertainty: 2 (1 + 1/2) = 3. OUT: mean 1, variance 2, predictive 3.
    assert fits.in_mean[0] == 3.0 and fits.out_mean[0] == 1.0
    assert fits.in_std[0] == pytest.approx(math.sqrt(3)) and fits.out_std[0] == pytest.approx(math.sqrt(3))
    # the audited model scores 3: ln N(3; 3, 3) - ln N(3; 1, 3) = 0 + (3 - 1)^2 / (2 x 3) = 2/3
    assert log_likelihood_ratio(3.0, 3.0, math.sqrt(3), 1.0, math.sqrt(3)) == pytest.approx(2 / 3)
    # equal variances: the ratio grows with the score, so the p-value under OUT is 1 - Phi((3 - 1) / sqrt 3) = 0.12410
    result = audit([3.0], fits, fpr=0.05)
    assert result["p_value"][0] == pytest.approx(0.124106, abs=1e-6)
    assert result["log_lr"][0] == pytest.approx(2 / 3)
    assert result["identified"] == [False] and result["test"] == ["likelihood ratio"]
    assert audit([7.0], fits, fpr=0.05)["identified"] == [True]  # 1 - Phi(6 / sqrt 3) = 2.7e-4


def test_likelihood_ratio_p_value_matches_numeric_integration():
    """Unequal variances: the region where the ratio exceeds its value at s is a segment or two tails; the closed
    form is checked against integrating the OUT density over {x : ln Lambda(x) >= ln Lambda(s)} on a fine grid."""
    x = np.linspace(-30, 30, 600_001)
    for in_mean, in_std, out_mean, out_std, s in [(4, 2.3, 0.5, 0.9, 2.0), (1, 0.5, 0, 2.0, 0.3), (1, 0.5, 0, 2.0, 4)]:
        ratio = stats.norm.logpdf(x, in_mean, in_std) - stats.norm.logpdf(x, out_mean, out_std)
        at_s = log_likelihood_ratio(s, in_mean, in_std, out_mean, out_std)
        numeric = np.trapezoid(stats.norm.pdf(x, out_mean, out_std) * (ratio >= at_s), x)
        assert likelihood_ratio_p_value(s, in_mean, in_std, out_mean, out_std) == pytest.approx(numeric, abs=1e-4)
    assert offline_p_value(1.0, 0.0, 1.0) == pytest.approx(1 - stats.norm.cdf(1.0))


def test_fixed_variance_pools_rows_and_offline_rows():
    # two rows; OUT scores row 0: 0, 2 (squares about the mean 1: 1 + 1), row 1: 5, 5, 8 (mean 6: 1 + 1 + 4);
    # pooled variance (2 + 6) / (1 + 2) = 8/3; row 0's predictive variance 8/3 (1 + 1/2) = 4, row 1's 8/3 (1 + 1/3)
    scores = np.array([[0.0, 5.0], [2.0, 5.0], [9.0, 8.0]])
    membership = np.array([[False, False], [False, False], [True, False]])
    fits = fit_gaussians(scores, membership, fixed_variance=True)
    assert fits.out_std[0] == pytest.approx(2.0)
    assert fits.out_std[1] == pytest.approx(math.sqrt(8 / 3 * 4 / 3))
    # row 0 has one IN reference (9): no IN variance to pool, so the OUT one serves, predictive 8/3 (1 + 1/1) = 16/3
    assert fits.in_mean[0] == 9.0 and fits.in_std[0] == pytest.approx(math.sqrt(16 / 3))
    assert "single IN reference" in fits.notes[0]
    # row 1 has no IN reference: it is tested offline, 1 - Phi(0) = 0.5 at its OUT mean
    result = audit([1.0, 6.0], fits, fpr=0.05)
    assert result["test"] == ["likelihood ratio", "offline"]
    assert result["p_value"][1] == pytest.approx(0.5)
    assert result["p_value"][0] == pytest.approx(likelihood_ratio_p_value(1.0, 9.0, math.sqrt(16 / 3), 1.0, 2.0))
    with pytest.raises(ValueError, match="at least two OUT references"):
        fit_gaussians(scores[1:], membership[1:])


def test_reference_membership_puts_each_row_in_half_the_references():
    flags = reference_membership(4, 10, seed=0)
    assert flags.shape == (4, 10) and (flags.sum(0) == 2).all()
    assert (flags == reference_membership(4, 10, seed=0)).all()
    with pytest.raises(ValueError, match="even number"):
        reference_membership(3, 10)


# ---- relearning comparison, result JSON -----------------------------------------------------------------------------


def test_relearning_comparison_by_hand():
    # two measured rows, steps 0, 2, 4. Audited: row 0 0.2 -> 0.6, 0.8 (relearned (0.6 + 0.8) / 2 = 0.7, gain 0.5),
    # row 1 0.0 -> 0.2, 0.4 (relearned 0.3, gain 0.3); retrained: row 0 0.1 -> 0.15, 0.1 (relearned 0.125), row 1
    # 0 -> 0, 0 (relearned 0). Differences 0.575 and 0.3, mean 0.4375.
    audited = curve_from_table([0, 2, 4], [[0.2, 0.0], [0.6, 0.2], [0.8, 0.4]])
    retrained = curve_from_table([0, 2, 4], [[0.1, 0.0], [0.15, 0.0], [0.1, 0.0]])
    assert audited["relearned"] == pytest.approx([0.7, 0.3]) and audited["gain"] == pytest.approx([0.5, 0.3])
    assert audited["accuracy"] == pytest.approx([0.1, 0.4, 0.6])
    out = compare_curves(audited, retrained, target_accuracy=0.4)
    assert out["statistic"] == pytest.approx(0.4375)
    assert out["p_value"] == pytest.approx(0.25)  # exact signed-rank, both differences positive: 1 / 2^2
    assert out["gain"] == pytest.approx({"audited": 0.4, "retrained": 0.0125})
    # mean accuracy reaches 0.4 at step 2 for the audited model, never for the retrained one
    assert (out["steps_audited"], out["steps_retrained"], out["speedup"]) == (2, None, None)
    assert compare_curves(audited, audited)["p_value"] == 1.0


def test_split_rows_is_seeded_and_disjoint(tofu_slice):
    forget, _ = tofu_slice
    relearn, measured = split_rows(forget, 0.5, seed=0)
    assert len(relearn) == len(measured) == 20
    assert not set(relearn["question"]) & set(measured["question"])
    assert relearn["question"] == split_rows(forget, 0.5, seed=0)[0]["question"]


def test_verification_result_json_round_trip_and_verdicts(tmp_path):
    check = Check(
        "mia_auc/loss",
        "whether ...",
        "non-members",
        "AUC",
        0.93,
        0.05,
        True,
        interval={"low": 0.8, "high": 1.0, "level": 0.95, "method": "m"},
    )
    kept = Check("lira", "the fraction ...", "retraining", "fraction", 0.05, 0.01, False, p_value=0.6)
    result = VerificationResult([check, kept], {"relearning": "no model"}, {"alpha": 0.05, "value": float("inf")})
    assert check.verdict == "distinguishable from non-members at level 0.05"
    assert kept.verdict == "indistinguishable from retraining at level 0.01"
    path = tmp_path / "verification.json"
    result.save(path)
    data = json.loads(path.read_text())  # strict JSON: the infinity became null
    assert data["meta"]["value"] is None
    assert [c["verdict"] for c in data["checks"]] == [check.verdict, kept.verdict]
    loaded = VerificationResult.load(path)
    assert loaded["lira"].p_value == 0.6 and loaded.rejected == ["mia_auc/loss"]
    text = result.describe()
    assert "| `mia_auc/loss` |" in text and "indistinguishable from retraining at level 0.01" in text
    evaluation = result.to_evaluation_result()
    assert evaluation.summary == {"verify/mia_auc/loss": 0.93, "verify/lira": 0.05, "verify/lira_p_value": 0.6}
    assert evaluation.intervals["verify/mia_auc/loss"]["low"] == 0.8
