"""Unlearning strategies, by registry name. Importing a strategy module registers its classes."""

from __future__ import annotations

from . import composition, dpo, gradient_ascent, npo, pdu, rmu, scrub, task_vector, token_weighted, whp  # noqa: F401
from .base import Strategy, StrategyContext, kl_to_reference, retain_loss
from .composition import EnsembleStrategy, StrategyPipeline
from .gradient_ascent import GradDiff, GradientAscent
from .npo import NPO, SimNPO
from .registry import STRATEGIES, get_strategy, register_strategy

# the classic classifier-unlearning methods (random_label, salun, bad_teacher, ssd, fisher_forgetting, l1_sparse)
from . import bad_teacher, fisher_forgetting, l1_sparse, random_label, ssd  # noqa: E402, F401  isort: skip

# the concept-erasure strategies of diffusion models (esd, uce, concept_ablation, diffusion_salun); they import
# diffusers only when used
from ..diffusion import concept_ablation, esd, salun, uce  # noqa: E402, F401  isort: skip

__all__ = [
    "NPO",
    "EnsembleStrategy",
    "StrategyPipeline",
    "STRATEGIES",
    "GradDiff",
    "GradientAscent",
    "SimNPO",
    "Strategy",
    "StrategyContext",
    "get_strategy",
    "kl_to_reference",
    "register_strategy",
    "retain_loss",
]
