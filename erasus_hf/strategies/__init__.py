"""Unlearning strategies, by registry name."""

from __future__ import annotations

from typing import Any

from .base import Strategy, StrategyContext, kl_to_reference, retain_loss
from .gradient_ascent import GradDiff, GradientAscent
from .npo import NPO, SimNPO

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (GradientAscent, GradDiff, NPO, SimNPO)}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a user-defined strategy available by `cls.name`."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str | Strategy, **kwargs: Any) -> Strategy:
    """Instantiate strategy `name` with its hyperparameters; unknown names and keywords fail with the valid ones."""
    if isinstance(name, Strategy):
        if kwargs:
            raise ValueError("strategy_kwargs are ignored when a Strategy instance is given; set them on it.")
        return name
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    valid = cls.hyperparameter_names()
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"Unknown hyperparameters {unknown} for strategy {name!r}; valid: {valid or 'none'}")
    return cls(**kwargs)


__all__ = [
    "NPO",
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
