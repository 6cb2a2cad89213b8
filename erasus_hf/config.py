"""`UnlearningConfig`: the `TrainingArguments` of an unlearning run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

RETAIN_LOSSES = ("nll", "kl", "none")
RETAIN_KL_POSITIONS = ("answer", "all")
REFERENCE_MODES = ("auto", "adapter", "copy", "cached", "none")


@dataclass
class UnlearningConfig(TrainingArguments):
    """Training arguments plus the unlearning options.

    The defaults run on a CPU out of the box (no mixed precision is forced) and follow the published setting of each
    strategy; a strategy's own hyperparameters go in `strategy_kwargs` (for example `{"beta": 0.1}` for NPO).
    """

    strategy: str = field(default="npo", metadata={"help": "Unlearning strategy, by registry name (e.g. ga, npo)."})
    strategy_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Hyperparameters of the strategy, as a dict or a JSON string (e.g. '{\"beta\": 0.1}')."},
    )
    forget_weight: float = field(default=1.0, metadata={"help": "gamma: weight of the forget term."})
    retain_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the retain term."})
    retain_loss: str = field(
        default="nll",
        metadata={
            "help": "Retain term: 'nll' (likelihood of the retain answers), 'kl' (KL(pi_ref || pi_theta) on retain "
            "answer tokens) or 'none'.",
            "choices": list(RETAIN_LOSSES),
        },
    )
    retain_kl_positions: str = field(
        default="answer",
        metadata={
            "help": "Positions of the retain_loss='kl' term: 'answer' (KL per answer token, averaged per example, "
            "then over examples) or 'all' (TOFU's and open-unlearning's: every position of the padded retain batch, "
            "prompt and padding included, one mean over all of them).",
            "choices": list(RETAIN_KL_POSITIONS),
        },
    )
    reference: str = field(
        default="auto",
        metadata={
            "help": "Frozen reference model: 'adapter' (PEFT adapter off, no extra weights), 'copy' (frozen copy), "
            "'cached' (sequence log-probs of the forget set computed once before training), 'none', or 'auto' "
            "(cached when the strategy only needs forget log-probs, else adapter with PEFT, else copy).",
            "choices": list(REFERENCE_MODES),
        },
    )
    use_peft: bool = field(default=False, metadata={"help": "Wrap the model with a LoRA adapter and train only it."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that get a LoRA adapter; default 'all-linear' (every linear layer but the head)."},
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "save_model writes the merged model instead of the adapter alone."}
    )
    max_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt + answer (truncated right)."})
    pairing_seed: int | None = field(
        default=None, metadata={"help": "Seed of the retain-partner draw (defaults to `seed`)."}
    )

    # Unlearning batches are nested ({"forget": ..., "retain": ...}); the Trainer must not drop their columns.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: unlearning batches are nested dicts."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.strategy_kwargs, str):
            try:
                self.strategy_kwargs = json.loads(self.strategy_kwargs) if self.strategy_kwargs.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"strategy_kwargs is not valid JSON: {self.strategy_kwargs!r}") from err
        if self.strategy_kwargs is None:
            self.strategy_kwargs = {}
        if not isinstance(self.strategy_kwargs, dict):
            raise ValueError(f"strategy_kwargs must be a dict or a JSON object, got {type(self.strategy_kwargs)}")
        if self.retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"retain_loss must be one of {RETAIN_LOSSES}, got {self.retain_loss!r}")
        if self.retain_kl_positions not in RETAIN_KL_POSITIONS:
            raise ValueError(
                f"retain_kl_positions must be one of {RETAIN_KL_POSITIONS}, got {self.retain_kl_positions!r}: "
                "'answer' averages the KL over answer tokens, 'all' over every position of the batch (TOFU's code)."
            )
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must stay False: unlearning batches are nested dicts.")
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per data loader
        if self.pairing_seed is None:
            self.pairing_seed = self.seed
