"""Causal language models: next-token prediction on the scored tokens (answers, completions, assistant turns, text),
the rest masked with -100."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..data.collator import QACollator
from ..data.prepare import ensure_pad_token
from .base import Objective, Scores, register_objective, token_logprobs_from_logits, unwrap_model


def is_causal_lm(model: nn.Module) -> bool:
    base = unwrap_model(model)
    return (
        isinstance(base, PreTrainedModel)
        and type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        and not getattr(base.config, "is_encoder_decoder", False)
    )


@register_objective
class CausalLMObjective(Objective):
    """Scores `labels[:, 1:]` with the logits of positions `:-1` (labels are shifted here, never by the collator)."""

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_causal_lm(model)

    def validate_model(self, model: nn.Module) -> None:
        if not is_causal_lm(model):
            got = type(unwrap_model(model)).__name__
            raise ValueError(
                f"The causal-LM objective needs a decoder-only *ForCausalLM model, got {got}. "
                "For a model that returns class logits use objective='classification'."
            )

    def prepare_processing_class(self, processing_class: Any | None) -> None:
        """The tokenizer is required; without a pad token it pads with EOS (`ensure_pad_token`)."""
        if processing_class is None:
            raise ValueError("A causal LM needs its tokenizer: pass processing_class=tokenizer.")
        ensure_pad_token(processing_class)

    def collator_for(self, processing_class: Any | None, args: Any) -> QACollator:
        """`QACollator` with the run's `TextFormat`: rows of every TRL format, what is not scored masked."""
        self.prepare_processing_class(processing_class)
        return QACollator(processing_class, max_length=args.max_length, text_format=args.text_format())

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        """Score every position's next token. The cross-entropy runs over the model's whole (contiguous) logits with
        the labels shifted left and -100 in the last column, as transformers' own causal-LM loss does: the slice
        `logits[:, :-1]` is not contiguous, and flattening it for the loss would copy the [B, T, V] logits (and
        their gradient) once more each pass. The last position's score is dropped; the values are the same."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        outputs = model(**inputs, use_cache=False, output_hidden_states=hidden_layer is not None)
        shifted = nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        logprobs, mask = token_logprobs_from_logits(outputs.logits, shifted)
        hidden = outputs.hidden_states[hidden_layer] if hidden_layer is not None else None
        return Scores(
            token_logprobs=logprobs[:, :-1], mask=mask[:, :-1], logits=outputs.logits[:, :-1], hidden_states=hidden
        )
