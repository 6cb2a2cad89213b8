"""The tuner (`erasus_hf.tuning`, `erasus-hf tune`): trials of `Trainer.hyperparameter_search` each unlearn from a
fresh starting model with the strategy built from the trial's hyperparameters; the utility-floor objective by hand;
the search space's refusals; the command end to end on the shipped TOFU slice."""

from __future__ import annotations

import copy
import json
import math

import optuna
import pytest
import yaml

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.cli import main
from erasus_hf.data.tofu import TOFUDataset, demo_splits
from erasus_hf.evaluation import TOFUEvaluator
from erasus_hf.evaluation.suite import MetricSuite
from erasus_hf.scripts.parsing import make_parser, parse
from erasus_hf.scripts.unlearn import UnlearnArguments
from erasus_hf.tuning import SearchSpace, UtilityFloorObjective, tune

from .testing_utils import qa

pytestmark = pytest.mark.slow


def _tofu_trainer(memorised, tiny_llama, tokenizer, tofu_slice, tmp_path) -> UnlearningTrainer:
    """NPO + LoRA on the memorised model, scored by TOFU (no ROUGE) on 8 forget and 8 retain rows against a model
    that never saw the forget rows (the random tiny Llama) as the reference."""
    forget, retain = tofu_slice
    data = TOFUDataset(forget=forget.select(range(8)), retain=retain.select(range(8)), forget_split="demo")
    evaluator = TOFUEvaluator(data, rouge=False, batch_size=8)
    reference = evaluator.evaluate(tiny_llama, tokenizer)
    args = UnlearningConfig(
        output_dir=str(tmp_path / "tune"),
        strategy="npo",
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        num_train_epochs=10,
        per_device_train_batch_size=8,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=100,
    )

    def model_init():  # the memorised model as it was, every trial (the adapter is added into the model it gets)
        return copy.deepcopy(memorised)

    return UnlearningTrainer(
        model_init=model_init,
        args=args,
        forget_dataset=qa(forget),
        retain_dataset=qa(retain),
        processing_class=tokenizer,
        evaluators=[evaluator],
        evaluation_reference=reference,
    )


def test_each_trial_unlearns_a_fresh_start_with_its_own_hyperparameters(
    memorised, tiny_llama, tokenizer, tofu_slice, tmp_path
):
    trainer = _tofu_trainer(memorised, tiny_llama, tokenizer, tofu_slice, tmp_path)
    space = SearchSpace.from_dict(
        {"learning_rate": {"choices": [1e-2]}, "strategy_kwargs.beta": {"choices": [0.1, 5.0]}}, "npo"
    )
    # TPE seeded with 0 draws beta 5.0, 0.1, 5.0: the middle trial follows an unlearned one, the last repeats the first
    result = tune(trainer, space, n_trials=3, objective=UtilityFloorObjective(floor=0.5), seed=0)

    trials = result.trials
    assert [t["state"] for t in trials] == ["complete"] * 3
    assert [t["params"]["strategy_kwargs.beta"] for t in trials] == [5.0, 0.1, 5.0]
    for t in trials:  # the strategy that trained was built from the trial's beta, not the recipe's (0.1)
        assert t["strategy_kwargs"]["beta"] == t["params"]["strategy_kwargs.beta"]
    forget_prob = [t["metrics"]["tofu/forget_prob"] for t in trials]
    # beta 0.1 (NPO's TOFU setting) unlearns: the forget answers lose most of their probability (0.99 -> 0.001 when
    # measured); beta 5 saturates NPO's weight early and keeps more of it (0.84 measured)
    assert forget_prob[1] < 0.5 * result.baseline["tofu/forget_prob"]
    assert forget_prob[0] > forget_prob[1] + 0.2
    # the same values from the same fresh start end the same: the third trial did not start where the second ended
    assert forget_prob[2] == pytest.approx(forget_prob[0], abs=1e-6)
    values = [t["value"] for t in trials]
    assert result.best_value == max(values)
    assert result.best_params == trials[values.index(max(values))]["params"]
    assert result.objective["baseline_utility"] == result.baseline["tofu/model_utility"]


def test_the_objective_is_forget_quality_above_the_utility_floor_by_hand():
    objective = UtilityFloorObjective(baseline=0.8, floor=0.95)  # the bound: 0.76
    assert objective({"eval_tofu/forget_quality": 0.3, "eval_tofu/model_utility": 0.77}) == 0.3
    below = objective({"eval_tofu/forget_quality": 0.9, "eval_tofu/model_utility": 0.7})
    assert below == pytest.approx(0.7 / 0.76 - 1)  # -0.0789: under every trial that keeps the floor
    assert objective({"eval_tofu/forget_quality": 0.0, "eval_tofu/model_utility": 0.76}) == 0.0
    unconstrained = UtilityFloorObjective(floor=None, metric="combined_score")
    assert unconstrained({"eval_combined_score": 0.42}) == 0.42
    with pytest.raises(KeyError, match="forget quality needs the retain model's evaluation"):
        objective({"eval_tofu/model_utility": 0.8})
    with pytest.raises(ValueError, match="utility_floor must lie in"):
        UtilityFloorObjective(floor=1.5)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"learning_rat": {"low": 1e-4, "high": 1e-2}}, "'learning_rat' is not a value a trial can set"),
        ({"strategy_kwargs.gamma": {"low": 0.1, "high": 1.0}}, "strategy 'npo' has no hyperparameter 'gamma'"),
        ({"learning_rate": {"low": 1e-2, "high": 1e-4}}, "low \\(0.01\\) must be below high"),
        ({"learning_rate": {"low": "1e-4", "high": 1e-2}}, "write 1.0e-4"),
        ({"learning_rate": {"low": 0.0, "high": 1e-2, "log": True}}, "a log range needs low > 0"),
        ({"num_train_epochs": {"choices": []}}, "choices must be a non-empty list"),
        ({"seed": {"choices": [0, 1]}}, "'seed' is not a value a trial can set"),
        ({}, "The search space is empty"),
    ],
)
def test_a_bad_search_space_is_refused_naming_the_entry(space, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace.from_dict(space, "npo")


def test_a_trial_draws_fields_and_strategy_hyperparameters_over_the_recipes_own():
    space = SearchSpace.from_dict(
        {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "strategy_kwargs.beta": {"choices": [0.5]}},
        "npo",
        {"beta": 0.1, "alpha": 2.0},
    )
    values = space(optuna.trial.FixedTrial({"learning_rate": 2e-3, "strategy_kwargs.beta": 0.5}))
    assert values == {"learning_rate": 2e-3, "strategy_kwargs": {"beta": 0.5, "alpha": 2.0}}
    recipe = space.apply(
        {"strategy_kwargs": {"beta": 0.1}, "seed": 0}, {"learning_rate": 2e-3, "strategy_kwargs.beta": 0.5}
    )
    assert recipe == {"strategy_kwargs": {"beta": 0.5}, "seed": 0, "learning_rate": 2e-3}


def _cli_recipe(tmp_path, saved_model, tokenizer) -> tuple[str, str]:
    """A tune recipe on the shipped slice from the saved tiny Llama, and the reference: that same model's TOFU
    evaluation of the 4 forget and retain rows the command evaluates."""
    forget, retain = demo_splits(2)
    data = TOFUDataset(forget=forget, retain=retain, forget_split="demo").select(4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved_model)
    reference = MetricSuite(["tofu"]).run(model, tokenizer, tofu=data)
    reference_path = tmp_path / "retain_eval.json"
    reference.save(reference_path)
    recipe = {
        "model_name_or_path": str(saved_model),
        "dataset": "demo",
        "num_retain_authors": 2,
        "eval_max_examples": 4,
        "reference_eval": str(reference_path),
        "strategy": "npo",
        "use_peft": True,
        "lora_r": 4,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "save_strategy": "no",
        "report_to": "none",
        "search_space": {"learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path), str(reference_path)


def test_tune_command_writes_every_trial_and_a_best_recipe_unlearn_accepts(tmp_path, saved_model, tokenizer):
    config, reference = _cli_recipe(tmp_path, saved_model, tokenizer)
    out = tmp_path / "out"
    assert (
        main(["tune", "--config", config, "--n_trials", "2", "--output_dir", str(out), "--disable_tqdm", "true"]) == 0
    )

    trials = json.loads((out / "trials.json").read_text())
    assert [t["state"] for t in trials["trials"]] == ["complete", "complete"]
    lrs = [t["params"]["learning_rate"] for t in trials["trials"]]
    assert all(1e-3 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]
    best = max(trials["trials"], key=lambda t: t["value"])
    assert trials["best_params"] == best["params"] and trials["objective"]["floor"] == 0.95
    assert math.isclose(trials["objective"]["utility_bound"], 0.95 * trials["baseline"]["tofu/model_utility"])

    text = (out / "best_recipe.yaml").read_text()
    assert "# Objective: maximise tofu/forget_quality with tofu/model_utility >= 0.95" in text
    assert "# Search space: learning_rate log-uniform [0.001, 0.01]." in text
    assert "# Trials: 2 (2 complete), optuna TPE seeded with 42" in text  # the Trainer's default seed
    assert f"reference {reference}" in text
    recipe = yaml.safe_load(text)
    assert recipe["learning_rate"] == best["params"]["learning_rate"] and "search_space" not in recipe
    from erasus_hf.config import UnlearningConfig as Config

    parser = make_parser((UnlearnArguments, Config), "erasus-hf unlearn", "")
    args, parsed = parse(parser, ["--config", str(out / "best_recipe.yaml")], "causal_lm")
    assert parsed.learning_rate == best["params"]["learning_rate"] and args.reference_eval == reference


def test_tune_refuses_a_bad_space_in_one_line_before_any_compute(tmp_path, saved_model, tokenizer, capsys):
    config, _ = _cli_recipe(tmp_path, saved_model, tokenizer)
    out = tmp_path / "out"
    capsys.readouterr()  # the reference's loading bars
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--config", config, "--output_dir", str(out), "--search_space", '{"lr": {"choices": [1]}}'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("erasus-hf: error: search_space 'lr' is not a value a trial can set") and err.count("\n") == 1
    )
    assert not out.exists()
