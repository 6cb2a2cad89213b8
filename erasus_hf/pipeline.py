"""Strategies in sequence: `StrategyPipeline` drives one `UnlearningTrainer` per stage, and `PipelineStrategy`
offers it by name (`strategy="pipeline"`). It stands above the trainer, which it runs (so no strategy module can
hold it); `erasus_hf/__init__.py` imports it, so the name is registered whenever any part of `erasus_hf` is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .peft_utils import is_peft_model
from .reference import ModelReference, active_adapter, frozen_copy, snapshot_adapter
from .strategies import Strategy, get_strategy, register_strategy
from .strategies.base import PerInstance
from .strategies.composition import listed_parts, positional_parts, shared_objectives
from .strategies.config import StrategyConfig
from .trainer import UnlearningTrainer

StageSpec = tuple  # (strategy name, {UnlearningConfig field: value for that stage})


def stage_specs(stages: Sequence[StageSpec | list]) -> list[list]:
    """`stages` as [name, overrides] lists, each with its own overrides dict; at least one."""
    stages = listed_parts(stages, "stages", "[name, {UnlearningConfig overrides}]")
    if not stages:
        raise ValueError("StrategyPipeline needs at least one (strategy, overrides) stage (stages=[[name, {}]]).")
    return [[name, dict(overrides or {})] for name, overrides in stages]


class StrategyPipeline:
    """Stages in sequence: each starts from the previous stage's model with a fresh optimizer, and the reference
    stays the original model throughout (never re-copied from a half-unlearned model).

    `StrategyPipeline([("ga", {"num_train_epochs": 1}), ("npo", {"strategy_kwargs": {"beta": 0.1}})])`: each stage is
    (strategy name, overrides of `UnlearningConfig` fields for that stage). The original model as reference: without
    PEFT, one frozen copy made before the first stage (each stage may still cache its log-probs from it); with a
    fresh LoRA adapter, the adapter-off model; with a pre-trained adapter, one snapshot taken before the first stage.
    """

    def __init__(self, stages: Sequence[StageSpec | list]) -> None:
        self.stages = [(name, overrides) for name, overrides in stage_specs(stages)]
        # built now so unknown names fail early; asked what each stage needs (each stage's trainer builds its own)
        self.strategies = [get_strategy(name, **(o.get("strategy_kwargs") or {})) for name, o in self.stages]

    def run(self, model: nn.Module, args, **trainer_kwargs: Any) -> list[UnlearningTrainer]:
        """Train every stage with `UnlearningTrainer(model, stage_args, **trainer_kwargs)`; return the trainers.

        `reference=` (an already built reference to the original model) is shared by every stage as it is."""
        ref_model, reference = trainer_kwargs.pop("ref_model", None), trainer_kwargs.pop("reference", None)
        peft = args.use_peft or trainer_kwargs.get("peft_config") is not None or is_peft_model(model)
        stage_args = [
            replace(
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


@dataclass
class PipelineConfig(StrategyConfig):
    stages: list[StageSpec] = field(
        default_factory=list,
        metadata={
            "help": 'The stages in order, each [name, {UnlearningConfig overrides}] (e.g. ["npo", {"max_steps": '
            '20, "strategy_kwargs": {"beta": 0.2}}]); at least one. No default: a pipeline is its stages.'
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.stages = stage_specs(self.stages)


@register_strategy
class PipelineStrategy(Strategy):
    """`StrategyPipeline` by name, for configs and YAML recipes:
    `strategy="pipeline", strategy_kwargs={"stages": [["ga", {"max_steps": 20}], ["npo", {"retain_loss": "kl"}]]}`.

    One-shot from the trainer's point of view: `train()` runs the stages on the trainer's model (with its adapter,
    if any) and the trainer's raw forget/retain rows. The trainer builds one reference to the original model for all
    stages: the adapter-off model with a fresh LoRA adapter, a frozen copy otherwise (never a cache: the stages'
    batches differ from the trainer's). `pipeline` holds the `StrategyPipeline` it runs.
    """

    name = "pipeline"
    paper = "composition of the stages' papers"
    one_shot = True
    config_class = PipelineConfig

    def __init__(self, config: PipelineConfig | Sequence[StageSpec] | None = None, /, **hyperparameters: Any) -> None:
        config, hyperparameters = positional_parts(config, hyperparameters, "stages")
        super().__init__(config, **hyperparameters)
        self.pipeline = StrategyPipeline(self.config.stages)

    @property
    def parts(self) -> list[Strategy]:
        return self.pipeline.strategies

    uses_retain = PerInstance(lambda self: any(s.uses_retain for s in self.parts))
    token_level = PerInstance(lambda self: any(s.token_level for s in self.parts))
    objectives = PerInstance(lambda self: shared_objectives(self.parts))

    def _stage_retain_losses(self, retain_loss_name: str) -> list[tuple[Strategy, str]]:
        """Each stage's strategy with the retain loss it runs under: its own override, else `retain_loss_name`."""
        return [
            (strategy, overrides.get("retain_loss", retain_loss_name))
            for strategy, (_, overrides) in zip(self.pipeline.strategies, self.pipeline.stages, strict=True)
        ]

    def needs_retain(self, retain_loss_name: str) -> bool:
        return any(s.needs_retain(loss) for s, loss in self._stage_retain_losses(retain_loss_name))

    def needs_token_scores(self, retain_loss_name: str) -> bool:
        return any(s.needs_token_scores(loss) for s, loss in self._stage_retain_losses(retain_loss_name))

    def reference_quantities(self, retain_loss_name: str) -> frozenset[str]:
        needed = any(s.reference_quantities(loss) for s, loss in self._stage_retain_losses(retain_loss_name))
        return frozenset({"scores"}) if needed else frozenset()

    def apply(self, trainer: UnlearningTrainer) -> dict[str, float]:
        trainers = self.pipeline.run(
            trainer.model,
            trainer.args,
            reference=trainer.reference,
            forget_dataset=trainer.forget_rows,
            retain_dataset=trainer.retain_rows,
            processing_class=trainer.processing_class,
            data_collator=trainer.data_collator.side_collator,
            objective=trainer.model_objective,
        )
        trainer.state.global_step = sum(t.state.global_step for t in trainers)
        return {
            f"stage_{i}_{t.strategy.name}/{key}": value
            for i, t in enumerate(trainers)
            for key, value in t.state.log_history[-1].items()
            if key.startswith("train_")
        }
