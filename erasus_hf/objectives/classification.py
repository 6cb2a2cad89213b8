"""Classifiers: any `nn.Module` that returns class logits, scored as a one-token sequence (its label)."""

from __future__ import annotations

import torch
from torch import nn

from ..data.collator import NOT_MODEL_INPUTS
from .base import Objective, Scores, token_logprobs_from_logits


class ClassificationObjective(Objective):
    """Calls `model(**inputs)` with every batch key but labels and bookkeeping keys; reads `.logits` or the
    returned tensor. Registered last: it is the fallback of auto-detection for any module returning logits."""

    name = "classification"

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
        if hidden_layer is not None:
            inputs["output_hidden_states"] = True
        outputs = model(**inputs)
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        if logits.dim() != 2:
            raise ValueError(
                f"The classification objective expects logits [batch, classes], got {tuple(logits.shape)}."
            )
        logits = logits[:, None, :]
        logprobs, mask = token_logprobs_from_logits(logits, batch["labels"][:, None])
        hidden = None
        if hidden_layer is not None:
            hidden_states = getattr(outputs, "hidden_states", None)
            if hidden_states is None:
                raise ValueError(f"{type(model).__name__} does not return hidden states.")
            hidden = hidden_states[hidden_layer]
        return Scores(token_logprobs=logprobs, mask=mask, logits=logits, hidden_states=hidden)
