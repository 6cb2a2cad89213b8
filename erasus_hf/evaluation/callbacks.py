"""Stop unlearning once the forget metrics reach the retain model's: more steps would only over-unlearn."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .result import EvaluationResult


class RowCheckingCallback(TrainerCallback):
    """A callback holding numbers computed on some rows (a reference run's target), which are only right on those
    rows: `MetricSuite.check` (the trainer, before training) passes it the rows its evaluators will score."""

    def check_rows(self, rows: Mapping[str, Mapping[str, Any]]) -> None:
        """Raise unless the callback's numbers hold for `rows` (set name -> `describe_rows`); nothing by default."""


class UnlearningEarlyStoppingCallback(RowCheckingCallback):
    """Stop training at the first evaluation where `metric` lies within `tolerance` of `target`.

    The target is the value a model that never saw the forget set reaches: give it as a number, or give the retain
    model's evaluation (`reference`, an `EvaluationResult` or its JSON path) and it is read from there. Examples:
    `metric="tofu/forget_truth_ratio"` (TOFU's forget truth-ratio score) or `metric="mia/min_k_plus_plus_auc"`
    (near 0.5 when the forget set looks like unseen data). Needs `eval_strategy` set and the metric among the
    trainer's evaluators; a missing metric fails with the names that were evaluated.

    A reference's target is only the right target on the rows it was computed on: `UnlearningTrainer` calls
    `check_rows` with the rows its evaluators will score before training starts, and a reference that scored other
    rows of the metric's evaluator (another forget split, another count) is refused.
    """

    def __init__(
        self,
        metric: str,
        tolerance: float,
        target: float | None = None,
        reference: EvaluationResult | str | Path | None = None,
    ) -> None:
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if (target is None) == (reference is None):
            raise ValueError("Give exactly one of target (a number) or reference (the retain model's evaluation).")
        if reference is not None:
            if isinstance(reference, (str, Path)):
                reference = EvaluationResult.load(reference)
            if metric not in reference.summary:
                raise KeyError(f"The reference evaluation has no {metric!r}; it has {sorted(reference.summary)}")
            target = reference.summary[metric]
        self.reference: EvaluationResult | None = reference
        self.metric = metric.removeprefix("eval_")
        self.tolerance = tolerance
        self.target = float(target)
        self.stopped_at: int | None = None

    def check_rows(self, rows: Mapping[str, Mapping[str, Any]]) -> None:
        """Refuse the reference unless it scored the rows `rows` describes (set name -> `describe_rows`, as
        `MetricSuite.check` gathers them) for every set of the metric's evaluator (the sets named
        ``{prefix}/...`` for a metric ``{prefix}/...``) that the reference scored too; a reference without
        fingerprints is compared by counts, with a warning. Nothing to check with a numeric `target`."""
        if self.reference is None or "/" not in self.metric:
            return
        prefix = self.metric.split("/", 1)[0]
        names = [n for n in rows if n.split("/", 1)[0] == prefix]
        if self.reference.rows:  # the sets it scored; one it did not score is not behind its target
            names = [n for n in names if n in self.reference.rows]
        self.reference.check_same_rows(rows, names, f"Early stopping on {self.metric!r}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = f"eval_{self.metric}"
        if metrics is None or key not in metrics:
            raise KeyError(f"Early stopping watches {key!r}, which was not evaluated; got {sorted(metrics or {})}")
        if abs(metrics[key] - self.target) <= self.tolerance:
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
