"""Composing strategies in one step: a weighted ensemble of per-step losses, and the attributes a composition takes
from its parts. The pipeline of stages in sequence drives trainers, so it lives above the trainer
(`erasus_hf.pipeline`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .base import Batch, PerInstance, Strategy, StrategyContext
from .config import HyperparameterError, StrategyConfig
from .registry import get_strategy, register_strategy

MemberSpec = tuple  # (name | Strategy, weight) or (name, weight, {hyperparameters})


def positional_parts(
    config: StrategyConfig | Sequence | None, hyperparameters: dict[str, Any], field_name: str
) -> tuple[StrategyConfig | None, dict[str, Any]]:
    """The config and hyperparameters of a composition built with its parts positionally (`EnsembleStrategy([...])`,
    `PipelineStrategy([...])`, as before configs existed): the list is the `field_name` hyperparameter."""
    if config is None or isinstance(config, StrategyConfig):
        return config, hyperparameters
    if field_name in hyperparameters:
        raise TypeError(f"{field_name} given twice, positionally and by name.")
    return None, {field_name: config, **hyperparameters}


def listed_parts(value: Any, field_name: str, shape: str) -> list:
    """`value`, a composition's parts (an ensemble's members, a pipeline's stages), as a list; anything but a list
    or tuple is refused naming the hyperparameter."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise HyperparameterError(
            f"hyperparameter {field_name!r} must be a list of {shape}, got {value!r} ({type(value).__name__})."
        )
    return list(value)


def shared_objectives(parts: Sequence[Strategy]) -> tuple[str, ...]:
    """The objectives every part serves, in the first part's order."""
    return tuple(o for o in parts[0].objectives if all(o in s.objectives for s in parts))


def member_spec(spec: MemberSpec | list) -> tuple[Any, float, dict[str, Any]]:
    """`spec` as (strategy, weight, hyperparameters), the weight a finite float."""
    if len(spec) == 2:
        (strategy, weight), kwargs = spec, {}
    elif len(spec) == 3:
        strategy, weight, kwargs = spec
    else:
        raise ValueError(f"An ensemble member is (name, weight) or (name, weight, hyperparameters), got {spec!r}")
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight):
        raise ValueError(f"An ensemble member's weight must be a finite number, got {spec[1]!r} in {spec!r}.")
    return strategy, weight, dict(kwargs or {})


@dataclass
class EnsembleConfig(StrategyConfig):
    members: list[MemberSpec] = field(
        default_factory=list,
        metadata={
            "help": "The members, each [name, weight] or [name, weight, {hyperparameters}] (a Strategy instance "
            "may stand for the name); at least one, distinct strategies, finite weights. No default: an ensemble "
            "is its members."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        members = listed_parts(self.members, "members", "[name, weight] or [name, weight, {hyperparameters}]")
        if not members:
            raise ValueError(
                "EnsembleStrategy needs at least one (strategy, weight) member (members=[[name, weight]])."
            )
        self.members = [member_spec(spec) for spec in members]


@register_strategy
class EnsembleStrategy(Strategy):
    """Weighted sum of several strategies' losses in one step: L = sum_i w_i L_i, each L_i with its own retain term.

    `EnsembleStrategy([("npo", 1.0), ("rmu", 0.5, {"layer_id": 7})])`, or from a config:
    `strategy="ensemble", strategy_kwargs={"members": [["npo", 1.0], ["simnpo", 0.5, {"beta": 3.0}]]}`.
    Members share forward passes: the step's context scores each batch once. Metrics are logged per member as
    `{name}/{metric}`. Needs what any member needs (retain set, reference quantities); serves the objectives all
    members serve. `members` holds the built (strategy, weight) pairs (`config.members` the specs).
    """

    name = "ensemble"
    paper = "composition of the members' papers"
    config_class = EnsembleConfig

    def __init__(self, config: EnsembleConfig | Sequence[MemberSpec] | None = None, /, **hyperparameters: Any) -> None:
        config, hyperparameters = positional_parts(config, hyperparameters, "members")
        super().__init__(config, **hyperparameters)
        self.members = [(get_strategy(s, **kwargs), weight) for s, weight, kwargs in self.config.members]
        names = [s.name for s, _ in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"Ensemble members must be distinct strategies, got {names}")
        stateful = [s.name for s, _ in self.members if s.one_shot or s.builds_state_before_training()]
        if stateful:
            raise ValueError(
                f"Ensemble members add per-step losses; {stateful} are one-shot edits or build state before training "
                "(a saliency mask, a teacher, a schedule): run them alone or as StrategyPipeline stages."
            )

    @property
    def parts(self) -> list[Strategy]:
        return [s for s, _ in self.members]

    needs_reference = PerInstance(lambda self: frozenset().union(*(s.needs_reference for s in self.parts)))
    uses_retain = PerInstance(lambda self: any(s.uses_retain for s in self.parts))
    token_level = PerInstance(lambda self: any(s.token_level for s in self.parts))
    stateful = PerInstance(lambda self: any(s.stateful for s in self.parts))  # e.g. PDU's dual variable
    objectives = PerInstance(lambda self: shared_objectives(self.parts))

    @property
    def hyperparameters(self) -> dict[str, object]:
        return {"members": [[s.name, w, s.hyperparameters] for s, w in self.members]}

    def needs_retain(self, retain_loss_name: str) -> bool:
        return any(s.needs_retain(retain_loss_name) for s, _ in self.members)

    def reference_quantities(self, retain_loss_name: str) -> frozenset[str]:
        return frozenset().union(*(s.reference_quantities(retain_loss_name) for s, _ in self.members))

    def state_dict(self) -> dict[str, Any]:
        """The members' states, keyed `{member name}.{key}`."""
        return {f"{s.name}.{key}": value for s, _ in self.members for key, value in s.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        members = {s.name: s for s, _ in self.members}
        unknown = sorted(key for key in state if key.partition(".")[0] not in members)
        if unknown:
            raise ValueError(f"Ensemble state for members it does not have: {unknown[:5]} (members: {list(members)})")
        for name, strategy in members.items():
            prefix = f"{name}."
            strategy.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})

    def prepare_model(self, model: nn.Module) -> None:
        for strategy, _ in self.members:
            strategy.prepare_model(model)

    def alternate_answers(self, forget, seed: int) -> list[str] | None:
        for strategy, _ in self.members:
            answers = strategy.alternate_answers(forget, seed)
            if answers is not None:
                return answers
        return None

    def compute_loss(self, ctx: StrategyContext, forget: Batch, retain: Batch | None):
        total, metrics = 0.0, {}
        for strategy, weight in self.members:
            loss, member_metrics = strategy.compute_loss(ctx, forget, retain)
            total = total + weight * loss
            metrics[f"{strategy.name}/loss"] = loss.detach()
            metrics.update({f"{strategy.name}/{k}": v for k, v in member_metrics.items()})
        return total, metrics
