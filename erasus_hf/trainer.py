"""`UnlearningTrainer`: a `transformers.Trainer` whose `compute_loss` is the chosen unlearning strategy's.

The trainer wires the rooms together and trains: the strategy (`erasus_hf.strategies`) gives the loss, the objective
(`erasus_hf.objectives`) scores the model's family and supplies its collator and adapter, `erasus_hf.data.prepare`
checks and tokenizes the rows, `erasus_hf.reference` builds the frozen starting model, `erasus_hf.output_folder`
writes a save completely or not at all, `erasus_hf.resume` carries the run's own state through checkpoints, and
`erasus_hf.hub.sharing` is the Hub side (repo, pushes, model card).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import TrainOutput

from . import zero3
from .config import UnlearningConfig, as_unlearning_config
from .coresets import CoresetReport, apply_coreset
from .data.collator import NestedCollator, QACollator, default_side_collator
from .data.formats import chat_template_of
from .data.pairing import ForgetRetainDataset, PairingEpochCallback
from .data.prepare import (
    embedding_rows,
    eval_pairs,
    prepare_side,
    warn_overlap,
    warn_past_positions,
    with_alternates,
)
from .data.validation import eval_sides, to_dataset
from .divergence import DivergenceCallback
from .evaluation.result import EvaluationResult
from .evaluation.suite import Evaluator, MetricSuite
from .hub.sharing import HubMixin
from .model_source import load_causal_lm, refuse_init_kwargs_for_instance
from .objectives import Objective, get_objective
from .output_folder import StagedSave, check_finite_weights, check_output_dir, save_plan, write_run_record
from .privacy.report import DPReport
from .reference import Reference, build_reference, check_reference_model, frozen_copy, resolve_reference_mode
from .resume import checkpoint_to_resume, load_resume_state, save_resume_state
from .strategies import Strategy, StrategyContext, get_strategy
from .strategies.registry import check_token_scores
from .strategies.task_vector import ForgetFinetune


class UnlearningTrainer(HubMixin, Trainer):
    """Trainer for machine unlearning.

    Each training example pairs one forget example with a seeded retain partner; `compute_loss` hands the nested
    batch `{"forget": ..., "retain": ...}` to the strategy named by `args.strategy`. Every strategy loss is a mean over
    examples, so the Trainer's division by the accumulation steps makes accumulation 4 x batch 2 equal to 1 x batch 8
    (`loss_is_scaled_for_ga = False`).

    Args:
        model: a model, or a model id/path loaded with `AutoModelForCausalLM` and `args.model_init_kwargs`.
        args: an `UnlearningConfig` (a plain `TrainingArguments` is converted to one, with a warning, as in TRL).
        forget_dataset: what to unlearn: question/answer rows, pre-tokenized rows (`input_ids`, `labels`), or the
            inputs and `labels` of a classifier.
        retain_dataset: what to keep; required by strategies with a retain term (unless `retain_loss="none"`).
        ref_model: an explicit frozen reference; by default the reference is derived from `model` (see
            `UnlearningConfig.reference`).
        peft_config: a PEFT config to wrap `model` with (`use_peft=True` builds a LoRA config from `args`).
        processing_class: the tokenizer (required for causal LMs; loaded with the model when `model` is a string).
        data_collator: the collator of *one side* of a batch; defaults to the objective's (`Objective.collator_for`).
        eval_dataset: `{"forget": ds, "retain": ds}` for `evaluate()`, or one dataset: the forget side (paired with the
            training retain set); defaults to the training forget/retain sets.
        objective: "causal_lm", "classification" or an `Objective`; detected from the model when None.
        reference: an already built `Reference` to use as it is (`StrategyPipeline` passes the original model's).
        evaluators: a `MetricSuite`, or evaluator names/objects for one, run by every `evaluate()` (so at each
            `eval_strategy` step) on top of the loss metrics; its summary numbers are logged as `eval_{name}` and can
            be `metric_for_best_model` (e.g. `"tofu/forget_quality"`, `"combined_score"`).
        evaluation_data: the data for named evaluators, passed to `MetricSuite.run` (`tofu=`, `holdout=`, ...);
            `forget`/`retain` default to the rows given as forget_dataset/retain_dataset.
        evaluation_reference: the retain-model evaluation (an `EvaluationResult` or its JSON path) that forget
            quality and PrivLeak compare against.
        model_init: instead of `model`, a function returning a fresh starting model, as `transformers.Trainer`
            takes it: `hyperparameter_search` (`erasus_hf.tuning`) builds one per trial, with the trial's learning
            rate, budget, weights and strategy hyperparameters.
    """

    _tag_names = ["erasus-hf", "unlearning"]
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        args: UnlearningConfig | None = None,
        forget_dataset: Dataset | list[dict] | None = None,
        retain_dataset: Dataset | list[dict] | None = None,
        ref_model: nn.Module | None = None,
        peft_config: Any | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        data_collator: Any | None = None,
        eval_dataset: dict[str, Any] | Dataset | list[dict] | None = None,
        objective: str | Objective | None = None,
        reference: Reference | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        evaluators: MetricSuite | Sequence[str | Evaluator] | None = None,
        evaluation_data: dict[str, Any] | None = None,
        evaluation_reference: EvaluationResult | str | os.PathLike | None = None,
        model_init: Callable[[], nn.Module] | None = None,
    ) -> None:
        if (model is None) == (model_init is None):
            raise ValueError("UnlearningTrainer needs a model or a model_init (a fresh starting model per call): one.")
        if model_init is not None and optimizers != (None, None):
            raise ValueError("A model_init builds a new model per trial; it cannot take fixed `optimizers`.")
        if model_init is not None:
            model = model_init()
        args = as_unlearning_config(args)  # a plain TrainingArguments: converted, with a warning
        check_output_dir(args.output_dir, args.overwrite_output_dir)  # one run per folder, refused before compute
        # every check before any compute: hyperparameters (typed when the strategy is built), the data's containers,
        # the model folder; the rows themselves in prepare_side, before tokenization and any reference pass
        self.strategy: Strategy = get_strategy(args.strategy, **args.strategy_kwargs)
        forget_dataset = to_dataset(forget_dataset, "forget") if forget_dataset is not None else None
        retain_dataset = to_dataset(retain_dataset, "retain") if retain_dataset is not None else None
        eval_dataset = eval_sides(eval_dataset)  # {"forget": ..., "retain": ...} or None
        source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
        # a starting model trained with DP-SGD (`erasus_hf.privacy`): its guarantee goes on this run's card
        self.starting_privacy = DPReport.load(source) if source and os.path.isdir(source) else None
        if isinstance(model, (str, os.PathLike)):
            model, processing_class = load_causal_lm(os.fspath(model), processing_class, args.model_init_kwargs)
        else:
            refuse_init_kwargs_for_instance(model, args.model_init_kwargs)
        self.model_objective: Objective = get_objective(objective, model)
        if self.model_objective.name not in self.strategy.objectives:
            raise ValueError(
                f"Strategy {self.strategy.name!r} serves {self.strategy.objectives}, not the "
                f"{self.model_objective.name!r} objective of {type(model).__name__}."
            )
        check_token_scores(self.strategy, self.model_objective, args.retain_loss)  # CTC: sequence likelihoods only
        if forget_dataset is None:
            raise ValueError("UnlearningTrainer needs a forget_dataset.")
        if self.strategy.needs_retain(args.retain_loss) and retain_dataset is None:
            raise ValueError(
                f"Strategy {self.strategy.name!r} has a retain term (retain_loss={args.retain_loss!r}) and needs a "
                "retain_dataset; pass one, or set retain_loss='none' to unlearn without it."
            )
        if retain_dataset is not None and not self.strategy.needs_retain(args.retain_loss):
            warnings.warn(f"Strategy {self.strategy.name!r} does not use the retain set; it is ignored.", stacklevel=2)
            retain_dataset = None
        self.model_objective.prepare_processing_class(processing_class)  # a causal LM: its tokenizer, with a pad token
        if args.chat_template_path is not None:  # as TRL's: the saved tokenizer keeps the template it ran with
            processing_class.chat_template = chat_template_of(args.chat_template_path)
        side_collator = (
            data_collator or self.model_objective.collator_for(processing_class, args) or default_side_collator
        )

        starting_model = model
        self._peft_config = peft_config
        model, had_adapter = self._prepare_policy(model, args)
        if reference is not None and self.strategy.reference_quantities(args.retain_loss):
            self.reference_mode, ref_model = reference.mode, None
        else:
            reference = None
            self.reference_mode = resolve_reference_mode(
                args.reference,
                self.strategy.reference_quantities(args.retain_loss),
                self.strategy.name,
                args.retain_loss,
                peft=self._adapter_name is not None,
                ref_model=ref_model,
                cacheable=self.model_objective.cacheable_reference,
            )
        if ref_model is not None and self.reference_mode != "none":
            check_reference_model(starting_model, ref_model)
        self._given_ref_model = ref_model

        # the rows as given: one-shot strategies that re-read text (WHP's anchored terms, pipelines) use them
        self.forget_rows = with_alternates(forget_dataset, self.strategy.alternate_answers, args.seed)
        self.retain_rows = retain_dataset  # already a Dataset (to_dataset above)
        vocab_size = embedding_rows(starting_model) if isinstance(side_collator, QACollator) else None
        forget, forget_format = prepare_side(self.forget_rows, side_collator, "forget", vocab_size)
        retain, retain_format = (None, None)
        if retain_dataset is not None:
            retain, retain_format = prepare_side(retain_dataset, side_collator, "retain", vocab_size)
        # e.g. {"forget": "text", "retain": "qa"}: recorded in the card and the evaluation's meta
        self.row_formats = {k: v for k, v in (("forget", forget_format), ("retain", retain_format)) if v is not None}
        self.text_format = side_collator.text_format if isinstance(side_collator, QACollator) else None
        self.coreset: CoresetReport | None = None
        self._first_log: dict[str, float] = {}  # joins the run's first log (the Trainer resets the history at start)
        if args.coreset is not None:  # before the reference: a cached reference scores the kept rows only
            forget, retain, self.coreset = apply_coreset(
                args, model, self.model_objective, side_collator, forget, retain
            )
            if self.coreset.max_steps is not None and args.max_steps != self.coreset.max_steps:
                args = copy.copy(args)  # the budget rule's max_steps; the caller's config stays as it was
                args.max_steps = self.coreset.max_steps
        warn_overlap(forget, retain)
        for side, what in ((forget, "forget"), (retain, "retain")):
            warn_past_positions(starting_model, side, what, args.max_length)
        if self.reference_mode == "copy" and ref_model is None and reference is None:
            ref_model = frozen_copy(starting_model)  # after the data checks: no copy for a run that is refused
        train_dataset = ForgetRetainDataset(forget, retain, seed=args.pairing_seed)
        if eval_dataset is not None:
            alternates = self.strategy.alternate_answers
            eval_set = eval_pairs(
                eval_dataset, side_collator, forget, retain, alternates, args.seed, args.pairing_seed
            )
        else:
            eval_set = train_dataset

        super().__init__(
            model=model,
            args=args,
            data_collator=NestedCollator(side_collator),
            train_dataset=train_dataset,
            eval_dataset=eval_set,
            processing_class=processing_class,
            callbacks=[PairingEpochCallback(train_dataset), *(callbacks or [])],
            optimizers=optimizers,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # each step's metrics as stored, on the device and not gathered yet: (keys, values) per step, gathered into
        # `_metrics` in one collective when they are read (a log, the end of an evaluation, the divergence check)
        self._pending_metrics: dict[str, list[tuple[tuple[str, ...], torch.Tensor]]] = {"train": [], "eval": []}
        self._saved_files: dict[str, set[str]] = {}  # output folder -> the names this trainer's last save there wrote
        self._hub_pool = None
        self.push_in_progress = None  # (init_hf_repo has set it already with args.push_to_hub)
        if args.divergence_factor:  # reads the per-step training metrics stored above
            self.add_callback(DivergenceCallback(args.divergence_factor, lambda: self._gathered_metrics("train")))
        if evaluators is not None and not isinstance(evaluators, MetricSuite):
            evaluators = MetricSuite(evaluators)
        self.metric_suite: MetricSuite | None = evaluators
        self.evaluation_data = {"forget": self.forget_rows, "retain": self.retain_rows, **(evaluation_data or {})}
        if isinstance(evaluation_reference, (str, os.PathLike)):
            evaluation_reference = EvaluationResult.load(evaluation_reference)
        self.evaluation_reference: EvaluationResult | None = evaluation_reference
        self.last_evaluation: EvaluationResult | None = None
        if self.metric_suite is not None:  # a reference of other rows is refused now, not after training steps
            self.metric_suite.check(self.evaluation_reference, self.callback_handler.callbacks, **self.evaluation_data)
        self.reference: Reference | None = reference or self._build_reference(ref_model, had_adapter)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([*self._tag_names, self.strategy.name])
        self.model_init = model_init  # after the Trainer's __init__, which refuses a model and a model_init both

    def _prepare_policy(self, model: nn.Module, args: UnlearningConfig) -> tuple[nn.Module, bool]:
        """The starting model as it trains: the run's adapter added (an objective may add it its family's own way:
        diffusion's `unet.add_adapter`, no PeftModel) and the strategy's preparation; with whether the model arrived
        with a trained adapter."""
        set_seed(args.seed)  # the adapter's initialisation follows the run's seed, whatever ran before
        model, self._adapter_name, had_adapter = self.model_objective.prepare_peft(model, args, self._peft_config)
        self.strategy.prepare_model(model)
        return model, had_adapter

    def _hp_search_setup(self, trial: Any) -> None:
        """A hyperparameter-search trial (`Trainer.hyperparameter_search`): the Trainer has set the trial's values
        on `args` (a strategy's hyperparameters as the `strategy_kwargs` dict) and built a fresh model with
        `model_init`; the strategy is built again from the new `strategy_kwargs`, the fresh model gets the run's
        adapter, and the reference is built again from it (or from the `ref_model` given). The Trainer builds a
        fresh model at every `train()` when it has a `model_init`, so this runs at every `train()`, trial or not."""
        super()._hp_search_setup(trial)
        if self.model_init is None:
            return
        self.strategy = get_strategy(self.args.strategy, **self.args.strategy_kwargs)
        starting_model = self.model
        ref_model = self._given_ref_model
        if self.reference_mode == "copy" and ref_model is None:
            ref_model = frozen_copy(starting_model)
        model, had_adapter = self._prepare_policy(starting_model, self.args)
        self.model = self.model_wrapped = model.to(self.args.device)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}  # none of an earlier trial's
        self._pending_metrics = {"train": [], "eval": []}
        self.reference = self._build_reference(ref_model, had_adapter)

    def _build_reference(self, ref_model: nn.Module | None, had_adapter: bool) -> Reference | None:
        """The reference of `self.reference_mode` (`erasus_hf.reference.build_reference`); the cached mode scores
        the forget sides of the training and the evaluation pairs."""
        pairs = [self.train_dataset] + ([self.eval_dataset] if self.eval_dataset is not self.train_dataset else [])
        batch_size = self.args.per_device_eval_batch_size
        return build_reference(
            self.reference_mode,
            self.model,
            self.model_objective,
            ref_model,
            had_adapter,
            accelerator=self.accelerator,
            deepspeed=self.is_deepspeed_enabled,
            cache_loaders=[DataLoader(p, batch_size=batch_size, collate_fn=self.data_collator) for p in pairs],
            device=self.args.device,
            disable_tqdm=self.args.disable_tqdm,
        )

    def finetune_on_forget(self, model: nn.Module, dataset: Dataset | None = None) -> nn.Module:
        """Fine-tune `model` in place on this trainer's forget set (or `dataset`: pre-tokenized rows) with this run's
        own arguments (learning rate, epochs, batch size, ...), and return it: the "reinforced" model that one-shot
        strategies (task-vector negation, Who's Harry Potter) edit with. Plain NLL on the forget answers, no
        reference, no adapter of its own, nothing saved."""
        args = dataclasses.replace(
            self.args,
            strategy=ForgetFinetune(),
            strategy_kwargs={},
            use_peft=False,
            reference="none",
            coreset=None,  # the forget set given is the one to fine-tune on
            save_strategy="no",
            output_dir=f"{self.args.output_dir}/reinforced",
        )
        UnlearningTrainer(
            model,
            args,
            forget_dataset=dataset if dataset is not None else self.train_dataset.forget,
            processing_class=self.processing_class,
            data_collator=self.data_collator.side_collator,
            objective=self.model_objective,
        ).train()
        return model

    # ---- training, loss, evaluation, logging ----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Train; a one-shot strategy (task-vector negation, ...) applies its edit instead of a training loop.

        `resume_from_checkpoint` (a checkpoint folder, or True for the newest complete one in `output_dir`: one the
        run was killed while writing is skipped) continues the run that wrote it exactly: besides the Trainer's
        weights, optimizer, scheduler, RNG and step, the strategy's state and the cached reference log-probs come
        back from the checkpoint's `unlearning_state.safetensors` (`erasus_hf.resume`), read before any compute; a
        checkpoint of another run is refused."""
        resume_from_checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        if self.strategy.one_shot:
            if self.model_init is not None:  # no Trainer loop to build the trial's model: built here as it would
                self.model = self.call_model_init(kwargs.get("trial"))
                self._hp_search_setup(kwargs.get("trial"))
            metrics = self.strategy.apply(self)
            check_finite_weights(self.accelerator.unwrap_model(self.model))
            self.log(dict(metrics))
            return TrainOutput(self.state.global_step, 0.0, metrics)
        if resume_from_checkpoint is not None:
            load_resume_state(self, resume_from_checkpoint)  # before SalUn's setup: it reuses the run's mask
        if self.coreset is not None and resume_from_checkpoint is None:
            self._first_log = self.coreset.log_values()
        self._gathered_metrics("train")  # what an earlier run left stored joins `_metrics`, as it did when stored
        if self.strategy.builds_state_before_training():  # e.g. SalUn's saliency mask, from the forget set
            self.log(dict(self.strategy.setup(self)))
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.strategy.teardown()

    def _save_rng_state(self, output_dir: str) -> None:
        """The Trainer's RNG states, then the unlearning run's own state (`erasus_hf.resume.save_resume_state`):
        both are written in `_save_checkpoint` after the weights and before `trainer_state.json`, so a checkpoint
        that the Trainer can resume from holds it (none with `save_only_model`, like the RNG states)."""
        super()._save_rng_state(output_dir)
        save_resume_state(self, output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ctx = StrategyContext(
            model=model,
            objective=self.model_objective,
            reference=self.reference,
            forget_weight=self.args.forget_weight,
            retain_weight=self.args.retain_weight,
            retain_loss=self.args.retain_loss,
            retain_kl_positions=self.args.retain_kl_positions,
            global_step=self.state.global_step,
            epoch=self.state.epoch or 0.0,
            training=model.training,
        )
        loss, metrics = self.strategy.compute_loss(ctx, inputs["forget"], inputs.get("retain"))
        if not torch.isfinite(loss):
            parts = {k: float(v) for k, v in metrics.items()}
            raise FloatingPointError(
                f"The {self.strategy.name} loss is {loss.item()} at step {self.state.global_step} ({parts}). "
                "Training stopped before the update; nothing was saved. Lower the learning rate or check the data."
            )
        self._store_metrics(metrics, "train" if model.training else "eval")
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Strategy loss plus the forget and retain NLL of the batch; nested batches need no labels."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            metrics = {
                f"{side}_nll": self.model_objective.score(model, inputs[side]).mean_nll.mean() for side in inputs
            }
        self._store_metrics(metrics, "eval")
        return loss.detach(), None, None

    def _store_metrics(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        """Keep this step's metrics where they are, on the device: gathering them here would synchronise the device
        and run one collective at every step, for values only a log (or the divergence check) reads.
        `_gathered_metrics` gathers the steps since the last read in one go."""
        if not metrics:
            return
        keys = tuple(sorted(metrics))
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
        self._pending_metrics[mode].append((keys, values))

    def _gathered_metrics(self, mode: str) -> dict[str, list[float]]:
        """`_metrics[mode]` with the stored steps added: each step's values averaged across processes (every
        process has stored the same steps and keys), one gather for all of them; the values are the ones a gather
        per step gave."""
        pending = self._pending_metrics[mode]
        if pending:
            flat = torch.cat([values for _, values in pending])
            gathered = iter(self.accelerator.gather(flat[None]).mean(0).tolist())
            for keys, _ in pending:
                for key in keys:
                    self._metrics[mode][key].append(next(gathered))
            pending.clear()
        return self._metrics[mode]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the training metrics averaged over the logging window."""
        for key, values in self._gathered_metrics("train").items():
            logs[key] = sum(values) / len(values)
        self._metrics["train"].clear()
        logs.update(self._first_log)
        self._first_log = {}
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for key, values in self._gathered_metrics("eval").items():
            output.metrics[f"{metric_key_prefix}_{key}"] = sum(values) / len(values)
        self._metrics["eval"].clear()
        if self.metric_suite is not None:
            self.last_evaluation = self.run_metric_suite(self.accelerator.unwrap_model(self.model))
            self.last_evaluation.meta["global_step"] = self.state.global_step
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.last_evaluation.summary.items()})
        return output

    def run_metric_suite(self, model: nn.Module) -> EvaluationResult:
        """This trainer's evaluators on `model` (the trained one, or a starting model a tuner compares against),
        with its evaluation data and reference, its rows scored and prompted as they were trained."""
        if self.metric_suite is None:
            raise ValueError("This trainer has no evaluators: pass evaluators=[...] (e.g. ['tofu']).")
        return self.metric_suite.run(
            model,
            self.processing_class,
            **self.evaluation_data,
            reference=self.evaluation_reference,
            text_format=self.text_format,  # None: not a causal LM's collator
            row_formats=self.row_formats,
        )

    # ---- saving ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (the files: see `_save`). With `args.push_to_hub`, a user's call (the Trainer's own
        saves pass `_internal_call=True`) then pushes, commit "Model save", as the Trainer does: through
        `push_to_hub`, which saves `output_dir` itself, so the weights are written once, not twice."""
        push = self.args.push_to_hub and not _internal_call
        into_output_dir = output_dir is None or os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir)
        if not (push and into_output_dir):
            if self.args.merge_adapter and self.is_deepspeed_enabled and zero3.is_partitioned(self.model):
                # ZeRO-3 + PEFT gathers the trainable weights only; merging needs them all (every process gathers)
                self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.deepspeed))
            else:
                super().save_model(output_dir, _internal_call=True)
        if push:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write safetensors only: the adapter alone (not the reference snapshot), the merged model when
        `merge_adapter`, or the full model; then the tokenizer, `unlearning_config.json` and `strategy.json`.

        Complete or absent (`erasus_hf.output_folder.StagedSave`): the files are written into a staging folder,
        checked, then moved into `output_dir`; an interrupted, failed or refused save leaves `output_dir` as it was.
        Refused: a NaN or an infinity in any tensor written (after merging, frozen weights included), and a folder
        holding another run's weights unless `overwrite_output_dir` (that run's files are then replaced,
        `save_plan`). Files this run did not write stay (`checkpoint-*/`, `runs/`, `eval.json`, the card)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        target = os.path.abspath(output_dir)
        model = self.accelerator.unwrap_model(self.model)
        previous = self._saved_files.get(target)
        remove, carry = save_plan(target, self.args.output_dir, previous, self.args.overwrite_output_dir)
        staged = StagedSave(target, remove=remove, carry=carry)
        with staged as staging:
            self.model_objective.save_weights(model, staging, self._adapter_name, self.args.merge_adapter, state_dict)
            strategy = {"name": self.strategy.name, "paper": self.strategy.paper, **self.strategy.hyperparameters}
            record = self.text_format_record()  # how the rows were rendered, as the card says
            coreset = self.coreset.to_dict() if self.coreset is not None else None
            write_run_record(staging, self.processing_class, self.args.to_json_string(), strategy, record, coreset)
            self.write_card(staging)  # the model card, in every save and checkpoint, as TRL writes its own
        self._saved_files[target] = set(staged.written)
