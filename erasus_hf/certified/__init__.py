"""Certified data removal where the mathematics gives one: Guo et al. (ICML 2020) for an L2-regularised
logistic-regression head on fixed features (of a frozen or publicly pre-trained body, or raw pixels).

    from erasus_hf.certified import CertifiedRemover, hidden_state_features

    features = hidden_state_features(body.requires_grad_(False), tokenizer, texts, pooling="mean")
    remover = CertifiedRemover(epsilon=1.0, delta=1e-4, lam=1e-3, noise_std=10.0).fit(features, labels)
    remover.remove([3, 17])            # one Newton step; retrains with fresh noise if the budget runs out
    print(remover.certificate().to_markdown())
"""

from .certificate import (
    AssumptionError,
    BudgetExhaustedError,
    RemovalCertificate,
    noise_constant,
    noise_std_for,
    residual_budget,
)
from .features import FixedFeatures, check_frozen, hidden_state_features, normalize_rows, pixel_features
from .remover import CertifiedRemover, RemovalRecord, check_head

__all__ = [
    "AssumptionError",
    "BudgetExhaustedError",
    "CertifiedRemover",
    "FixedFeatures",
    "RemovalCertificate",
    "RemovalRecord",
    "check_frozen",
    "check_head",
    "hidden_state_features",
    "noise_constant",
    "noise_std_for",
    "normalize_rows",
    "pixel_features",
    "residual_budget",
]
