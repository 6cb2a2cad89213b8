"""What a tuning run maximises, computed from the metrics of `Trainer.evaluate()` after each trial.

The default is TOFU's goal: the highest forget quality among trials whose model utility keeps at least `floor`
(0.95) of the starting model's. A trial below the floor scores `utility / (floor * baseline) - 1` (negative: below
every trial that keeps the floor, and closer to 0 the nearer it came), so the search still learns which way utility
lies. `floor=None` maximises `metric` alone (e.g. `combined_score`, the geometric mean of forget quality and model
utility).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class UtilityFloorObjective:
    """Maximise `metric` subject to `utility >= floor * baseline` (`baseline`: the starting model's utility)."""

    baseline: float | None = None
    floor: float | None = 0.95
    metric: str = "tofu/forget_quality"
    utility: str = "tofu/model_utility"

    def __post_init__(self) -> None:
        if self.floor is not None and not 0 < self.floor <= 1:
            raise ValueError(f"utility_floor must lie in (0, 1], got {self.floor} (e.g. 0.95: 95% of the start)")

    def names(self) -> list[str]:
        """The summary metrics the objective reads."""
        return [self.metric] + ([self.utility] if self.floor is not None else [])

    def bound(self) -> float | None:
        """The utility a trial must keep; None when unconstrained."""
        if self.floor is None:
            return None
        if self.baseline is None:
            raise ValueError("The utility floor needs the starting model's utility (baseline); none was measured.")
        return self.floor * self.baseline

    def read(self, metrics: Mapping[str, float], name: str) -> float:
        for key in (f"eval_{name}", name):
            if key in metrics:
                return float(metrics[key])
        raise KeyError(
            f"The tuning objective reads {name!r}, which the evaluation did not report; it reported "
            f"{sorted(k.removeprefix('eval_') for k in metrics)}. Choose an evaluator that computes it (forget "
            "quality needs the retain model's evaluation as the reference)."
        )

    def __call__(self, metrics: Mapping[str, float]) -> float:
        value = self.read(metrics, self.metric)
        bound = self.bound()
        if bound is None:
            return value
        utility = self.read(metrics, self.utility)
        return value if utility >= bound else utility / bound - 1.0

    def feasible(self, metrics: Mapping[str, float]) -> bool:
        bound = self.bound()
        return bound is None or self.read(metrics, self.utility) >= bound
