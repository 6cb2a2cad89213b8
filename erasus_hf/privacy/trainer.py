"""`DPTrainer`: DP-SGD fine-tuning of a causal LM with Opacus, inside `transformers.Trainer`.

How the pieces meet (Opacus 1.6's non-wrapping mode, made for transformers and accelerate):

- `PrivacyEngine.make_private_with_epsilon(..., wrap_model=False)` attaches Opacus' per-sample-gradient hooks to the
  model itself (a `GradSampleHooks` controller) instead of wrapping it, so the Trainer, accelerate and PEFT keep
  the model they know; it returns the `DPOptimizer` (per-example clipping to `max_grad_norm`, Gaussian noise, the
  accountant's step hook) and a Poisson-sampling `DPDataLoader`. It needs the model, the optimizer and the data
  loader together, so it runs when the Trainer first asks for the training loader (`get_train_dataloader`, before
  `_prepare_for_training` asks for the optimizer, which is then the private one).
- The loss is a mean over examples of each example's mean answer-token NLL (`CausalLMObjective.score(...).mean_nll`).
  Each example's gradient then depends on that example alone (the Trainer's usual loss divides by the batch's total
  token count, which ties every example's gradient to the others' lengths), and Opacus' "mean" reduction recovers it.
- The Trainer zeroes `p.grad` only; the `DPOptimizer` clears the per-sample gradients at the start of each step. A
  batch left empty by Poisson sampling is a noise-only step (zero per-sample gradients, the noise still added and
  the step still counted). After each backward pass every trainable parameter must hold a per-sample gradient, so
  no parameter ever escapes clipping silently.
- The Trainer's own gradient clipping and `grad_norm` log are off: they read the non-private summed gradient.

Not supported here (refused before any compute): gradient accumulation, fp16 loss scaling, activation checkpointing,
several processes or GPUs, resuming from a checkpoint (the accountant restarts), a second `train()`, rows that give
more than one example (windows of a long text: the unit of privacy is the row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput

from ..data.collator import QACollator
from ..data.formats import TextFormat
from ..data.prepare import ensure_pad_token, prepare_side
from ..data.validation import to_dataset
from ..objectives import CausalLMObjective, is_causal_lm
from ..peft_utils import is_peft_model
from .config import DPConfig
from .report import DPReport, require_opacus

DATASET_NAME = "DP training"  # how the training rows are named in messages


class DPCollator:
    """The causal-LM collator, plus the empty batch Poisson sampling can draw (zero rows, the same keys)."""

    def __init__(self, collator: QACollator) -> None:
        self.collator = collator

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {key: empty.clone() for key in ("input_ids", "attention_mask", "labels", "position_ids")}
        return self.collator(examples)


class DPTrainer(Trainer):
    """Trainer for DP-SGD fine-tuning of a causal LM (the model that will later receive deletion requests).

    Args:
        model: a `*ForCausalLM` model, or a `PeftModel` of one with a trainable adapter.
        args: a `DPConfig` (target epsilon and delta, clipping bound, accountant, ...).
        train_dataset: the private rows, in any format of `erasus_hf.data.formats.TextFormat` (question/answer,
            prompt/completion, chat messages, pre-tokenized); each row must give one example.
        processing_class: the tokenizer.
        eval_dataset: rows to evaluate on (a held-out set: evaluation numbers on the private rows are not
            privatised).
        peft_config: a PEFT config (e.g. `LoraConfig`) to wrap the model with; then only the adapter is trained.
        text_format: how rows become tokens; default `TextFormat()` (pass `UnlearningConfig(...).text_format()` to
            train the layout the later unlearning run will use).
        callbacks: Trainer callbacks.

    After `train()`, `privacy_report()` is the accountant's (epsilon, delta); `save_model` writes it as
    `privacy.json` beside the weights.
    """

    def __init__(
        self,
        model: nn.Module,
        args: DPConfig,
        train_dataset: Dataset | list[dict],
        processing_class: PreTrainedTokenizerBase,
        eval_dataset: Dataset | list[dict] | None = None,
        peft_config: Any | None = None,
        text_format: TextFormat | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        opacus = require_opacus()
        if not isinstance(args, DPConfig):
            raise TypeError(f"args must be an erasus_hf.privacy.DPConfig, got {type(args).__name__}.")
        if processing_class is None:
            raise ValueError("A causal LM needs its tokenizer: pass processing_class=tokenizer.")
        ensure_pad_token(processing_class)
        model = _with_adapter(model, peft_config)
        _check_model(model, opacus)
        collator = QACollator(processing_class, max_length=args.max_length, text_format=text_format or TextFormat())
        train, self.row_format = _prepare_rows(train_dataset, collator, DATASET_NAME)
        evaluation = _prepare_rows(eval_dataset, collator, "DP eval")[0] if eval_dataset is not None else None
        self.delta = _resolve_delta(args.target_delta, len(train))
        super().__init__(
            model=model,
            args=args,
            data_collator=DPCollator(collator),
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise ValueError(
                f"DPTrainer runs on one device (world_size={self.args.world_size}, n_gpu={self.args.n_gpu}): "
                "distributed DP-SGD needs Opacus' distributed sampler and optimizer, not wired here. Run one process "
                "on one device (CUDA_VISIBLE_DEVICES=0)."
            )
        self.objective = CausalLMObjective()
        self.privacy_engine = None
        self.grad_sample_hooks = None
        self.dp_optimizer = None
        self._dp_loader: DataLoader | None = None
        self._planned_steps: int | None = None
        self._trained = False

    # ---- training

    def train(
        self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, ignore_keys_for_eval=None, **kwargs
    ) -> TrainOutput:
        """Train with DP-SGD once, then detach Opacus' hooks from the model (it is a plain model again) and add the
        accountant's epsilon to the metrics (`train_epsilon`)."""
        if resume_from_checkpoint:
            raise ValueError(
                "DPTrainer does not resume from checkpoints: the privacy accountant and the noise, set for the whole "
                "run, would restart. Train again from the starting model."
            )
        if self._trained:
            raise RuntimeError(
                "This DPTrainer has trained already; its noise was set for that run's steps and a second run would "
                "spend budget its accountant does not count. Build a new DPTrainer (the epsilons of two runs on the "
                "same rows add up)."
            )
        try:
            output = super().train(trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self._trained = True
            self._finish()
        report = self.privacy_report()
        output.metrics["train_epsilon"] = report.epsilon
        self.log({"train_epsilon": report.epsilon})
        return output

    def get_train_dataloader(self) -> DataLoader:
        """The Poisson-sampling loader of `make_private_with_epsilon`, made together with the private optimizer."""
        if self._dp_loader is None:
            self._make_private()
        return self._dp_loader

    def _make_private(self) -> None:
        opacus = require_opacus()
        plain = DataLoader(
            self.train_dataset.with_format(None),
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        self.create_optimizer()  # the Trainer's optimizer (args.optim), made private below
        self._planned_steps = self._count_planned_steps(len(plain))
        self.privacy_engine = opacus.PrivacyEngine(accountant=self.args.accountant, secure_mode=self.args.secure_mode)
        common = dict(
            module=self.model,
            optimizer=self.optimizer,
            data_loader=plain,
            max_grad_norm=self.args.max_grad_norm,
            poisson_sampling=True,
            wrap_model=False,
            grad_sample_mode="hooks",
            loss_reduction="mean",
        )
        if self.args.target_epsilon is not None:
            # Opacus plans int(epochs / sample_rate) steps; half a step more keeps the float division from landing
            # one step short of the planned count (which would set too little noise).
            hooks, optimizer, loader = self.privacy_engine.make_private_with_epsilon(
                **common,
                target_epsilon=self.args.target_epsilon,
                target_delta=self.delta,
                epochs=(self._planned_steps + 0.5) / len(plain),
                epsilon_tolerance=self.args.epsilon_tolerance,
            )
        else:
            hooks, optimizer, loader = self.privacy_engine.make_private(
                **common, noise_multiplier=self.args.noise_multiplier
            )
        # Opacus' empty-batch collation learns the batch's structure from the first non-empty batch; ours knows it.
        loader.collate_fn = self.data_collator
        self.grad_sample_hooks, self.dp_optimizer, self._dp_loader = hooks, optimizer, loader
        self.optimizer = optimizer

    def _count_planned_steps(self, steps_per_epoch: int) -> int:
        """The optimizer steps the Trainer will take (its own rule, with one batch per step)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * steps_per_epoch)

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        self.dp_optimizer.zero_grad(set_to_none=True)  # the last step's per-sample gradients (Trainer zeroes p.grad)
        if inputs["input_ids"].shape[0] == 0:
            return self._empty_step()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._check_per_sample_gradients(len(inputs["input_ids"]))
        return loss

    def _empty_step(self) -> torch.Tensor:
        """A Poisson batch with no example: zero per-sample gradients, so the step adds noise only (and counts)."""
        for p in self.dp_optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return torch.zeros((), device=self.args.device)

    def _check_per_sample_gradients(self, batch_size: int) -> None:
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            grad_sample = getattr(param, "grad_sample", None)
            if grad_sample is None or len(grad_sample) != batch_size:
                raise RuntimeError(
                    f"Parameter {name!r} has no per-example gradient for this batch of {batch_size}: its update would "
                    "escape per-example clipping. Freeze it (requires_grad=False) or use layers Opacus supports."
                )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean over examples of each example's mean answer-token NLL (see the module's docstring)."""
        scores = self.objective.score(model, inputs)
        loss = scores.mean_nll.mean()
        return (loss, {"logits": scores.logits}) if return_outputs else loss

    def _clip_grad_norm(self, model: nn.Module) -> None:
        """Off: DP-SGD clips each example's gradient (the `DPOptimizer`); the summed gradient is not private."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        """Off: the norm of the non-private summed gradient is not logged."""
        return None

    def _finish(self) -> None:
        """Detach Opacus from the model: hooks removed, per-sample attributes deleted."""
        if self.grad_sample_hooks is not None:
            self.grad_sample_hooks.cleanup()
            self.grad_sample_hooks = None

    # ---- the guarantee

    def privacy_report(self) -> DPReport:
        """The accountant's (epsilon, delta) for the steps taken so far, and the settings behind it."""
        if self.privacy_engine is None:
            raise RuntimeError("No DP-SGD step has been set up yet: call train() first.")
        opacus = require_opacus()
        history = self.privacy_engine.accountant.history
        steps = sum(entry[2] for entry in history)
        if not steps:
            epsilon = 0.0
        elif self.dp_optimizer.noise_multiplier == 0:  # no noise, no guarantee (the accountants cannot say so)
            epsilon = math.inf
        else:
            epsilon = self.privacy_engine.get_epsilon(self.delta)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return DPReport(
            epsilon=float(epsilon),
            delta=self.delta,
            accountant=self.args.accountant,
            noise_multiplier=float(self.dp_optimizer.noise_multiplier),
            max_grad_norm=float(self.args.max_grad_norm),
            sample_rate=1 / len(self._dp_loader),
            expected_batch_size=int(self.dp_optimizer.expected_batch_size),
            steps=int(steps),
            planned_steps=int(self._planned_steps),
            examples=len(self.train_dataset),
            target_epsilon=self.args.target_epsilon,
            epsilon_tolerance=self.args.epsilon_tolerance if self.args.target_epsilon is not None else None,
            trained="LoRA adapter" if is_peft_model(self.model) else "full model",
            trainable_parameters=trainable,
            secure_mode=self.args.secure_mode,
            opacus_version=opacus.__version__,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The weights, and `privacy.json` (the epsilon spent up to this save) once a step has been set up."""
        super()._save(output_dir, state_dict=state_dict)
        if self.privacy_engine is not None:
            self.privacy_report().save(output_dir if output_dir is not None else self.args.output_dir)


def _with_adapter(model: nn.Module, peft_config: Any | None) -> nn.Module:
    if peft_config is None:
        if is_peft_model(model) and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "The PeftModel has no trainable parameter (PeftModel.from_pretrained loads adapters frozen): load it "
                "with is_trainable=True."
            )
        return model
    if is_peft_model(model):
        raise ValueError("The model already carries a PEFT adapter; pass peft_config=None to train through it.")
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def _check_model(model: nn.Module, opacus: Any) -> None:
    """A causal LM whose every trainable layer Opacus can compute per-example gradients for."""
    if not is_causal_lm(model):
        raise ValueError(f"DPTrainer trains causal LMs (*ForCausalLM), got {type(model).__name__}.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("The model has no trainable parameter: nothing to train.")
    errors = opacus.validators.ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:5])
        raise ValueError(
            f"Opacus cannot train this model privately ({len(errors)} problem(s)): {listed}. "
            "opacus.validators.ModuleValidator.fix(model) replaces some layers (BatchNorm -> GroupNorm)."
        )


def _prepare_rows(data: Any, collator: QACollator, what: str) -> tuple[Dataset, str | None]:
    """The rows checked and tokenized (`prepare_side`), each giving one example: the unit of privacy is the row."""
    rows = to_dataset(data, what)
    tokenized, row_format = prepare_side(rows, collator, what)
    if len(tokenized) != len(rows):
        raise ValueError(
            f"The {what} rows give {len(tokenized)} examples for {len(rows)} rows ({row_format!r} rows longer than "
            f"max_length={collator.max_length} are cut into windows). DP-SGD bounds one example's influence, so a "
            "row of several windows would be covered several times over: split long texts into rows of at most "
            "max_length tokens yourself, or raise max_length."
        )
    return tokenized, row_format


def _resolve_delta(target_delta: float | None, n: int) -> float:
    """`target_delta`, or 1 / (10 n); refused at or above 1/n, where the guarantee would allow leaking a row."""
    delta = target_delta if target_delta is not None else 1 / (10 * n)
    if delta >= 1 / n:
        raise ValueError(
            f"target_delta={delta:g} is not below 1/n = {1 / n:g} for n={n} training rows: a mechanism that publishes "
            f"one random row in the clear is (0, 1/n)-DP. Use target_delta <= {1 / (10 * n):.3g} (the default, "
            "None, is 1 / (10 n))."
        )
    return delta
