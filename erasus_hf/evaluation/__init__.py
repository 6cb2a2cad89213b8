"""Evaluation: answer likelihoods and TOFU's truth ratio (the fuller suites build on these)."""

from .likelihood import answer_nll, tofu_truth_ratios, truth_ratio, truth_ratio_score

__all__ = ["answer_nll", "tofu_truth_ratios", "truth_ratio", "truth_ratio_score"]
