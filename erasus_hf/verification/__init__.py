"""Verification of unlearning: statistical checks of whether a model still tells its forget rows from rows it never
saw, or from a retrained model (`UnlearningVerifier`), each with its statistic, p-value or interval and level."""

from .lira import ReferenceModel, reference_membership, sft_recipe, train_reference_models
from .statistics import epsilon_lower_bound, stratified_bootstrap, tpr_at_fpr, two_sample_tests
from .verifier import Check, UnlearningVerifier, VerificationResult

__all__ = [
    "Check",
    "ReferenceModel",
    "UnlearningVerifier",
    "VerificationResult",
    "epsilon_lower_bound",
    "reference_membership",
    "sft_recipe",
    "stratified_bootstrap",
    "tpr_at_fpr",
    "train_reference_models",
    "two_sample_tests",
]
