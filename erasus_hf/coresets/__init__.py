"""Coreset selection: unlearn with a fraction of the forget and/or retain rows (`UnlearningConfig(coreset=...)`).

    from erasus_hf.coresets import get_selector
    keep = get_selector("herding").select(30, embeddings)   # dataset indices, sorted

Selectors (`SELECTORS`): random, herding, k_center, kmeans, facility_location, loss (loss / EL2N), gradient_norm,
forget_similar (retain side) and upcore (forget side). What they cost and save on TOFU-mini, random included:
`python -m benchmarks.coresets` and the README's table.
"""

from .features import example_features
from .selection import CoresetReport, SideSelection, apply_coreset, full_set_steps
from .selectors import CORESET_BUDGETS, CORESET_SIDES, SELECTORS, CoresetSelector, get_selector, register_selector

__all__ = [
    "CORESET_BUDGETS",
    "CORESET_SIDES",
    "SELECTORS",
    "CoresetReport",
    "CoresetSelector",
    "SideSelection",
    "apply_coreset",
    "example_features",
    "full_set_steps",
    "get_selector",
    "register_selector",
]
