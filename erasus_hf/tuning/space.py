"""The search space of a tuning run: which `UnlearningConfig` fields and strategy hyperparameters a trial draws, and
from what range, as an optuna `hp_space` for `Trainer.hyperparameter_search`.

In a recipe (YAML) or as a dict::

    search_space:
      learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range (log-uniform)
      num_train_epochs: {choices: [5, 10, 20]}                 # a categorical choice
      retain_weight: {low: 0.5, high: 4.0}                     # uniform
      strategy_kwargs.beta: {low: 0.05, high: 1.0, log: true}  # a hyperparameter of the strategy (`--help-strategy`)

A range of two integers draws integers (`step` optional). Every name and bound is checked when the space is built,
before any model loads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STRATEGY_PREFIX = "strategy_kwargs."
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Dimension:
    """One searched value: `name` (a config field, or `strategy_kwargs.<hyperparameter>`) and its distribution."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {list(self.choices)}"
        scale = "log-uniform" if self.log else "uniform"
        return f"{self.name} {scale} [{self.low:g}, {self.high:g}]"


class SearchSpace:
    """The dimensions of a search, checked against the config fields and the strategy's hyperparameters."""

    def __init__(self, dimensions: list[Dimension], strategy: str, base_strategy_kwargs: Mapping[str, Any]) -> None:
        if not dimensions:
            raise ValueError("The search space is empty: give at least one value to search (e.g. learning_rate).")
        self.dimensions = dimensions
        self.strategy = strategy
        self.base_strategy_kwargs = dict(base_strategy_kwargs)

    @classmethod
    def from_dict(
        cls, space: Mapping[str, Any], strategy: str, base_strategy_kwargs: Mapping[str, Any] | None = None
    ) -> SearchSpace:
        """Build a space from `{name: {low, high[, log, step]} | {choices: [...]}}` for `strategy`; an unknown
        name, a bound that is not a number, `low >= high` or a log range that reaches 0 raise ValueError naming
        the entry and the valid names."""
        from ..config import UnlearningConfig
        from ..strategies import STRATEGIES

        if not isinstance(space, Mapping):
            raise ValueError(f"search_space must map names to ranges, got {type(space).__name__}: {space!r}")
        fields = {f.name for f in dataclasses.fields(UnlearningConfig) if f.init}
        hyperparameters = set(STRATEGIES[strategy].hyperparameter_names())
        dimensions = []
        for name, spec in space.items():
            if name.startswith(STRATEGY_PREFIX):
                if name.removeprefix(STRATEGY_PREFIX) not in hyperparameters:
                    raise ValueError(
                        f"search_space {name!r}: strategy {strategy!r} has no hyperparameter "
                        f"{name.removeprefix(STRATEGY_PREFIX)!r}; it has {sorted(hyperparameters) or 'none'} "
                        f"(`erasus-hf unlearn --help-strategy {strategy}`)."
                    )
            elif name not in fields or name in ("strategy", "strategy_kwargs", "output_dir", "seed"):
                raise ValueError(
                    f"search_space {name!r} is not a value a trial can set: name an UnlearningConfig field "
                    "(learning_rate, num_train_epochs, max_steps, forget_weight, retain_weight, ...) or "
                    f"{STRATEGY_PREFIX}<hyperparameter> of {strategy!r} ({sorted(hyperparameters) or 'none'})."
                )
            dimensions.append(_dimension(name, spec))
        return cls(dimensions, strategy, base_strategy_kwargs or {})

    def __call__(self, trial: Any) -> dict[str, Any]:
        """The trial's values as `Trainer._hp_search_setup` sets them on the config: fields by name, the strategy's
        hyperparameters as one `strategy_kwargs` dict (the recipe's own, with the drawn ones replaced)."""
        values: dict[str, Any] = {}
        strategy_kwargs = dict(self.base_strategy_kwargs)
        for dimension in self.dimensions:
            value = dimension.suggest(trial)
            if dimension.name.startswith(STRATEGY_PREFIX):
                strategy_kwargs[dimension.name.removeprefix(STRATEGY_PREFIX)] = value
            else:
                values[dimension.name] = value
        if any(d.name.startswith(STRATEGY_PREFIX) for d in self.dimensions):
            values["strategy_kwargs"] = strategy_kwargs
        return values

    def apply(self, recipe: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        """`recipe` (option -> value) with a trial's `params` (optuna's names) put in."""
        out = dict(recipe)
        for name, value in params.items():
            if name.startswith(STRATEGY_PREFIX):
                out["strategy_kwargs"] = {**out.get("strategy_kwargs", {}), name.removeprefix(STRATEGY_PREFIX): value}
            else:
                out[name] = value
        return out

    def describe(self) -> list[str]:
        return [d.describe() for d in self.dimensions]


def _dimension(name: str, spec: Any) -> Dimension:
    where = f"search_space {name!r}"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be {{low: ..., high: ...}} or {{choices: [...]}}, got {spec!r}")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], (list, tuple)) or not spec["choices"]:
            raise ValueError(f"{where}: choices must be a non-empty list and come alone, got {dict(spec)!r}")
        return Dimension(name, choices=tuple(spec["choices"]))
    unknown = set(spec) - RANGE_KEYS
    if unknown or not {"low", "high"} <= set(spec):
        raise ValueError(f"{where}: a range has keys low, high (and log, step); got {sorted(spec)}")
    low, high = spec["low"], spec["high"]
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"{where}: {bound} must be a finite number, got {value!r} (YAML reads 1e-4 as a string: write 1.0e-4)"
            )
    if low >= high:
        raise ValueError(f"{where}: low ({low}) must be below high ({high})")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low}")
    return Dimension(name, low=low, high=high, log=log, step=spec.get("step"))
