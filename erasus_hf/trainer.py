"""`UnlearningTrainer`: a `transformers.Trainer` whose `compute_loss` is the chosen unlearning strategy's."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    set_seed,
)
from transformers.trainer_utils import HubStrategy, SaveStrategy, TrainOutput
from transformers.utils.hub import PushInProgress

from .config import UnlearningConfig
from .data.collator import NestedCollator, QACollator, default_side_collator
from .data.pairing import ForgetRetainDataset
from .data.validation import check_qa_rows, to_dataset
from .divergence import DivergenceCallback
from .evaluation.result import EvaluationResult
from .evaluation.suite import Evaluator, MetricSuite
from .model_source import load_causal_lm
from .objectives import Objective, get_objective
from .output_folder import StagedSave, check_output_dir, non_finite_tensors, run_files, weight_files
from .peft_utils import is_peft_model
from .redaction import redact, redact_json
from .reference import (
    CachedReference,
    ModelReference,
    Reference,
    active_adapter,
    frozen_copy,
    sequence_logprobs,
    snapshot_adapter,
)
from .resume import checkpoint_to_resume, load_resume_state, save_resume_state
from .strategies import Strategy, StrategyContext, get_strategy
from .strategies.registry import check_token_scores

logger = logging.getLogger(__name__)


class _PairingEpochCallback(TrainerCallback):
    """Redraw the retain partners at every epoch (accelerate does not always forward `set_epoch` to the dataset).

    The epoch that begins is the integer part of `state.epoch`: 1 at the start of epoch 1, and 1 again when a run
    resumes from a checkpoint at epoch 1.67 (the Trainer sets `state.epoch = epoch + (step + 1) / steps_in_epoch`,
    exactly the next integer after an epoch's last step). Rounding would pair the rest of epoch 1 as epoch 2."""

    def __init__(self, dataset: ForgetRetainDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch or 0))


class UnlearningTrainer(Trainer):
    """Trainer for machine unlearning.

    Each training example pairs one forget example with a seeded retain partner; `compute_loss` hands the nested
    batch `{"forget": ..., "retain": ...}` to the strategy named by `args.strategy`. Every strategy loss is a mean over
    examples, so the Trainer's division by the accumulation steps makes accumulation 4 x batch 2 equal to 1 x batch 8
    (`loss_is_scaled_for_ga = False`).

    Args:
        model: a model, or a model id/path loaded with `AutoModelForCausalLM`.
        args: an `UnlearningConfig`.
        forget_dataset: what to unlearn: question/answer rows, pre-tokenized rows (`input_ids`, `labels`), or the
            inputs and `labels` of a classifier.
        retain_dataset: what to keep; required by strategies with a retain term (unless `retain_loss="none"`).
        ref_model: an explicit frozen reference; by default the reference is derived from `model` (see
            `UnlearningConfig.reference`).
        peft_config: a PEFT config to wrap `model` with (`use_peft=True` builds a LoRA config from `args`).
        processing_class: the tokenizer (required for causal LMs; loaded with the model when `model` is a string).
        data_collator: the collator of *one side* of a batch; defaults to `QACollator` for causal LMs.
        eval_dataset: `{"forget": ds, "retain": ds}` for `evaluate()`; defaults to the training forget/retain sets.
        objective: "causal_lm", "classification" or an `Objective`; detected from the model when None.
        reference: an already built `Reference` to use as it is (`StrategyPipeline` passes the original model's).
        evaluators: a `MetricSuite`, or evaluator names/objects for one, run by every `evaluate()` (so at each
            `eval_strategy` step) on top of the loss metrics; its summary numbers are logged as `eval_{name}` and can
            be `metric_for_best_model` (e.g. `"tofu/forget_quality"`, `"combined_score"`).
        evaluation_data: the data for named evaluators, passed to `MetricSuite.run` (`tofu=`, `holdout=`, ...);
            `forget`/`retain` default to the rows given as forget_dataset/retain_dataset.
        evaluation_reference: the retain-model evaluation (an `EvaluationResult` or its JSON path) that forget
            quality and PrivLeak compare against.
    """

    _tag_names = ["erasus-hf", "unlearning"]
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str,
        args: UnlearningConfig | None = None,
        forget_dataset: Dataset | list[dict] | None = None,
        retain_dataset: Dataset | list[dict] | None = None,
        ref_model: nn.Module | None = None,
        peft_config: Any | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        data_collator: Any | None = None,
        eval_dataset: dict[str, Any] | None = None,
        objective: str | Objective | None = None,
        reference: Reference | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        evaluators: MetricSuite | Sequence[str | Evaluator] | None = None,
        evaluation_data: dict[str, Any] | None = None,
        evaluation_reference: EvaluationResult | str | os.PathLike | None = None,
    ) -> None:
        args = args if args is not None else UnlearningConfig(output_dir="erasus_hf_output")
        if not isinstance(args, UnlearningConfig):
            raise TypeError(f"args must be an UnlearningConfig, got {type(args).__name__}")
        check_output_dir(args.output_dir, args.overwrite_output_dir)  # one run per folder, refused before compute
        # every check before any compute: hyperparameters (typed when the strategy is built), the data's containers,
        # the model folder; the rows themselves in prepare_side, before tokenization and any reference pass
        self.strategy: Strategy = get_strategy(args.strategy, **args.strategy_kwargs)
        forget_dataset = to_dataset(forget_dataset, "forget") if forget_dataset is not None else None
        retain_dataset = to_dataset(retain_dataset, "retain") if retain_dataset is not None else None
        if isinstance(model, (str, os.PathLike)):
            model, processing_class = load_causal_lm(os.fspath(model), processing_class)
        self.objective: Objective = get_objective(objective, model)
        if self.objective.name not in self.strategy.objectives:
            raise ValueError(
                f"Strategy {self.strategy.name!r} serves {self.strategy.objectives}, not the {self.objective.name!r} "
                f"objective of {type(model).__name__}."
            )
        check_token_scores(self.strategy, self.objective, args.retain_loss)  # CTC: sequence likelihoods only
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

        causal = self.objective.name == "causal_lm"
        if causal:
            if processing_class is None:
                raise ValueError("A causal LM needs its tokenizer: pass processing_class=tokenizer.")
            ensure_pad_token(processing_class)
        side_collator = data_collator or (
            QACollator(processing_class, max_length=args.max_length)
            if causal
            else self.objective.collator_for(processing_class, args.max_length) or default_side_collator
        )

        starting_model = model
        set_seed(args.seed)  # the adapter's initialisation follows the run's seed, whatever ran before
        # an objective may add its adapter its family's own way (diffusion: `unet.add_adapter`, no PeftModel)
        model, self._adapter_name, had_adapter = self.objective.prepare_peft(model, args, peft_config)
        self.strategy.prepare_model(model)
        if reference is not None and self.strategy.reference_quantities(args.retain_loss):
            self.reference_mode, ref_model = reference.mode, None
        else:
            reference = None
            self.reference_mode = resolve_reference_mode(
                args.reference,
                self.strategy,
                args.retain_loss,
                peft=self._adapter_name is not None,
                ref_model=ref_model,
                cacheable=self.objective.cacheable_reference,
            )
        if ref_model is not None and self.reference_mode != "none":
            check_reference_model(starting_model, ref_model)

        # the rows as given: one-shot strategies that re-read text (WHP's anchored terms, pipelines) use them
        self.forget_rows = self._with_alternates(forget_dataset, args.seed)
        self.retain_rows = retain_dataset  # already a Dataset (to_dataset above)
        vocab_size = embedding_rows(starting_model) if isinstance(side_collator, QACollator) else None
        forget = prepare_side(self.forget_rows, side_collator, "forget", vocab_size)
        retain = None if retain_dataset is None else prepare_side(retain_dataset, side_collator, "retain", vocab_size)
        warn_overlap(forget, retain)
        for side, what in ((forget, "forget"), (retain, "retain")):
            warn_past_positions(starting_model, side, what, args.max_length)
        if self.reference_mode == "copy" and ref_model is None and reference is None:
            ref_model = frozen_copy(starting_model)  # after the data checks: no copy for a run that is refused
        train_dataset = ForgetRetainDataset(forget, retain, seed=args.pairing_seed)
        eval_pairs = (
            self._eval_pairs(eval_dataset, side_collator, forget, retain, args) if eval_dataset else train_dataset
        )

        super().__init__(
            model=model,
            args=args,
            data_collator=NestedCollator(side_collator),
            train_dataset=train_dataset,
            eval_dataset=eval_pairs,
            processing_class=processing_class,
            callbacks=[_PairingEpochCallback(train_dataset), *(callbacks or [])],
            optimizers=optimizers,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if args.divergence_factor:  # reads the per-step training metrics stored above
            self.add_callback(DivergenceCallback(args.divergence_factor, self._metrics["train"]))
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

    def _eval_pairs(self, eval_dataset: dict, side_collator, forget: Dataset, retain: Dataset | None, args):
        """`{"forget": ds, "retain": ds}` -> pairs whose indices follow the training forget set's (one cache)."""
        if set(eval_dataset) - {"forget", "retain"} or "forget" not in eval_dataset:
            raise ValueError("eval_dataset must be {'forget': dataset, 'retain': dataset (optional)}.")
        eval_forget = self._with_alternates(eval_dataset["forget"], args.seed)
        eval_retain = eval_dataset.get("retain")
        return ForgetRetainDataset(
            prepare_side(eval_forget, side_collator, "eval forget"),
            prepare_side(eval_retain, side_collator, "eval retain") if eval_retain is not None else retain,
            seed=args.pairing_seed,
            index_offset=len(forget),
        )

    def _with_alternates(self, data: Dataset | list[dict], seed: int) -> Dataset:
        """The forget rows, with the strategy's alternate answers (DPO-style methods) as an `alternate` column."""
        dataset = to_dataset(data)
        alternates = self.strategy.alternate_answers(dataset, seed)
        if alternates is None or "alternate" in dataset.column_names:
            return dataset
        return dataset.add_column("alternate", alternates)

    def finetune_on_forget(self, model: nn.Module, dataset: Dataset | None = None) -> nn.Module:
        """Fine-tune `model` in place on this trainer's forget set (or `dataset`: pre-tokenized rows) with this run's
        own arguments (learning rate, epochs, batch size, ...), and return it: the "reinforced" model that one-shot
        strategies (task-vector negation, Who's Harry Potter) edit with. Plain NLL on the forget answers, no
        reference, no adapter of its own, nothing saved."""
        from .strategies.task_vector import ForgetFinetune

        args = dataclasses.replace(
            self.args,
            strategy=ForgetFinetune(),
            strategy_kwargs={},
            use_peft=False,
            reference="none",
            save_strategy="no",
            output_dir=f"{self.args.output_dir}/reinforced",
        )
        UnlearningTrainer(
            model,
            args,
            forget_dataset=dataset if dataset is not None else self.train_dataset.forget,
            processing_class=self.processing_class,
            data_collator=self.data_collator.side_collator,
            objective=self.objective,
        ).train()
        return model

    # ---- reference ----

    def _build_reference(self, ref_model: nn.Module | None, had_adapter: bool) -> Reference | None:
        mode = self.reference_mode
        if mode == "none":
            return None
        family = self.objective.build_reference(self.model, mode, ref_model, had_adapter)
        if family is not None:  # diffusion: the adapter-off UNet or a frozen copy
            return family
        if mode == "cached":
            scorer = self.model
            if ref_model is not None:
                scorer = ref_model.to(self.args.device)
            pairs = [self.train_dataset] + ([self.eval_dataset] if self.eval_dataset is not self.train_dataset else [])
            batches = (
                batch["forget"]
                for pairs_ in pairs
                for batch in DataLoader(
                    pairs_, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator
                )
            )
            total = sum(-(-len(p) // self.args.per_device_eval_batch_size) for p in pairs)
            bar = tqdm(batches, total=total, desc="Reference log-probs (cached)", disable=self.args.disable_tqdm)
            return CachedReference(sequence_logprobs(scorer, self.objective, bar, self.args.device))
        if mode == "adapter":
            peft_model = self.model
            if had_adapter:
                name = snapshot_adapter(peft_model)
                return ModelReference(peft_model, mode, lambda: active_adapter(peft_model, name))
            return ModelReference(peft_model, mode, peft_model.disable_adapter)
        # copy: frozen, on the right device, sharded like the policy under DeepSpeed ZeRO-3
        ref_model.requires_grad_(False)
        ref_model.eval()
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            ref_model = prepare_deepspeed(ref_model, self.accelerator)
        else:
            ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        return ModelReference(ref_model, mode, contextlib.nullcontext)

    # ---- loss, evaluation, logging ----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Train; a one-shot strategy (task-vector negation, ...) applies its edit instead of a training loop.

        `resume_from_checkpoint` (a checkpoint folder, or True for the newest complete one in `output_dir`: one the
        run was killed while writing is skipped) continues the run that wrote it exactly: besides the Trainer's
        weights, optimizer, scheduler, RNG and step, the strategy's state and the cached reference log-probs come
        back from the checkpoint's `unlearning_state.safetensors` (`erasus_hf.resume`), read before any compute; a
        checkpoint of another run is refused."""
        resume_from_checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None and not getattr(self.strategy, "one_shot", False):
            load_resume_state(self, resume_from_checkpoint)  # before SalUn's setup: it reuses the run's mask
        args = (resume_from_checkpoint, *args)
        if not getattr(self.strategy, "one_shot", False):
            setup = getattr(self.strategy, "setup", None)  # e.g. SalUn's saliency mask, from the forget set
            if setup is None:
                return super().train(*args, **kwargs)
            self.log(dict(setup(self)))
            try:
                return super().train(*args, **kwargs)
            finally:
                self.strategy.teardown()
        metrics = self.strategy.apply(self)
        check_finite_weights(self.accelerator.unwrap_model(self.model))
        self.log(dict(metrics))
        return TrainOutput(self.state.global_step, 0.0, metrics)

    def _save_rng_state(self, output_dir: str) -> None:
        """The Trainer's RNG states, then the unlearning run's own state (`erasus_hf.resume.save_resume_state`):
        both are written in `_save_checkpoint` after the weights and before `trainer_state.json`, so a checkpoint
        that the Trainer can resume from holds it (none with `save_only_model`, like the RNG states)."""
        super()._save_rng_state(output_dir)
        save_resume_state(self, output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ctx = StrategyContext(
            model=model,
            objective=self.objective,
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
            metrics = {f"{side}_nll": self.objective.score(model, inputs[side]).mean_nll.mean() for side in inputs}
        self._store_metrics(metrics, "eval")
        return loss.detach(), None, None

    def _store_metrics(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        """Keep this step's metrics, averaged across processes (one gather for all of them)."""
        if not metrics:
            return
        keys = sorted(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
        values = self.accelerator.gather(values[None]).mean(0)
        for key, value in zip(keys, values.tolist(), strict=True):
            self._metrics[mode][key].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the training metrics averaged over the logging window."""
        for key, values in self._metrics["train"].items():
            logs[key] = sum(values) / len(values)
        self._metrics["train"].clear()
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for key, values in self._metrics["eval"].items():
            output.metrics[f"{metric_key_prefix}_{key}"] = sum(values) / len(values)
        self._metrics["eval"].clear()
        if self.metric_suite is not None:
            self.last_evaluation = self.metric_suite.run(
                self.accelerator.unwrap_model(self.model),
                self.processing_class,
                **self.evaluation_data,
                reference=self.evaluation_reference,
            )
            self.last_evaluation.meta["global_step"] = self.state.global_step
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.last_evaluation.summary.items()})
        return output

    # ---- sharing ----

    def create_model_card(
        self,
        evaluation: EvaluationResult | None = None,
        reference_note: str | None = None,
        command: str | None = None,
        datasets: list[str] | None = None,
        model_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the evaluation model card (README.md) to `output_dir`: strategy, hyperparameters, the forget set
        as a count and a SHA-256 fingerprint (never its text), the evaluation (default: the last in-training one)
        and the reproducing command. Runs on the main process; call it after `save_model` (PEFT's own card
        generation rewrites README.md)."""
        if not self.args.should_save:
            return
        from .hub.card import build_model_card, training_arguments, write_model_card

        model = self.accelerator.unwrap_model(self.model)
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        card = build_model_card(
            strategy_name=self.strategy.name,
            paper=self.strategy.paper,
            hyperparameters=self.strategy.hyperparameters,
            training_args={**training_arguments(self.args), "reference_mode": self.reference_mode},
            forget_rows=self.forget_rows,
            retain_count=len(self.retain_rows) if self.retain_rows is not None else None,
            base_model=base,
            is_adapter=is_peft_model(model) and not self.args.merge_adapter,
            evaluation=evaluation if evaluation is not None else self.last_evaluation,
            reference_note=reference_note,
            command=command,
            datasets=datasets,
            model_name=model_name,
        )
        write_model_card(card, self.args.output_dir)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the model repo `args.hub_model_id` (default: the output folder's name) as `Trainer.init_hf_repo`
        does (at construction with `args.push_to_hub`), through `erasus_hf.hub.push`: an `HfApi` at the current
        endpoint, errors explained, the token scrubbed.

        With `args.push_to_hub`, hub_strategy "checkpoint" and "all_checkpoints" are refused: they upload the
        resumable checkpoint folders (optimizer, scheduler and RNG states, pickled), and erasus_hf never uploads a
        checkpoint (see `_push_from_checkpoint`)."""
        from .hub.push import create_model_repo

        if self.args.push_to_hub and self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            raise ValueError(
                f"hub_strategy={self.args.hub_strategy.value!r} uploads the training checkpoints (optimizer, "
                "scheduler and RNG states, pickled); erasus_hf never uploads a checkpoint. Use "
                "hub_strategy='every_save' (the weights at each save) or 'end' (only the final push_to_hub), and "
                "resume from the local checkpoint-* folders."
            )
        self.push_in_progress = None
        if not self.is_world_process_zero():
            return
        self.hub_model_id = create_model_repo(
            self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir)),
            private=self.args.hub_private_repo if private is None else private,
            token=self.args.hub_token if token is None else token,
        )

    def push_to_hub(
        self,
        commit_message: str | None = None,
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        *,
        repo_id: str | None = None,
        evaluation: EvaluationResult | None = None,
        **card_kwargs: Any,
    ) -> str | Future | None:
        """Save the weights (safetensors), the evaluation JSON and the model card to `output_dir`, then upload the
        folder's shippable files in one commit to `repo_id` (default: the repo `args.push_to_hub` created, else
        `args.hub_model_id`) on `revision` (default: `args.hub_revision`, else main). Return the commit URL, or with
        `blocking=False` a `Future` of it (the folder is validated first); None on the other processes (only the
        main process pushes, as with the Trainer).

        `Trainer.push_to_hub`'s arguments, in its order (`private` applies only when the repo is created);
        `card_kwargs` go to `create_model_card`. An in-flight checkpoint push is waited for first, so the final
        commit lands last. Checkpoints, optimizer and RNG states are never uploaded."""
        from .hub.push import files_to_push, push_output

        repo_id = repo_id or self.hub_model_id or self.args.hub_model_id
        if not repo_id and not self.args.push_to_hub:  # with the flag, init_hf_repo named it (on process zero)
            raise ValueError("push_to_hub needs a repo_id (or args.hub_model_id).")
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)  # not save_model(): with args.push_to_hub it pushes, i.e. calls us
        evaluation = evaluation if evaluation is not None else self.last_evaluation
        self.create_model_card(evaluation=evaluation, **card_kwargs)
        if evaluation is not None and self.args.should_save:
            evaluation.save(os.path.join(self.args.output_dir, "eval.json"))
        if not self.is_world_process_zero():
            return None
        push = functools.partial(
            push_output,
            self.args.output_dir,
            repo_id,
            private=self.args.hub_private_repo if private is None else private,
            token=token or self.args.hub_token,
            commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
        )
        self._finish_current_push()
        if blocking:
            return push()
        files_to_push(self.args.output_dir)  # a bad folder is refused here, not in the background
        return self._push_in_background(push)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push a checkpoint save's weights to the repo root, as `Trainer._push_from_checkpoint` does with
        `args.push_to_hub` and hub_strategy "every_save" ("end" pushes nothing here): in the background, commit
        "Training in progress, step N" (epoch N), a save skipped while the previous push is in flight unless
        `hub_always_push`.

        Unlike the Trainer, only what `files_to_push` ships from the checkpoint folder goes up (weights, configs,
        tokenizer, unlearning config): never the checkpoint folder (no `last-checkpoint/`, see `init_hf_repo`),
        the optimizer, scheduler, RNG or trainer state, nor `training_args.bin` (the Trainer writes it to
        `output_dir` and uploads it), nor a card: ours comes with the final `push_to_hub`, with the evaluation.
        The files are hard-linked (copied where links fail) into a private `_hub_push-*` folder of `output_dir`
        first, so rotating the checkpoint away (`save_total_limit`) cannot pull them from under the upload; the
        folder is removed when the push ends. A failed push is logged and training goes on."""
        from .hub.push import files_to_push, push_output

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        names = files_to_push(checkpoint_folder, card=False)
        staging = tempfile.mkdtemp(prefix="_hub_push-", dir=self.args.output_dir)
        for name in names:
            source, target = os.path.join(checkpoint_folder, name), os.path.join(staging, name)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        repo_id, token, revision = self.hub_model_id, self.args.hub_token, self.args.hub_revision

        def push() -> str:
            try:
                return push_output(
                    staging, repo_id, token=token, commit_message=message, revision=revision, card=False
                )
            except Exception as err:
                logger.warning("%s: pushing to %s failed (training goes on): %s", message, repo_id, err)
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        self._push_in_background(push)

    def _push_in_background(self, push: Callable[[], str]) -> Future:
        """Run `push` on the trainer's one upload thread (pushes land in order) and track it as the Trainer tracks
        its own (`push_in_progress`), so `train()` and `push_to_hub()` wait for it (`_finish_current_push`)."""
        if getattr(self, "_hub_pool", None) is None:
            self._hub_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="erasus-hub-push")
        job = self._hub_pool.submit(push)
        if getattr(self, "push_in_progress", None) is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)
        return job

    # ---- saving ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (the files: see `_save`). With `args.push_to_hub`, a user's call (the Trainer's own
        saves pass `_internal_call=True`) then pushes, commit "Model save", as the Trainer does: through
        `push_to_hub`, which saves `output_dir` itself, so the weights are written once, not twice."""
        push = self.args.push_to_hub and not _internal_call
        into_output_dir = output_dir is None or os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir)
        if not (push and into_output_dir):
            super().save_model(output_dir, _internal_call=True)
        if push:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write safetensors only: the adapter alone (not the reference snapshot), the merged model when
        `merge_adapter`, or the full model.

        Complete or absent (`erasus_hf.output_folder.StagedSave`): the files are written into a staging folder,
        checked, then moved into `output_dir`; an interrupted, failed or refused save leaves `output_dir` as it was.
        Refused: a NaN or an infinity in any tensor written (after merging, frozen weights included), and a folder
        holding another run's weights unless `overwrite_output_dir` (that run's files are then replaced). Files
        this run did not write stay (`checkpoint-*/`, `runs/`, `eval.json`, the card)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        target = os.path.abspath(output_dir)
        model = self.accelerator.unwrap_model(self.model)
        remove, carry = self._save_plan(target)
        staged = StagedSave(target, remove=remove, carry=carry)
        with staged as staging:
            self._write_run(model, staging, state_dict)
            bad = non_finite_tensors(staging)
            if bad:
                raise FloatingPointError(
                    f"Refusing to save non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}); {target} was left "
                    "as it was. Lower the learning rate, or check the model before training (a NaN in a frozen "
                    "weight reaches the file through merge_adapter)."
                )
        self.__dict__.setdefault("_saved_files", {})[target] = set(staged.written)

    def _save_plan(self, target: str) -> tuple[list[str], list[str]]:
        """(names to delete from `target` unless the save rewrites them, names to carry into the staging folder):
        this trainer's earlier save there is replaced (its README.md, maybe our card by now, carried for PEFT to
        update); another run's files are replaced only inside `output_dir` (`checkpoint-N`, the Trainer's own) or
        with `overwrite_output_dir`, else refused."""
        previous = self.__dict__.get("_saved_files", {}).get(target)
        if previous is not None:
            return sorted(previous), ["README.md"]
        out = os.path.abspath(self.args.output_dir)
        inside = target != out and os.path.commonpath([target, out]) == out
        if not weight_files(target):
            return [], ["README.md"]
        if not inside:
            check_output_dir(target, self.args.overwrite_output_dir)
        return run_files(target), []

    def _write_run(self, model: nn.Module, output_dir: str, state_dict: dict | None) -> None:
        self.objective.save_weights(model, output_dir, self._adapter_name, self.args.merge_adapter, state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "unlearning_config.json"), "w") as f:
            f.write(redact(self.args.to_json_string()))
        with open(os.path.join(output_dir, "strategy.json"), "w") as f:
            strategy = {"name": self.strategy.name, "paper": self.strategy.paper, **self.strategy.hyperparameters}
            json.dump(redact_json(strategy), f)


def warn_past_positions(model: nn.Module, side: Dataset | None, what: str, max_length: int) -> int:
    """Warn when `max_length` exceeds the model's `max_position_embeddings` and rows of the (tokenized) side are
    longer than that: they reach positions the model never saw (a learned position table fails on them). Return the
    number of such rows."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if side is None or not isinstance(positions, int) or max_length <= positions:
        return 0
    if "input_ids" not in side.column_names:
        return 0
    lengths = [len(ids) for ids in side.with_format(None)["input_ids"]]
    longer = [i for i, n in enumerate(lengths) if n > positions]
    if longer:
        warnings.warn(
            f"max_length={max_length} exceeds the model's max_position_embeddings={positions}, and {len(longer)} "
            f"{what} row(s) are longer (row {longer[0]}: {lengths[longer[0]]} tokens): they reach positions the model "
            f"never saw. Set max_length={positions} to truncate them.",
            stacklevel=3,
        )
    return len(longer)


def embedding_rows(model: nn.Module) -> int | None:
    """The number of token ids the model's input embeddings accept (None when it has none)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embeddings, "num_embeddings", None)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Use EOS as the pad token when there is none (labels mask padding by position, not by id, so the EOS that
    ends each answer stays scored); fail when there is no EOS either."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning("The tokenizer has no pad token; using its EOS token %r for padding.", tokenizer.eos_token)


def resolve_reference_mode(
    requested: str,
    strategy: Strategy,
    retain_loss_name: str,
    peft: bool,
    ref_model: nn.Module | None,
    cacheable: bool = True,
) -> str:
    """The reference mode to build: 'none' | 'cached' | 'adapter' | 'copy' (see `UnlearningConfig.reference`).
    `cacheable` is False for objectives whose per-example scores depend on the rest of the batch (contrastive)."""
    needs = strategy.reference_quantities(retain_loss_name)
    if not needs:
        if requested not in ("auto", "none") or ref_model is not None:
            logger.warning("Strategy %r needs no reference model; none is built.", strategy.name)
        return "none"
    what = f"strategy {strategy.name!r} with retain_loss={retain_loss_name!r}"
    if requested == "none":
        raise ValueError(f"{what} needs a reference model; set reference to 'auto', 'adapter', 'copy' or 'cached'.")
    if requested == "auto":
        if needs == {"sequence_logprob"} and cacheable:
            return "cached"
        return "copy" if ref_model is not None or not peft else "adapter"
    if requested == "cached" and not cacheable:
        raise ValueError(
            f"{what}: the objective's log-probs depend on the whole batch, so they cannot be cached per example; use "
            "reference='adapter' (with PEFT) or 'copy'."
        )
    if requested == "cached" and "scores" in needs:
        raise ValueError(f"{what} needs reference logits, which reference='cached' cannot give; use adapter or copy.")
    if requested == "adapter" and not peft:
        raise ValueError("reference='adapter' needs a PEFT model: set use_peft=True or pass peft_config.")
    if requested == "adapter" and ref_model is not None:
        raise ValueError("reference='adapter' uses the model itself; do not pass ref_model as well.")
    return requested


def check_same_vocabulary(model: nn.Module, ref_model: nn.Module) -> None:
    def vocab(m: nn.Module) -> int | None:
        return getattr(getattr(m, "config", None), "vocab_size", None)

    if vocab(model) != vocab(ref_model):
        raise ValueError(
            f"The reference model's vocabulary ({vocab(ref_model)}) differs from the model's ({vocab(model)}); "
            "log-prob ratios between them are meaningless."
        )


# what a reference must share with the model for its log-probs, logits and hidden states to line up
REFERENCE_CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_labels")


def check_reference_model(model: nn.Module, ref_model: nn.Module) -> None:
    """Refuse a `ref_model` that cannot be the starting model: another vocabulary, class, `model_type`, hidden size,
    depth or label count (a shape error mid-step otherwise, or log-prob ratios between unrelated models)."""
    check_same_vocabulary(model, ref_model)

    def base(m: nn.Module) -> nn.Module:
        return m.get_base_model() if is_peft_model(m) else m

    model, ref_model = base(model), base(ref_model)
    differences = []
    if type(model).__name__ != type(ref_model).__name__:
        differences.append(f"class {type(ref_model).__name__} vs {type(model).__name__}")
    config, ref_config = getattr(model, "config", None), getattr(ref_model, "config", None)
    for name in REFERENCE_CONFIG_FIELDS:
        mine, theirs = getattr(config, name, None), getattr(ref_config, name, None)
        if mine is not None and theirs is not None and mine != theirs:
            differences.append(f"{name} {theirs!r} vs {mine!r}")
    if differences:
        raise ValueError(
            f"ref_model is not the model's architecture (ref_model vs model: {', '.join(differences)}). The "
            "reference is the starting model: pass a frozen copy of it, or leave ref_model=None to have one built "
            "(UnlearningConfig.reference)."
        )


def prepare_side(data: Any, side_collator: Any, what: str, vocab_size: int | None = None) -> Dataset:
    """A `datasets.Dataset` of the side, checked (rows a `QACollator` reads: text, or ids inside `vocab_size`; see
    `check_qa_rows`), tokenized once up front when the collator can tokenize, checked for emptiness and for rows with
    no scored token."""
    dataset = to_dataset(data, what)
    if len(dataset) == 0:
        raise ValueError(f"The {what} set is empty.")
    if isinstance(side_collator, QACollator):
        check_qa_rows(dataset, what, side_collator.question_key, side_collator.answer_key, vocab_size)
    tokenize = getattr(side_collator, "tokenize", None)
    if tokenize is None:
        return dataset
    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names, desc=f"Tokenizing {what}")
    empty = [i for i, labels in enumerate(tokenized["labels"]) if all(t == -100 for t in labels)]
    if empty:
        raise ValueError(
            f"{len(empty)} {what} example(s) have no answer token left (all labels are -100), e.g. rows {empty[:5]}: "
            f"the prompt fills max_length={side_collator.max_length} or the answer is empty."
        )
    return tokenized


def warn_overlap(forget: Dataset, retain: Dataset | None) -> int:
    """Warn (with the count) when forget examples also appear in the retain set; return the count."""
    if retain is None or "input_ids" not in forget.column_names or "input_ids" not in retain.column_names:
        return 0
    retain_rows = {tuple(ids) for ids in retain["input_ids"]}
    overlap = sum(tuple(ids) in retain_rows for ids in forget["input_ids"])
    if overlap:
        warnings.warn(
            f"{overlap} forget example(s) also appear in the retain set; the two terms pull them both ways.",
            stacklevel=3,
        )
    return overlap


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with a NaN or an infinity in any floating-point tensor of its state dict, frozen weights
    included (what a full or merged save would write); saves check the files they write (`_save`)."""
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise FloatingPointError(f"Refusing to save non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}).")
