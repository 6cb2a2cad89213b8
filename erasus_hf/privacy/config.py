"""`DPConfig`: the arguments of a DP-SGD fine-tuning run, TRL style (`TrainingArguments` plus its own fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

ACCOUNTANTS = ("prv", "rdp")
"""Opacus' accountants offered here: "prv" (privacy random variables, Gopi et al. 2021, the tightest; Opacus'
default) and "rdp" (Renyi DP, Mironov 2017, the classic, slightly looser bound)."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DPConfig(TrainingArguments):
    """Training arguments plus the privacy options of `DPTrainer`.

    The guarantee is (epsilon, delta)-DP with respect to one training example (one row of `train_dataset`): the
    released weights change in distribution by at most e^epsilon (plus delta) whether or not any single row was in the
    training set. Give the target and Opacus' accountant sets the noise for the planned steps
    (`target_epsilon`, the default), or give the noise and read the accountant's epsilon at the end
    (`noise_multiplier`, with `target_epsilon=None`).

    `max_grad_norm` is the per-example clipping bound C of DP-SGD (each example's gradient is scaled down to norm at
    most C before the sum and the noise); the batch gradient is not clipped again. Batches are Poisson-sampled with
    rate `per_device_train_batch_size / n` (their size varies around it), and one batch is one optimizer step:
    `gradient_accumulation_steps` must stay 1.
    """

    target_epsilon: float | None = field(
        default=8.0,
        metadata={
            "help": "The epsilon to reach at the end of training (the accountant sets the noise for it); None when "
            "noise_multiplier is given."
        },
    )
    target_delta: float | None = field(
        default=None,
        metadata={
            "help": "delta of the guarantee; default 1 / (10 n) for n training rows. Must be below 1/n: a mechanism "
            "that publishes one random row in the clear is (0, 1/n)-DP."
        },
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "The noise's standard deviation over max_grad_norm, instead of a target_epsilon (set "
            "target_epsilon=None); the accountant's epsilon is reported at the end."
        },
    )
    accountant: str = field(
        default="prv",
        metadata={"help": "Privacy accountant: 'prv' (tightest, Opacus' default) or 'rdp'.", "choices": ACCOUNTANTS},
    )
    epsilon_tolerance: float = field(
        default=0.01,
        metadata={
            "help": "Precision of the noise search: the epsilon reached after every planned step lies in "
            "[target_epsilon - epsilon_tolerance, target_epsilon]."
        },
    )
    secure_mode: bool = field(
        default=False,
        metadata={
            "help": "Cryptographically secure noise and sampling (needs torchcsprng). Off for experiments; on for a "
            "model you release."
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "Maximum tokens of an example (prompt + answer, truncated on the right)."}
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "DP-SGD's per-example clipping bound C (the batch gradient is not clipped again)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_budget()
        self._check_training()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per data loader

    def _check_budget(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "Give one of target_epsilon (the accountant sets the noise for it, e.g. target_epsilon=8.0) and "
                "noise_multiplier (with target_epsilon=None); got target_epsilon="
                f"{self.target_epsilon!r}, noise_multiplier={self.noise_multiplier!r}."
            )
        if self.target_epsilon is not None and not (_finite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon!r}.")
        if self.noise_multiplier is not None and not (_finite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}.")
        if self.target_delta is not None and not (_finite(self.target_delta) and 0 < self.target_delta < 1):
            raise ValueError(
                f"target_delta must be in (0, 1) and below 1/n for n training rows, got {self.target_delta!r}; "
                "None gives 1 / (10 n)."
            )
        if not (_finite(self.epsilon_tolerance) and self.epsilon_tolerance > 0):
            raise ValueError(f"epsilon_tolerance must be a finite number > 0, got {self.epsilon_tolerance!r}.")
        if self.target_epsilon is not None and self.epsilon_tolerance >= self.target_epsilon:
            raise ValueError(
                f"epsilon_tolerance={self.epsilon_tolerance} must be below target_epsilon={self.target_epsilon}."
            )
        if not (_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(
                f"max_grad_norm is DP-SGD's per-example clipping bound and must be a finite number > 0, got "
                f"{self.max_grad_norm!r}: without a bound one example's influence is unbounded. E.g. 1.0."
            )

    def _check_training(self) -> None:
        """Settings under which the accountant's number would not describe the training that runs."""
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: with DP-SGD one Poisson-sampled "
                "batch is one noisy step (the accountant counts steps at the batch's sampling rate). Keep it 1 and "
                "set the expected batch size with per_device_train_batch_size."
            )
        if self.fp16:
            raise ValueError(
                "fp16=True scales the loss before the backward pass, so the per-example gradients are clipped at the "
                "wrong scale; train in float32 or bf16."
            )
        for name in ("gradient_checkpointing", "activation_checkpointing"):
            if getattr(self, name, False):
                raise ValueError(
                    f"{name}=True recomputes activations in the backward pass, which Opacus' per-example gradient "
                    f"hooks do not support; set {name}=False."
                )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(f"max_length must be a positive number of tokens, got {self.max_length!r}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be > 0 or -1 (train num_train_epochs), got {self.max_steps!r}.")
        if self.max_steps < 0 and not (_finite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ValueError(f"num_train_epochs must be a finite number > 0, got {self.num_train_epochs!r}.")
