"""Search each method's recipe on TOFU-mini's *tuning* authors and write it to `trainers/recipes/tofu_mini/`.

    python -m benchmarks.tofu_mini.tune --methods ce_u wga --modes lora --n_trials 10

The search (`erasus_hf.tuning.tune`: `Trainer.hyperparameter_search`, optuna TPE) unlearns the tuning authors
(188-189, 40 rows of `forget10_perturbed`) from the *tuning model* (the finetuned model's recipe on the retain and the
tuning authors) and scores each trial against the retain model, which saw neither the tuning nor the reported
authors; the reported forget authors (198-199, 190-199) are never seen by the search. The objective: the highest
forget quality among trials whose model utility keeps 0.95 of the tuning model's. Each recipe is written beside a
JSON of every trial (`<method>_<mode>.yaml`, `<method>_<mode>.trials.json`), with the search space, the trial count
and the tuning split in its header.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import datasets
import transformers

from erasus_hf import UnlearningTrainer
from erasus_hf.data.tofu import TOFUDataset
from erasus_hf.evaluation import TOFUEvaluator
from erasus_hf.tuning import SearchSpace, UtilityFloorObjective, tune, write_recipe

from .methods import RECIPE_DIR, Method, method_config, methods
from .models import add_data_options, load_splits, trained_models
from .presets import PRESETS


def search_space(method: Method, mode: str) -> dict[str, Any]:
    """Around the hand-set values of `methods.py`: the learning rate within 3x either way (log-uniform), the budget
    5-20 epochs, the retain weight 0.5-4 (methods with a retain term) and the method's main hyperparameter."""
    lr = method.lora_lr if mode == "lora" else method.full_lr
    space: dict[str, Any] = {
        "learning_rate": {"low": lr / 3, "high": lr * 3, "log": True},
        "num_train_epochs": {"choices": [5, 10, 15, 20]},
    }
    if method.retain_loss != "none":
        space["retain_weight"] = {"low": 0.5, "high": 4.0, "log": True}
    own = {
        "npo": {"beta": {"low": 0.05, "high": 0.5, "log": True}},
        "simnpo": {"beta": {"low": 1.0, "high": 5.0, "log": True}},
        "wga": {"beta": {"low": 0.3, "high": 3.0, "log": True}},
        "satimp": {"beta1": {"low": 1.0, "high": 10.0, "log": True}},
        "undial": {"beta": {"choices": [3.0, 10.0, 30.0]}},  # the paper's grid
    }.get(method.strategy, {})
    space.update({f"strategy_kwargs.{name}": spec for name, spec in own.items()})
    return space


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--modes", nargs="+", default=["lora"], choices=["lora", "full"])
    parser.add_argument("--n_trials", type=int, default=10)
    parser.add_argument("--utility_floor", type=float, default=0.95)
    parser.add_argument("--out_dir", default=str(RECIPE_DIR))
    parser.add_argument(
        "--untuned",
        action="store_true",
        help="write the hand-set values of methods.py as the recipes of --methods x --modes, without a search (for "
        "the methods not tuned yet; their header says so); an existing recipe is kept",
    )
    parser.add_argument("--quiet", action="store_true")
    add_data_options(parser)
    args = parser.parse_args(argv)
    if args.quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    preset = PRESETS["small"]
    catalogue = methods(preset.model.num_layers)
    unknown = sorted(set(args.methods) - set(catalogue))
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; the benchmark runs {sorted(catalogue)}.")
    if args.untuned:
        for name in args.methods:
            for mode in args.modes:
                path = Path(args.out_dir) / f"{name}_{mode}.yaml"
                if not path.exists():
                    write_recipe(path, recipe_of(catalogue[name], mode, preset), untuned_header(name, mode))
                    print(f"wrote {path}")
        return
    splits = load_splits(preset, args.data_dir)
    trained = trained_models(preset, splits, args.cache_dir, quiet=args.quiet)
    tokenizer, start, retain_model = trained["tokenizer"], trained["tuning"].eval(), trained["retain"].eval()
    data = TOFUDataset(forget=splits.tuning_forget, retain=splits.retain_eval, forget_split="tuning_188_189")
    evaluator = TOFUEvaluator(data, batch_size=preset.eval_batch_size, max_new_tokens=preset.max_new_tokens)
    reference = evaluator.evaluate(retain_model, tokenizer)  # the retain model never saw the tuning authors
    for name in args.methods:
        for mode in args.modes:
            method = catalogue[name]
            space_dict = search_space(method, mode)
            space = SearchSpace.from_dict(space_dict, method.strategy, method.kwargs)
            with tempfile.TemporaryDirectory() as output_dir:
                config = method_config(method, mode, preset, output_dir=output_dir, seed=0, quiet=True)
                trainer = UnlearningTrainer(
                    model_init=lambda: copy.deepcopy(start),
                    args=config,
                    forget_dataset=splits.tuning_forget.select_columns(["question", "answer"]),
                    retain_dataset=splits.train_retain if method.retain_loss != "none" else None,
                    processing_class=tokenizer,
                    evaluators=[evaluator],
                    evaluation_reference=reference,
                )
                result = tune(trainer, space, args.n_trials, UtilityFloorObjective(floor=args.utility_floor))
            stem = Path(args.out_dir) / f"{name}_{mode}"
            result.save(f"{stem}.trials.json")
            recipe = space.apply(recipe_of(method, mode, preset), result.best_params)
            best = result.best()
            complete = sum(t["state"] == "complete" for t in result.trials)
            bound = result.objective["utility_bound"]
            write_recipe(
                f"{stem}.yaml",
                recipe,
                [
                    f"TOFU-mini recipe: {name}, {'LoRA' if mode == 'lora' else 'full fine-tuning'}; found by "
                    "`python -m benchmarks.tofu_mini.tune` (erasus_hf.tuning.tune).",
                    "Tuning split: TOFU authors 188-189 (40 rows of forget10_perturbed) unlearned from the tuning "
                    "model (retain authors 0-29 + 188-189), scored against the retain model (authors 0-29); the "
                    "reported authors (198-199, 190-199) were not seen.",
                    f"Search space: {'; '.join(space.describe())}.",
                    f"Trials: {args.n_trials} ({complete} complete), optuna TPE seeded with 0; every one in "
                    f"{stem.name}.trials.json.",
                    f"Objective: the highest forget quality with model utility >= {args.utility_floor} x the "
                    f"tuning model's ({bound:.3f}); best trial #{result.best_trial}: FQ "
                    f"{best['metrics']['tofu/forget_quality']:.3g}, MU {best['metrics']['tofu/model_utility']:.3f}"
                    + ("" if best["feasible"] else " (below the floor: no trial kept it)")
                    + ".",
                ],
            )
            print(
                f"{name} {mode}: best {result.best_params} -> {best['metrics']['tofu/forget_quality']:.3g} FQ, "
                f"{best['metrics']['tofu/model_utility']:.3f} MU ({result.seconds:.0f} s)",
                flush=True,
            )


def untuned_header(name: str, mode: str) -> list[str]:
    return [
        f"TOFU-mini recipe: {name}, {'LoRA' if mode == 'lora' else 'full fine-tuning'}; NOT TUNED: the hand-set "
        "values of benchmarks/tofu_mini/methods.py (one learning rate per method and mode, the preset's 10 epochs).",
        "Search space: none. Trials: 0. Tuning split: none (`python -m benchmarks.tofu_mini.tune --methods "
        f"{name} --modes {mode}` replaces this file with a searched recipe).",
    ]


def recipe_of(method: Method, mode: str, preset) -> dict[str, Any]:
    """The recipe keys of one method and mode as the benchmark runs it (`UnlearningConfig` fields)."""
    recipe: dict[str, Any] = {
        "strategy": method.strategy,
        "strategy_kwargs": dict(method.kwargs),
        "retain_loss": method.retain_loss,
        "use_peft": mode == "lora",
    }
    if mode == "lora":
        recipe.update(lora_r=8, lora_alpha=16)
    recipe.update(
        learning_rate=method.lora_lr if mode == "lora" else method.full_lr,
        num_train_epochs=preset.unlearn_epochs,
        per_device_train_batch_size=preset.batch_size,
        lr_scheduler_type="constant",
        **method.config,
    )
    return recipe


if __name__ == "__main__":
    main()
