"""Composing strategies: a weighted ensemble in one step, and a pipeline of stages in sequence."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from .base import Batch, Strategy, StrategyContext
from .registry import get_strategy, register_strategy

MemberSpec = tuple  # (name | Strategy, weight) or (name, weight, {hyperparameters})


def _member(spec: MemberSpec | list) -> tuple[Strategy, float]:
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
    return get_strategy(strategy, **(kwargs or {})), weight


@register_strategy
class EnsembleStrategy(Strategy):
    """Weighted sum of several strategies' losses in one step: L = sum_i w_i L_i, each L_i with its own retain term.

    `EnsembleStrategy([("npo", 1.0), ("rmu", 0.5, {"layer_id": 7})])`, or from a config:
    `strategy="ensemble", strategy_kwargs={"members": [["npo", 1.0], ["simnpo", 0.5, {"beta": 3.0}]]}`.
    Members share forward passes: the step's context scores each batch once. Metrics are logged per member as
    `{name}/{metric}`. Needs what any member needs (retain set, reference quantities); serves the objectives all
    members serve.
    """

    name = "ensemble"
    paper = "composition of the members' papers"

    def __init__(self, members: Sequence[MemberSpec] = ()) -> None:
        if not members:
            raise ValueError("EnsembleStrategy needs at least one (strategy, weight) member.")
        self.members = [_member(spec) for spec in members]
        names = [s.name for s, _ in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"Ensemble members must be distinct strategies, got {names}")
        stateful = [s.name for s, _ in self.members if s.one_shot or s.builds_state_before_training()]
        if stateful:
            raise ValueError(
                f"Ensemble members add per-step losses; {stateful} are one-shot edits or build state before training "
                "(a saliency mask, a teacher, a schedule): run them alone or as StrategyPipeline stages."
            )
        self.needs_reference = frozenset().union(*(s.needs_reference for s, _ in self.members))
        self.uses_retain = any(s.uses_retain for s, _ in self.members)
        self.token_level = any(s.token_level for s, _ in self.members)
        self.stateful = any(s.stateful for s, _ in self.members)  # e.g. PDU's dual variable
        self.objectives = tuple(
            o for o in self.members[0][0].objectives if all(o in s.objectives for s, _ in self.members)
        )

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


class StrategyPipeline:
    """Stages in sequence: each starts from the previous stage's model with a fresh optimizer, and the reference
    stays the original model throughout (never re-copied from a half-unlearned model).

    `StrategyPipeline([("ga", {"num_train_epochs": 1}), ("npo", {"strategy_kwargs": {"beta": 0.1}})])`: each stage is
    (strategy name, overrides of `UnlearningConfig` fields for that stage). The original model as reference: without
    PEFT, one frozen copy made before the first stage (each stage may still cache its log-probs from it); with a
    fresh LoRA adapter, the adapter-off model; with a pre-trained adapter, one snapshot taken before the first stage.
    """

    def __init__(self, stages: Sequence[tuple[str, dict[str, Any]] | list]) -> None:
        if not stages:
            raise ValueError("StrategyPipeline needs at least one (strategy, overrides) stage.")
        self.stages = [(name, dict(overrides or {})) for name, overrides in stages]
        # built now so unknown names fail early; asked what each stage needs (each stage's trainer builds its own)
        self.strategies = [get_strategy(name, **(o.get("strategy_kwargs") or {})) for name, o in self.stages]

    def run(self, model: nn.Module, args, **trainer_kwargs: Any) -> list:
        """Train every stage with `UnlearningTrainer(model, stage_args, **trainer_kwargs)`; return the trainers.

        `reference=` (an already built reference to the original model) is shared by every stage as it is."""
        from ..peft_utils import is_peft_model
        from ..reference import ModelReference, active_adapter, frozen_copy, snapshot_adapter
        from ..trainer import UnlearningTrainer

        ref_model, reference = trainer_kwargs.pop("ref_model", None), trainer_kwargs.pop("reference", None)
        peft = args.use_peft or trainer_kwargs.get("peft_config") is not None or is_peft_model(model)
        stage_args = [
            dataclasses.replace(
                args,
                strategy=name,
                output_dir=f"{args.output_dir}/stage_{i}_{name}",
                **{"strategy_kwargs": {}, **overrides},
            )
            for i, (name, overrides) in enumerate(self.stages)
        ]
        strategies = self.strategies
        needs = [bool(s.reference_quantities(a.retain_loss)) for s, a in zip(strategies, stage_args, strict=True)]
        if reference is None and any(needs) and is_peft_model(model):
            name = snapshot_adapter(model)
            reference = ModelReference(model, "adapter", lambda: active_adapter(model, name))
        elif reference is None and any(needs) and not peft and ref_model is None:
            ref_model = frozen_copy(model)
        trainers = []
        for i, (strategy, stage_arg) in enumerate(zip(strategies, stage_args, strict=True)):
            if i > 0:
                trainer_kwargs.pop("peft_config", None)  # the adapter of stage 0 carries on
            stage_kwargs = dict(trainer_kwargs)
            if not strategy.needs_retain(stage_arg.retain_loss):
                stage_kwargs.pop("retain_dataset", None)
            trainer = UnlearningTrainer(
                model,
                stage_arg,
                ref_model=ref_model if needs[i] else None,
                reference=reference if needs[i] else None,
                **stage_kwargs,
            )
            if peft and reference is None:  # a fresh adapter: adapter-off is the original from now on
                model_ = trainer.model
                reference = ModelReference(model_, "adapter", model_.disable_adapter)
            trainer.train()
            model = trainer.model
            trainers.append(trainer)
        return trainers


@register_strategy
class PipelineStrategy(Strategy):
    """`StrategyPipeline` by name, for configs and YAML recipes:
    `strategy="pipeline", strategy_kwargs={"stages": [["ga", {"max_steps": 20}], ["npo", {"retain_loss": "kl"}]]}`.

    One-shot from the trainer's point of view: `train()` runs the stages on the trainer's model (with its adapter,
    if any) and the trainer's raw forget/retain rows. The trainer builds one reference to the original model for all
    stages: the adapter-off model with a fresh LoRA adapter, a frozen copy otherwise (never a cache: the stages'
    batches differ from the trainer's).
    """

    name = "pipeline"
    paper = "composition of the stages' papers"
    one_shot = True

    def __init__(self, stages: Sequence[tuple[str, dict[str, Any]] | list] = ()) -> None:
        self.pipeline = StrategyPipeline(stages)
        self.stages = [
            (strategy, overrides)
            for strategy, (_, overrides) in zip(self.pipeline.strategies, self.pipeline.stages, strict=True)
        ]
        self.uses_retain = any(s.uses_retain for s, _ in self.stages)
        first = self.stages[0][0]
        self.objectives = tuple(o for o in first.objectives if all(o in s.objectives for s, _ in self.stages))

    @property
    def hyperparameters(self) -> dict[str, object]:
        return {"stages": [[name, overrides] for name, overrides in self.pipeline.stages]}

    def needs_retain(self, retain_loss_name: str) -> bool:
        return any(s.needs_retain(o.get("retain_loss", retain_loss_name)) for s, o in self.stages)

    def needs_token_scores(self, retain_loss_name: str) -> bool:
        return any(s.needs_token_scores(o.get("retain_loss", retain_loss_name)) for s, o in self.stages)

    def reference_quantities(self, retain_loss_name: str) -> frozenset[str]:
        needed = any(s.reference_quantities(o.get("retain_loss", retain_loss_name)) for s, o in self.stages)
        return frozenset({"scores"}) if needed else frozenset()

    def apply(self, trainer) -> dict[str, float]:
        trainers = self.pipeline.run(
            trainer.model,
            trainer.args,
            reference=trainer.reference,
            forget_dataset=trainer.forget_rows,
            retain_dataset=trainer.retain_rows,
            processing_class=trainer.processing_class,
            data_collator=trainer.data_collator.side_collator,
            objective=trainer.objective,
        )
        trainer.state.global_step = sum(t.state.global_step for t in trainers)
        return {
            f"stage_{i}_{t.strategy.name}/{key}": value
            for i, t in enumerate(trainers)
            for key, value in t.state.log_history[-1].items()
            if key.startswith("train_")
        }
