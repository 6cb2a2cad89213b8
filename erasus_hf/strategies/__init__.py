"""Unlearning strategies, by registry name. Importing a strategy module registers its classes. Two families
register from above: the "pipeline" strategy drives trainers, so it lives above the trainer (`erasus_hf.pipeline`),
and the concept-erasure strategies (esd, uce, concept_ablation, diffusion_salun) live with their objective in
`erasus_hf.diffusion`; `import erasus_hf` (run first by any `import erasus_hf.<module>`) imports both."""

from __future__ import annotations

from . import composition, dpo, gradient_ascent, npo, pdu, rmu, scrub, task_vector, token_weighted, whp  # noqa: F401
from .base import Strategy, StrategyContext, kl_to_reference, retain_loss
from .composition import EnsembleStrategy
from .gradient_ascent import GradDiff, GradientAscent
from .npo import NPO, SimNPO
from .registry import STRATEGIES, get_strategy, register_strategy

# the classic classifier-unlearning methods (random_label, salun, bad_teacher, ssd, fisher_forgetting, l1_sparse)
from . import bad_teacher, fisher_forgetting, l1_sparse, random_label, ssd  # noqa: E402, F401  isort: skip

__all__ = [
    "NPO",
    "EnsembleStrategy",
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
