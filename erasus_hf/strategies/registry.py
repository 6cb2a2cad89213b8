"""The strategy registry: every strategy class registers itself by name with `@register_strategy`."""

from __future__ import annotations

from typing import Any

from .base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by `cls.name` (user-defined strategies too)."""
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
