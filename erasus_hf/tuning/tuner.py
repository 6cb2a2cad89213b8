"""`tune`: a hyperparameter search of an unlearning run on `transformers.Trainer.hyperparameter_search` (optuna).

The trainer is an `UnlearningTrainer` built with `model_init` (a fresh starting model per trial), the forget rows
of the *tuning* split and the evaluators that give the objective's metrics (with the retain model's evaluation of
that split as the reference, for forget quality). Each trial draws its values from the `SearchSpace`, trains, and
is scored by the objective on `Trainer.evaluate()`'s metrics; the result holds every trial and the best values,
which `write_recipe` puts into a recipe for `erasus-hf unlearn`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from ..trainer import UnlearningTrainer
from .objective import UtilityFloorObjective
from .space import SearchSpace

FAILED = "failed: the loss diverged (FloatingPointError); the search went on"


@dataclass
class TuningResult:
    """Every trial of a search (number, params, objective value, the metrics it was scored on, seconds) and the
    best one; `baseline` is the starting model's evaluation, `objective` what was maximised."""

    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    baseline: dict[str, float]
    objective: dict[str, Any]
    space: list[str]
    trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    def best(self) -> dict[str, Any]:
        return next(t for t in self.trials if t["number"] == self.best_trial)


class _TrialRecorder:
    """`hp_space` and `compute_objective` for `hyperparameter_search`, keeping a record of every trial and a
    progress bar of trials (the Trainer's own bars show the steps of each)."""

    def __init__(self, trainer: UnlearningTrainer, space: SearchSpace, objective: UtilityFloorObjective, n: int):
        self.trainer, self.space, self.objective = trainer, space, objective
        self.trials: list[dict[str, Any]] = []
        self.bar = tqdm(total=n, desc="tuning trials", unit="trial", disable=trainer.args.disable_tqdm)
        self.best: float | None = None

    def hp_space(self, trial: Any) -> dict[str, Any]:
        values = self.space(trial)
        self._close_open_trial()
        self.trials.append(
            {"number": trial.number, "params": dict(trial.params), "state": "running", "start": time.perf_counter()}
        )
        return values

    def compute_objective(self, metrics: Mapping[str, float]) -> float:
        value = self.objective(metrics)
        record = self.trials[-1]
        record.update(
            state="complete",
            value=value,
            feasible=self.objective.feasible(metrics),
            strategy_kwargs=self.trainer.strategy.hyperparameters,  # what the trial's strategy was built with
            metrics={k.removeprefix("eval_"): v for k, v in metrics.items() if isinstance(v, (int, float))},
            seconds=time.perf_counter() - record["start"],
        )
        return value

    def _close_open_trial(self) -> None:
        if not self.trials:
            return
        last = self.trials[-1]
        if last["state"] == "running":  # no objective: the trial raised (only divergence is caught)
            last.update(state=FAILED, seconds=time.perf_counter() - last["start"])
        last.pop("start", None)
        value = last.get("value")
        if value is not None and (self.best is None or value > self.best):
            self.best = value
        self.bar.update(1)
        if self.best is not None:
            self.bar.set_postfix(best=f"{self.best:.3g}")

    def finish(self) -> list[dict[str, Any]]:
        self._close_open_trial()
        self.bar.close()
        return self.trials


def tune(
    trainer: UnlearningTrainer,
    space: SearchSpace,
    n_trials: int,
    objective: UtilityFloorObjective | None = None,
    seed: int = 0,
    sampler: Any = None,
) -> TuningResult:
    """Search `space` for `n_trials` trials with `trainer.hyperparameter_search` (optuna, TPE seeded with `seed`
    unless `sampler` is given) and return every trial and the best (`TuningResult`).

    The starting model (`trainer.model_init()`) is evaluated first: its utility is the objective's baseline, and an
    objective metric the evaluators do not report is refused then, before any trial trains. A trial whose loss
    diverges is recorded as failed and the search goes on."""
    import optuna

    if trainer.model_init is None:
        raise ValueError(
            "tune needs an UnlearningTrainer built with model_init=... (a fresh starting model per trial)."
        )
    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    if space.strategy != trainer.args.strategy:
        raise ValueError(f"The search space is for {space.strategy!r}, the trainer runs {trainer.args.strategy!r}.")
    objective = objective or UtilityFloorObjective()
    start = time.perf_counter()
    baseline = dict(trainer.run_metric_suite(trainer.call_model_init()).summary)
    for name in objective.names():
        objective.read(baseline, name)  # a metric the evaluators do not report: refused before any trial
    if objective.floor is not None:
        objective.baseline = objective.read(baseline, objective.utility)
    recorder = _TrialRecorder(trainer, space, objective, n_trials)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar and the Trainer's logs say what each trial did
    try:
        best = trainer.hyperparameter_search(
            hp_space=recorder.hp_space,
            compute_objective=recorder.compute_objective,
            n_trials=n_trials,
            direction="maximize",
            backend="optuna",
            sampler=sampler or optuna.samplers.TPESampler(seed=seed),
            catch=(FloatingPointError,),
        )
    except ValueError as err:
        if recorder.trials and all(t["state"] != "complete" for t in recorder.finish()):
            raise RuntimeError(f"Every one of the {n_trials} trials diverged; lower the learning rate range.") from err
        raise
    trials = recorder.finish()
    return TuningResult(
        best_trial=int(best.run_id),
        best_value=float(best.objective),
        best_params=dict(best.hyperparameters),
        baseline=baseline,
        objective={
            "metric": objective.metric,
            "utility": objective.utility if objective.floor is not None else None,
            "floor": objective.floor,
            "baseline_utility": objective.baseline,
            "utility_bound": objective.bound(),
        },
        space=space.describe(),
        trials=trials,
        seconds=time.perf_counter() - start,
    )


def write_recipe(path: str | Path, recipe: Mapping[str, Any], comment: list[str]) -> Path:
    """Write `recipe` (option -> value) as YAML under `comment` lines (`# ` added), e.g. the search that found it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" if line else "#\n" for line in comment)
    body = yaml.safe_dump(_plain(dict(recipe)), sort_keys=False, width=110)
    path.write_text(header + body)
    return path


def _plain(value: Any) -> Any:
    """YAML-safe values: enums by their value, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value
