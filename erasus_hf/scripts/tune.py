"""`erasus-hf tune`: search an unlearning recipe's hyperparameters on a tuning forget set and write the best recipe.

    erasus-hf tune --config RECIPE.yaml --n_trials 20
    erasus-hf tune --config trainers/recipes/tofu_tiny_npo_lora.yaml --n_trials 8 \\
        --search_space '{"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": true}}' \\
        --reference_eval retain_model_eval.json --output_dir outputs/tune_npo

The recipe is an `erasus-hf unlearn` recipe (its rows are the *tuning* forget set: tune on forget rows that are not
the ones you will report) with `search_space` added. Each trial trains from a fresh copy of the starting model
(`UnlearningTrainer(model_init=...)` and `Trainer.hyperparameter_search`, optuna's TPE sampler seeded with
`--seed`) and is scored on the recipe's evaluation: by default the highest TOFU forget quality (which needs
`--reference_eval`, the retain model's evaluation of the same forget rows) among trials whose model utility keeps
`--utility_floor` (0.95) of the starting model's. The output folder gets `trials.json` (every trial: its values,
objective, metrics, seconds) and `best_recipe.yaml`, the recipe with the best values, runnable with
`erasus-hf unlearn --config`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import UnlearningConfig, json_dict
from ..data.formats import RowFormatError
from ..data.loading import one_line
from ..model_source import load_causal_lm
from ..trainer import UnlearningTrainer
from ..tuning import SearchSpace, TuningResult, UtilityFloorObjective, tune, write_recipe
from .parsing import UsageError
from .unlearn import UnlearnArguments, prepare_run

DESCRIPTION = __doc__.split("\n\n")[0]


@dataclass
class TuneArguments:
    search_space: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'What each trial draws, as JSON or a recipe mapping: {"learning_rate": {"low": 1.0e-4, "high": '
            '1.0e-2, "log": true}, "num_train_epochs": {"choices": [5, 10]}, "strategy_kwargs.beta": {...}}. Names '
            "are UnlearningConfig fields or strategy_kwargs.<hyperparameter> (see --help-strategy). Required."
        },
    )
    n_trials: int = field(default=20, metadata={"help": "Trials to run (each one a full unlearning run)."})
    objective_metric: str = field(
        default="tofu/forget_quality",
        metadata={
            "help": "The evaluation metric to maximise: tofu/forget_quality (needs --reference_eval), "
            "combined_score (sqrt(forget quality x model utility); use with --utility_floor 0), or any summary "
            "metric of the recipe's evaluation."
        },
    )
    utility_metric: str = field(
        default="tofu/model_utility", metadata={"help": "The utility the floor is set on (e.g. muse/knowmem_retain)."}
    )
    utility_floor: float = field(
        default=0.95,
        metadata={
            "help": "The fraction of the starting model's utility a trial must keep to count (0: no floor). A trial "
            "below it scores utility/(floor x starting utility) - 1 < 0, under every trial above it."
        },
    )


TUNE_KEYS = {f.name for f in dataclasses.fields(TuneArguments)}


def given_options(argv: list[str]) -> set[str]:
    """The option names given as flags in `argv` (`--name value`, `--name=value`, `--no_name`)."""
    names = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            names.add(name.removeprefix("no_") if name.startswith("no_") else name)
    return names


def recipe_of(argv: list[str], parsed: tuple[Any, ...]) -> dict[str, Any]:
    """The run's recipe as given: the `--config` file's keys and the flags given, with their parsed values; the
    tuning options left out."""
    from .parsing import yaml_recipe

    recipe = yaml_recipe(argv)
    for name in given_options(argv) - {"config"}:
        for output in parsed:
            if hasattr(output, name):
                recipe[name] = getattr(output, name)
    return {k: v for k, v in recipe.items() if k not in TUNE_KEYS}


def run_tune(
    args: UnlearnArguments, config: UnlearningConfig, tuning: TuneArguments, argv: list[str] | None = None
) -> TuningResult:
    """Check everything, then search; writes `trials.json` and `best_recipe.yaml` into `config.output_dir`."""
    if tuning.search_space is None:
        raise UsageError("--search_space is required: the values each trial draws (see --help).")
    try:
        space = SearchSpace.from_dict(
            json_dict(tuning.search_space, "search_space"), config.strategy, config.strategy_kwargs
        )
        objective = UtilityFloorObjective(
            floor=tuning.utility_floor or None, metric=tuning.objective_metric, utility=tuning.utility_metric
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    if tuning.n_trials < 1:
        raise UsageError(f"--n_trials must be at least 1, got {tuning.n_trials}")
    if not args.run_evaluation:
        raise UsageError("--run_evaluation false leaves the trials nothing to be scored on; drop it.")
    try:
        import optuna  # noqa: F401
    except ImportError as err:
        raise UsageError("erasus-hf tune searches with optuna: pip install optuna (or erasus_hf[tune]).") from err
    if not args.reference_eval and "forget_quality" in objective.metric:
        raise UsageError(
            f"--objective_metric {objective.metric} compares with the retain model: pass --reference_eval "
            "(`erasus-hf evaluate` of a model that never saw the tuning forget rows, on the same rows)."
        )
    data, evaluators, model, tokenizer = prepare_run(args, config)
    if isinstance(model, str):
        path, kwargs = model, config.model_init_kwargs
        config.model_init_kwargs = None  # loaded by model_init, not by the trainer

        def model_init():
            return load_causal_lm(path, tokenizer, kwargs)[0]
    else:

        def model_init():
            return copy.deepcopy(model)

    try:
        trainer = UnlearningTrainer(
            model_init=model_init,
            args=config,
            forget_dataset=data.forget,
            retain_dataset=data.retain,
            processing_class=tokenizer,
            evaluators=evaluators,
            evaluation_data=data.evaluation,
            evaluation_reference=args.reference_eval,
        )
    except RowFormatError as err:
        raise UsageError(one_line(err)) from err
    result = tune(trainer, space, tuning.n_trials, objective, seed=config.seed)
    out = config.output_dir
    result.save(os.path.join(out, "trials.json"))
    recipe = space.apply(recipe_of(argv or [], (args, config)), result.best_params)
    recipe["output_dir"] = os.path.join(out, "best_run")
    complete = sum(t["state"] == "complete" for t in result.trials)
    bound = objective.bound()
    floor = f" with {objective.utility} >= {objective.floor} x the starting model's ({bound:.4g})" if bound else ""
    comment = [
        "Found by `erasus-hf tune`: run it with `erasus-hf unlearn --config` (on the forget rows you report).",
        f"Objective: maximise {objective.metric}{floor}; best trial #{result.best_trial}: {result.best_value:.4g}.",
        f"Search space: {'; '.join(space.describe())}.",
        f"Trials: {tuning.n_trials} ({complete} complete), optuna TPE seeded with {config.seed}; every one in "
        f"{os.path.join(out, 'trials.json')}.",
        f"Tuning split: forget {data.sources.get('forget', 'rows given')}"
        + (f"; retain {data.sources['retain']}" if "retain" in data.sources else "")
        + (f"; reference {args.reference_eval}" if args.reference_eval else "")
        + ".",
    ]
    write_recipe(os.path.join(out, "best_recipe.yaml"), recipe, comment)
    best = result.best()
    print(json.dumps({"best_trial": result.best_trial, "value": result.best_value, "params": result.best_params}))
    print(
        f"best of {tuning.n_trials} trials: #{result.best_trial} {objective.metric} "
        f"{best['metrics'].get(objective.metric, float('nan')):.4g}, {objective.utility} "
        f"{best['metrics'].get(objective.utility, float('nan')):.4g}; wrote {out}/best_recipe.yaml and trials.json"
    )
    return result
