"""Stop a run whose loss runs away (`UnlearningConfig.divergence_factor`).

Gradient ascent at a high learning rate can drive the retain NLL from 5.7 to 9e6 while every step stays finite:
the non-finite guards never fire and the run ends with a model that only looks finished. `DivergenceCallback` ends
such a run at the first optimizer step where the watched loss passes `factor` times its starting value, by raising
`TrainingDivergedError` out of `trainer.train()`: the code after `train()` (`save_model`, `push_to_hub`) does not
run, so nothing is written as if it were a finished run. Checkpoints saved at earlier steps stay in their
`checkpoint-*` folders (the check runs at the end of each step, before that step's save).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from transformers import TrainerCallback

# What is watched, first match (an ensemble's members log `name/retain_loss`, ...): a run's retain term (NLL, KL,
# RMU's activation MSE, ...); without one, the strategy's forget term (`Strategy.compute_loss` logs forget_loss).
# Both are minimised, so a term growing many times over is the optimisation running away (GA's forget term, -NLL,
# falls without bound by design and never trips).
WATCHED = ("retain_loss", "forget_loss")


class TrainingDivergedError(RuntimeError):
    """Training stopped because the watched loss passed `divergence_factor` times its starting value."""


class DivergenceCallback(TrainerCallback):
    """Raise `TrainingDivergedError` at the end of the first step whose watched loss exceeds
    `factor * max(|start|, 1)`.

    `metrics` is the trainer's store of this logging window's per-step training values, or a function returning it
    (`UnlearningTrainer._gathered_metrics("train")`: it gathers the steps it keeps on the device when asked), each
    value averaged across processes, so every process stops at the same step; `start` is
    the first value seen, the loss of the starting model. A start counted as at least 1 keeps a term that starts at
    0 (the retain KL to the reference, RMU's retain MSE) from tripping at once: it has to pass `factor` itself.
    """

    def __init__(
        self,
        factor: float,
        metrics: Mapping[str, Sequence[float]] | Callable[[], Mapping[str, Sequence[float]]],
        watched: Sequence[str] = WATCHED,
    ):
        if not factor > 1:
            raise ValueError(f"divergence_factor must be > 1, got {factor!r}")
        self.factor = factor
        self._metrics = metrics
        self.watched = tuple(watched)
        self.keys: list[str] = []  # `retain_loss`, or an ensemble's members' `npo/retain_loss`, ...
        self.start: dict[str, float] = {}

    @property
    def metrics(self) -> Mapping[str, Sequence[float]]:
        """The store, read now: a callable (the trainer's, which gathers the steps it keeps on the device) is asked
        at each read."""
        return self._metrics() if callable(self._metrics) else self._metrics

    def _watched_keys(self, metrics: Mapping[str, Sequence[float]]) -> list[str]:
        for name in self.watched:
            keys = sorted(k for k in metrics if (k == name or k.endswith("/" + name)) and metrics[k])
            if keys:
                return keys
        return []

    def on_step_end(self, args, state, control, **kwargs):
        metrics = self.metrics
        self.keys = self.keys or self._watched_keys(metrics)
        for key in self.keys:
            values = metrics.get(key) or ()
            if not values:
                continue
            start = self.start.setdefault(key, values[0])
            limit = self.factor * max(abs(start), 1.0)
            worst = max(values)
            if worst > limit:
                raise TrainingDivergedError(
                    f"Training diverged at step {state.global_step}: {key} = {worst:.6g}, more than "
                    f"divergence_factor={self.factor:g} x max(|start|, 1) = {limit:.6g} (its starting value was "
                    f"{start:.6g}). Training stopped; no final model was saved (checkpoints from earlier steps, if "
                    "any, stay in output_dir/checkpoint-*). Lower the learning rate, raise retain_weight, or set "
                    "divergence_factor higher (None turns the check off)."
                )
        return control
