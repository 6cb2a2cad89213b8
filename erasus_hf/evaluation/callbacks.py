"""Stop unlearning once the forget metrics reach the retain model's: more steps would only over-unlearn."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .result import EvaluationResult


class UnlearningEarlyStoppingCallback(TrainerCallback):
    """Stop training at the first evaluation where `metric` lies within `tolerance` of `target`.

    The target is the value a model that never saw the forget set reaches: give it as a number, or give the retain
    model's evaluation (`reference`, an `EvaluationResult` or its JSON path) and it is read from there. Examples:
    `metric="tofu/forget_truth_ratio"` (TOFU's forget truth-ratio score) or `metric="mia/min_k_plus_plus_auc"`
    (near 0.5 when the forget set looks like unseen data). Needs `eval_strategy` set and the metric among the
    trainer's evaluators; a missing metric fails with the names that were evaluated.
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
        self.metric = metric.removeprefix("eval_")
        self.tolerance = tolerance
        self.target = float(target)
        self.stopped_at: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = f"eval_{self.metric}"
        if metrics is None or key not in metrics:
            raise KeyError(f"Early stopping watches {key!r}, which was not evaluated; got {sorted(metrics or {})}")
        if abs(metrics[key] - self.target) <= self.tolerance:
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
