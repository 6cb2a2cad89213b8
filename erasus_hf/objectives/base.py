"""The contract between a model family and the strategies.

A strategy never calls a model itself: it asks the objective of the model's family to *score* one side of a batch,
and gets back per-token log-probabilities of the targets, their mask, the aligned logits and, on request, hidden
states. A classifier is scored as a sequence of one token (its label), so every likelihood-based strategy (GA, NPO,
SimNPO, ...) serves every family that can give a per-example likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Scores:
    """What one forward pass tells about one side of a batch.

    `token_logprobs[b, t]` is log p(target_t | context) and is 0 where `mask` is False (prompt, padding, -100).
    `logits[b, t]` are the logits that predicted target t (already shifted for causal LMs).
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None

    @property
    def num_tokens(self) -> torch.Tensor:
        """[B] number of scored (answer) tokens per example."""
        return self.mask.sum(-1)

    @property
    def sequence_logprob(self) -> torch.Tensor:
        """[B] log p(y | x): the sum of the answer tokens' log-probabilities."""
        return self.token_logprobs.sum(-1)

    @property
    def mean_nll(self) -> torch.Tensor:
        """[B] per-example negative log-likelihood, averaged over the example's answer tokens."""
        return -self.sequence_logprob / self.num_tokens.clamp_min(1)


class Objective:
    """How to score a batch for one model family. Subclasses implement `score` and `validate_model`, and `matches`
    when the family can be recognised from the model alone (`get_objective(None, model)`).

    Optional instance attribute `collator`: the side collator for this family's rows (used when the caller passes
    none); a collator with a `tokenize(row)` method has the rows tokenized once up front.
    """

    name: ClassVar[str]
    peft_task_type: ClassVar[str | None] = None  # PEFT's task type for the LoRA wrapper (e.g. "CAUSAL_LM")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether `model` (possibly PEFT/DDP-wrapped) belongs to this family; used for auto-detection."""
        return False

    def validate_model(self, model: nn.Module) -> None:
        """Raise a clear error when `model` cannot be scored by this objective."""

    def collator_for(self, processing_class: Any | None, max_length: int) -> Any | None:
        """The side collator for this family's rows when the trainer is given none (the trainer's `processing_class`
        and `max_length` at hand); None means rows that are already numeric and stack as they are."""
        return getattr(self, "collator", None)

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        raise NotImplementedError

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].shape[0]


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available by `cls.name`. Auto-detection tries objectives in registration
    order, so register the more specific families first."""
    OBJECTIVES[cls.name] = cls
    return cls


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under a PEFT or DDP wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        else:
            return model


def token_logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and the mask of scored positions, for logits [B, T, V] aligned with labels [B, T].

    Uses a fused cross-entropy in the logits' own dtype, so no float32 log-softmax over the whole vocabulary is
    materialised; positions labelled -100 give 0 and are left out of the mask.
    """
    mask = labels != -100
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    return -nll, mask
