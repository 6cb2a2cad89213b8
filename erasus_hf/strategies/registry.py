"""The strategy registry: every strategy class registers itself by name with `@register_strategy`."""

from __future__ import annotations

from typing import Any

from ..objectives import Objective
from ..registry import Registry
from .base import Strategy

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "strategies")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by `cls.name` (user-defined strategies too); a taken name raises."""
    return STRATEGIES.register(cls, cls.name)


def get_strategy(name: str | Strategy, **kwargs: Any) -> Strategy:
    """Instantiate strategy `name` with its hyperparameters; unknown names and keywords fail with the valid ones."""
    if isinstance(name, Strategy):
        if kwargs:
            raise ValueError("strategy_kwargs are ignored when a Strategy instance is given; set them on it.")
        return name
    cls = STRATEGIES.lookup(name)
    valid = cls.hyperparameter_names()
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"Unknown hyperparameters {unknown} for strategy {name!r}; valid: {valid or 'none'}")
    return cls(**kwargs)


def check_token_scores(strategy: Strategy, objective: Objective, retain_loss_name: str) -> None:
    """Refuse a strategy that reads per-token log-probs or logits for an objective whose scores have none (CTC gives a
    sequence likelihood only), naming the registered strategies that can serve it. That list is read from the
    classes, each answering for its default hyperparameters (`PerInstance`: PDU counts as token-level, its default
    forget term reads logits; `strategy` itself answers for its own)."""
    if objective.supports_token_scores or not strategy.needs_token_scores(retain_loss_name):
        return
    what = "its loss reads" if strategy.token_level else f"retain_loss={retain_loss_name!r} (a KL) reads"
    usable = sorted(n for n, c in STRATEGIES.items() if objective.name in c.objectives and not c.token_level)
    raise ValueError(
        f"Strategy {strategy.name!r} cannot serve the {objective.name!r} objective: {what} per-token log-probs or "
        f"logits of the target tokens, and {objective.token_scores_note}. Strategies that need only sequence "
        f"log-likelihoods (with retain_loss 'nll' or 'none'): {', '.join(usable)}."
    )
