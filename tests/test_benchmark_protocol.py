"""The tofu_mini benchmark's author roles: the forget and holdout authors are never training rows of the retain model,
the holdout never of either model, the retain evaluation rows are retain training rows, and the tuning authors are
none of these; every method and mode has a recipe that says how it was found."""

import pytest

from benchmarks.efficiency_benchmark import best_point
from benchmarks.tofu_mini.methods import RECIPE_DIR, methods, recipes
from benchmarks.tofu_mini.models import DEFAULT_DATA_DIR, load_splits
from benchmarks.tofu_mini.presets import PRESETS
from erasus_hf import UnlearningConfig


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason=f"needs the full TOFU files in {DEFAULT_DATA_DIR}")
@pytest.mark.parametrize("preset", ["small", "small_forget05", "large"])
def test_author_roles_are_disjoint(preset):
    settings = PRESETS[preset]
    splits = load_splits(settings, str(DEFAULT_DATA_DIR))
    train, forget, holdout = (set(d["question"]) for d in (splits.train_retain, splits.forget, splits.holdout))
    assert len(splits.train_retain) == 20 * len(settings.retain_authors)  # (TOFU repeats one question text)
    assert len(splits.holdout) == 20 * len(settings.holdout_authors)
    assert len(forget) == {"forget01": 40, "forget05": 200, "forget10": 400}[settings.forget_split]
    assert not train & forget and not train & holdout and not forget & holdout
    assert set(splits.retain_eval["question"]) <= train
    assert len(splits.retain_eval) == settings.retain_eval_rows
    if settings.tuning_authors is not None:  # searched on, never reported, and a forget group of their own
        tuning = set(splits.tuning_forget["question"])
        assert (
            len(tuning) == 20 * len(settings.tuning_authors)
            and "paraphrased_answer" in splits.tuning_forget.column_names
        )
        assert not tuning & (train | forget | holdout)
        assert not tuning & set(load_splits(PRESETS["small_forget05"], str(DEFAULT_DATA_DIR)).forget["question"])


def test_every_method_and_mode_has_a_recipe_that_says_how_it_was_found():
    found = recipes(num_layers=2)
    assert set(found) == {(name, mode) for name in methods(2) for mode in ("lora", "full")}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        text = " ".join(header)
        assert "Search space:" in text and "Trials:" in text and ("Tuning split:" in text), path.name
        if "NOT TUNED" not in text:  # a searched recipe: its trials lie beside it, its best is the recipe
            assert path.with_suffix(".trials.json").is_file(), path.name
    for (name, _), method in found.items():  # the recipe's other keys are UnlearningConfig fields
        assert UnlearningConfig(output_dir="unused", strategy=name, strategy_kwargs=method.kwargs, **method.config)


def test_best_point_is_the_first_epoch_at_the_highest_forget_quality():
    trace = [
        {"epoch": 1, "forget_quality": 0.01, "train_seconds": 1.0},
        {"epoch": 2, "forget_quality": 0.5, "train_seconds": 2.0},
        {"epoch": 3, "forget_quality": 0.5, "train_seconds": 3.0},
        {"epoch": 4, "forget_quality": 0.2, "train_seconds": 4.0},
    ]
    assert best_point(trace)["epoch"] == 2
