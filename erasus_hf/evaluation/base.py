"""`Evaluator`: the declared interface of an evaluation, and `EVALUATORS`, the evaluators `MetricSuite` builds by name.

An evaluator scores one model (`evaluate`), says which rows it scores (`rows`, what a later run's reference check
compares) and refuses a reference run that cannot serve its comparisons (`check_reference`), before any forward
pass. `MetricSuite` and `UnlearningTrainer` call these directly. An object that does not subclass `Evaluator` but has
a `name` and `evaluate(model, tokenizer, reference=None)` still runs: the suite gives it the declared defaults (no
rows, nothing to check), whatever else it defines.

The built-in evaluators register themselves with `@register_evaluator("tofu")` and build themselves from the data given
to `MetricSuite.run` (`from_suite_data`). The registered name is the suite's name for the evaluator; an instance's
`name` is the prefix of its metric names, which a user may change (two TOFU evaluators side by side).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..registry import Registry
from .result import EvaluationResult


class Evaluator:
    """One evaluation of a model: its metrics land under ``{name}/...`` in an `EvaluationResult`."""

    name: str  # the prefix of the metric names

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """Score `model`; `reference` is the retain model's run, read by metrics that compare with one."""
        raise NotImplementedError

    def rows(self) -> dict[str, dict]:
        """The rows it scores, set name (``"tofu/forget"``) -> `describe_rows(...)`; none by default."""
        return {}

    def check_reference(self, reference: EvaluationResult) -> None:
        """Raise unless `reference` can serve this evaluator's comparisons (no forward pass); nothing by default."""

    @classmethod
    def from_suite_data(cls, data: SuiteData, **options: Any) -> Evaluator:
        """The evaluator on the data given to `MetricSuite.run`, with `options` (`MetricSuite(options={name: ...})`);
        registered evaluators implement it."""
        raise NotImplementedError(f"{cls.__name__} cannot be built by name; pass an instance to MetricSuite.")


@dataclass(frozen=True)
class SuiteData:
    """The data given to `MetricSuite.run` (``tofu``, ``muse``, ``forget``, ``retain``, ``holdout``), as the evaluator
    registered as `evaluator` is built from it."""

    evaluator: str
    values: Mapping[str, Any]

    def get(self, key: str) -> Any:
        """`key`'s data, or None when it was not given."""
        return self.values.get(key)

    def need(self, *keys: str) -> list[Any]:
        """The data of `keys`, in order; raises naming the ones missing."""
        missing = [k for k in keys if self.get(k) is None]
        if missing:
            raise ValueError(f"The {self.evaluator!r} evaluator needs {missing} passed to MetricSuite.run.")
        return [self.values[k] for k in keys]


EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")
"""The evaluators `MetricSuite` builds by name, in registration order (tofu, muse, mia, memorization)."""

E = TypeVar("E", bound=type[Evaluator])


def register_evaluator(name: str) -> Callable[[E], E]:
    """Class decorator: make an `Evaluator` subclass available to `MetricSuite` as `name`; a taken name raises."""

    def register(cls: E) -> E:
        return EVALUATORS.register(cls, name)

    return register


def check_at_least_one(**values: int) -> None:
    """Raise for the first of `values` (option name -> value) below 1."""
    for option, value in values.items():
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")


def check_fraction(k: float) -> None:
    """Raise unless `k` (a Min-K% fraction) lies in (0, 1]."""
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")
