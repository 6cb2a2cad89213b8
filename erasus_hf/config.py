"""`UnlearningConfig`: the `TrainingArguments` of an unlearning run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from .redaction import redact, redact_json, register_secret

RETAIN_LOSSES = ("nll", "kl", "none")
RETAIN_KL_POSITIONS = ("answer", "all")
REFERENCE_MODES = ("auto", "adapter", "copy", "cached", "none")
DIVERGENCE_FACTOR = 10.0  # see erasus_hf.divergence


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    # transformers 5 removed TrainingArguments.overwrite_output_dir; this one is erasus_hf's own
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let this run replace another run saved in output_dir (its weights, configs, tokenizer files, "
            "card and eval.json go when this run's model is saved; subfolders stay). Without it, an output_dir that "
            "holds weights is refused when the trainer is built."
        },
    )
    divergence_factor: float | None = field(
        default=DIVERGENCE_FACTOR,
        metadata={
            "help": "Stop training with TrainingDivergedError (nothing saved) at the first step whose retain loss "
            "(without a retain term: the forget loss) passes this multiple of its starting value, the start counted "
            "as at least 1. None or 0 turns the check off."
        },
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
        self._check_run_values()
        self._check_divergence_factor()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per data loader
        if self.pairing_seed is None:
            self.pairing_seed = self.seed
        register_secret(self.hub_token)

    def _check_divergence_factor(self) -> None:
        if self.divergence_factor == 0:
            self.divergence_factor = None
        if self.divergence_factor is not None and not (_finite(self.divergence_factor) and self.divergence_factor > 1):
            raise ValueError(
                f"divergence_factor must be a number > 1 (a multiple of the starting loss), or None/0 to turn the "
                f"divergence check off; got {self.divergence_factor!r}. The default is {DIVERGENCE_FACTOR}."
            )

    def _check_run_values(self) -> None:
        """Refuse values that give a run which silently does nothing or the wrong thing: a non-positive max_length
        (a negative one cut tokens off every row), negative or non-finite loss weights, a zero learning rate or no
        training steps (an unchanged model saved as if unlearned)."""
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(
                f"max_length must be a positive number of tokens (prompt + answer), got {self.max_length!r}; "
                "the default is 512."
            )
        for name in ("forget_weight", "retain_weight"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(
                    f"{name} must be a finite number >= 0 (the weight of its loss term), got {value!r}; default 1."
                )
        if not _finite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate!r}: at 0 the model would not "
                "change and be saved as if unlearned. E.g. learning_rate=1e-5."
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps must be > 0 (a number of optimizer steps) or -1 (train num_train_epochs), got "
                f"{self.max_steps!r}."
            )
        if self.max_steps < 0 and (not _finite(self.num_train_epochs) or self.num_train_epochs <= 0):
            raise ValueError(
                f"num_train_epochs must be a finite number > 0 (passes over the forget set), got "
                f"{self.num_train_epochs!r}: nothing would be trained. Or set max_steps > 0."
            )

    # transformers masks the `*_token` fields in `to_dict` (so `to_json_string`: unlearning_config.json, the
    # TensorBoard args) and in `str`; redaction also covers a token inside another field (`run_name`, ...), and the
    # `repr` the dataclass decorator would generate shows every field verbatim.
    def to_dict(self) -> dict[str, Any]:
        return redact_json(super().to_dict())

    def __str__(self) -> str:
        return redact(super().__str__())

    __repr__ = __str__
