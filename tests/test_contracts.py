"""The contracts every registry entry keeps, checked over every registered strategy and objective.

A strategy declares its identity (`name` equal to its key, `paper`, a docstring), its hyperparameters (a
`StrategyConfig` of its own, every field with help), what it needs (`needs_reference`, `objectives`, ...) as plain
values on the class, and the hooks the trainer calls directly (no probing): a one-shot strategy has an `apply`, an
overridden hook keeps the base's parameters. An objective declares the trainer's hooks with the base's parameters.
Registering a name that is taken raises, in every registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing
from typing import Any

import pytest

import erasus_hf  # noqa: F401  registers every strategy, the pipeline and the diffusion ones included
from erasus_hf.objectives import OBJECTIVES, Objective, register_objective
from erasus_hf.registry import Registry
from erasus_hf.strategies import STRATEGIES, Strategy, get_strategy, register_strategy
from erasus_hf.strategies.config import StrategyConfig

REFERENCE_QUANTITIES = {"sequence_logprob", "scores"}
STRATEGY_HOOKS = (
    "prepare_model",
    "state_dict",
    "load_state_dict",
    "setup",
    "teardown",
    "apply",
    "alternate_answers",
    "forget_loss",
    "compute_loss",
    "needs_retain",
    "reference_quantities",
    "needs_token_scores",
)
OBJECTIVE_HOOKS = (
    "matches",
    "validate_model",
    "collator_for",
    "prepare_peft",
    "build_reference",
    "save_weights",
    "score",
    "batch_size",
)
NAMES = list(STRATEGIES)


class _WrongType:
    """A value of no hyperparameter's type."""

    def __repr__(self) -> str:
        return "<wrong type>"


def parameters(function: Any) -> list[tuple[str, Any, Any]]:
    """(name, kind, default) of each parameter; annotations may be spelled differently (a narrower type)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def mentions(message: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", message) is not None


def default_build(name: str) -> Strategy | None:
    """The strategy with its defaults, or None where a hyperparameter has none (checked by its own test)."""
    try:
        return get_strategy(name)
    except ValueError:
        return None


def test_every_room_registers_its_strategies():
    """Importing erasus_hf registers the strategies of every room, so the tests below cover all of them."""
    for name in ("ga", "npo", "rmu", "salun", "task_vector", "ensemble", "pipeline", "esd", "uce"):
        assert name in STRATEGIES, name


# ---- strategies ----


@pytest.mark.parametrize("name", NAMES)
def test_strategy_identity(name):
    cls = STRATEGIES[name]
    assert issubclass(cls, Strategy)
    assert cls.name == name
    assert isinstance(cls.paper, str) and cls.paper.strip()
    assert (cls.__dict__.get("__doc__") or "").strip(), f"{cls.__name__} has no docstring"


@pytest.mark.parametrize("name", NAMES)
def test_strategy_declares_a_typed_config_with_help(name):
    cls = STRATEGIES[name]
    owner = next(c for c in cls.__mro__ if "config_class" in c.__dict__)
    assert owner is cls or owner in STRATEGIES.values(), (
        f"{cls.__name__} inherits config_class from {owner.__name__}, which is not a registered strategy"
    )
    config_class = cls.config_class
    assert issubclass(config_class, StrategyConfig) and dataclasses.is_dataclass(config_class)
    assert not config_class.from_signature, f"{cls.__name__} has no config of its own, only its __init__ signature"
    for f in dataclasses.fields(config_class):
        help_text = f.metadata.get("help")
        assert isinstance(help_text, str) and help_text.strip(), f"{cls.__name__}.{f.name} has no help"
    assert cls.hyperparameter_names() == [f.name for f in dataclasses.fields(config_class)]


@pytest.mark.parametrize("name", NAMES)
def test_strategy_declarations_are_values(name):
    """Read on the class (the registry's listings do) and on an instance built with the defaults."""
    cls = STRATEGIES[name]
    valid_objectives = set(OBJECTIVES) | {"diffusion"}
    for holder in (cls, default_build(name)):
        if holder is None:
            continue
        assert isinstance(holder.needs_reference, frozenset)
        assert holder.needs_reference <= REFERENCE_QUANTITIES
        assert isinstance(holder.objectives, tuple) and holder.objectives
        assert set(holder.objectives) <= valid_objectives, set(holder.objectives) - valid_objectives
        for flag in ("uses_retain", "token_level", "stateful", "one_shot"):
            assert isinstance(getattr(holder, flag), bool), flag


@pytest.mark.parametrize("name", NAMES)
def test_strategy_builds_with_its_defaults(name):
    """`get_strategy(name)` builds; a hyperparameter without a default is refused by name."""
    cls = STRATEGIES[name]
    try:
        strategy = get_strategy(name)
    except ValueError as err:
        fields = cls.hyperparameter_names()
        assert any(mentions(str(err), f) for f in fields), f"{err} names none of {fields}"
        return
    assert type(strategy) is cls
    assert isinstance(strategy.config, cls.config_class)
    assert list(strategy.config.to_dict()) == cls.hyperparameter_names()
    for f in dataclasses.fields(cls.config_class):
        assert getattr(strategy, f.name) is getattr(strategy.config, f.name)


@pytest.mark.parametrize("name", NAMES)
def test_strategy_refuses_an_unknown_hyperparameter_naming_the_valid_ones(name):
    with pytest.raises(ValueError, match="no_such_hyperparameter") as info:
        get_strategy(name, no_such_hyperparameter=1)
    valid = STRATEGIES[name].hyperparameter_names()
    assert all(mentions(str(info.value), f) for f in valid) and (valid or "none" in str(info.value))


@pytest.mark.parametrize("name", NAMES)
def test_strategy_refuses_a_wrong_typed_hyperparameter_naming_it(name):
    config_class = STRATEGIES[name].config_class
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if hints.get(f.name, Any) is Any:  # every value is of its type
            continue
        with pytest.raises(ValueError) as info:
            get_strategy(name, **{f.name: _WrongType()})
        assert mentions(str(info.value), f.name) and "<wrong type>" in str(info.value), str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_strategy_hooks_are_declared_not_probed(name):
    """The trainer calls `one_shot`, `setup`, `teardown` and `apply` as declared: a one-shot strategy overrides
    `apply` and builds nothing before a loop it does not run; a strategy that tears down has set up; one that trains
    has a loss; an overridden hook keeps the base's parameters, and `__init__` takes a config positionally or the
    hyperparameters by name."""
    cls = STRATEGIES[name]
    overrides = {hook for hook in STRATEGY_HOOKS if getattr(cls, hook) is not getattr(Strategy, hook)}
    if cls.one_shot:
        assert "apply" in overrides and not cls.builds_state_before_training()
    else:
        assert "apply" not in overrides
        assert overrides & {"forget_loss", "compute_loss"}, f"{cls.__name__} has no loss"
    if "teardown" in overrides:
        assert cls.builds_state_before_training()
    assert cls.builds_state_before_training() == ("setup" in overrides)
    for hook in overrides:
        assert parameters(getattr(cls, hook)) == parameters(getattr(Strategy, hook)), f"{cls.__name__}.{hook}"
    init = inspect.signature(cls.__init__)
    init.bind(None, cls.config_class)  # self, config
    init.bind(None, **dict.fromkeys(cls.hyperparameter_names()))


# ---- objectives ----


def objective_classes() -> dict[str, type[Objective]]:
    """The registered objectives, and diffusion's, which is built from its parts instead of registered."""
    from erasus_hf.diffusion.objective import DiffusionObjective

    return {**OBJECTIVES, DiffusionObjective.name: DiffusionObjective}


@pytest.mark.parametrize("name", list(objective_classes()))
def test_objective_contract(name):
    cls = objective_classes()[name]
    assert issubclass(cls, Objective)
    assert cls.name == name
    assert cls.score is not Objective.score, f"{cls.__name__} does not override score"
    for hook in OBJECTIVE_HOOKS:
        assert parameters(getattr(cls, hook)) == parameters(getattr(Objective, hook)), f"{cls.__name__}.{hook}"
    assert isinstance(cls.cacheable_reference, bool) and isinstance(cls.supports_token_scores, bool)
    assert isinstance(cls.token_scores_note, str) and cls.token_scores_note
    assert cls.peft_task_type is None or isinstance(cls.peft_task_type, str)


# ---- a taken name raises ----


def test_a_strategy_name_cannot_be_registered_twice():
    original = STRATEGIES["npo"]

    class Twin(Strategy):
        """A second strategy under a taken name."""

        name = "npo"
        paper = "none"

    with pytest.raises(ValueError, match="'npo' is already registered"):
        register_strategy(Twin)
    assert STRATEGIES["npo"] is original


def test_an_objective_name_cannot_be_registered_twice():
    original = OBJECTIVES["causal_lm"]

    class Twin(Objective):
        name = "causal_lm"

    try:
        with pytest.raises(ValueError, match="'causal_lm' is already registered"):
            register_objective(Twin)
    finally:
        if OBJECTIVES["causal_lm"] is not original:  # a plain dict took the twin: put the real one back
            OBJECTIVES["causal_lm"] = original
    assert OBJECTIVES["causal_lm"] is original


def evaluator_registry() -> Registry | None:
    for module in ("erasus_hf.evaluation.suite", "erasus_hf.evaluation"):
        evaluators = getattr(importlib.import_module(module), "EVALUATORS", None)
        if isinstance(evaluators, Registry):
            return evaluators
    return None


def test_an_evaluator_name_cannot_be_registered_twice():
    evaluators = evaluator_registry()
    if evaluators is None:
        pytest.skip("the evaluators have no Registry yet (erasus_hf.evaluation.suite.EVALUATORS)")
    name = next(iter(evaluators))
    original = evaluators[name]
    with pytest.raises(ValueError, match=f"'{name}' is already registered"):
        evaluators.register(type("Twin", (), {}), name)
    assert evaluators[name] is original


def test_registry_lookup_names_the_valid_entries():
    registry: Registry[int] = Registry("thing")
    registry.register(1, "alpha")
    registry.register(2, "beta")
    assert registry.lookup("beta") == 2 and list(registry) == ["alpha", "beta"] and len(registry) == 2
    with pytest.raises(ValueError, match=r"Unknown thing 'alpah'; did you mean 'alpha'\? valid things: alpha, beta"):
        registry.lookup("alpah")
    with pytest.raises(ValueError, match="non-empty string name"):
        registry.register(3, "")
    assert registry.pop("alpha") == 1 and "alpha" not in registry
