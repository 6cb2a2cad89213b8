"""Encoder-decoder models (T5, BART, Whisper, ...): the decoder's targets are scored given the encoder's input.

Labels are the decoder targets, already aligned with the logits (no shift here): the decoder reads the labels shifted
right behind the model's `decoder_start_token_id`, built the model's own way. Encoder inputs pass through as they
are (`input_ids`/`attention_mask` for text, `input_features` for speech), so one objective serves text and speech.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
)

from ..data.collator import NOT_MODEL_INPUTS, SideCollator, with_passthrough
from .base import Objective, Scores, register_objective, token_logprobs_from_logits, unwrap_model

SEQ2SEQ_LM_CLASSES = frozenset(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()) | frozenset(
    MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values()
)
"""The conditional-generation heads of transformers' seq2seq and speech-seq2seq auto classes (some are decoder-only
audio LMs; `is_seq2seq_lm` also asks for `config.is_encoder_decoder`)."""

# batch keys that are not passed on as they are: targets, decoder inputs (built below), bookkeeping of the pairing
# dataset, DPO-style alternates
_NOT_ENCODER_INPUTS = ("decoder_input_ids", *NOT_MODEL_INPUTS)


def is_seq2seq_lm(model: nn.Module) -> bool:
    """Whether `model` (possibly PEFT/DDP-wrapped) is an encoder-decoder model with a language-modelling head."""
    base = unwrap_model(model)
    return (
        isinstance(base, PreTrainedModel)
        and bool(getattr(base.config, "is_encoder_decoder", False))
        and type(base).__name__ in SEQ2SEQ_LM_CLASSES
    )


def decoder_input_ids_from_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor | None:
    """The decoder inputs for `labels`, built by the model's `prepare_decoder_input_ids_from_labels` (T5's
    `_shift_right`, BART's `shift_tokens_right` with its `decoder_start_token_id`, ...); None for families without
    that method (Whisper, Speech2Text, M2M100, ...), whose forward shifts `labels` itself."""
    prepare = getattr(unwrap_model(model), "prepare_decoder_input_ids_from_labels", None)
    return prepare(labels=labels) if prepare is not None else None


@register_objective
class Seq2SeqObjective(Objective):
    """Scores `labels[b, t]` with the decoder logits of position t (`Scores.hidden_states`: the decoder's).

    A batch may carry its own `decoder_input_ids`; its `labels` may then mask a decoder prompt with -100 (Whisper's
    forced `<|notimestamps|>`, language and task tokens), which the model's own shift would turn into padding.

    Args:
        tokenizer: when given, the side collator is `Seq2SeqQACollator(tokenizer)` for question/answer text rows;
            otherwise `SpeechSeq2SeqCollator()` for speech rows already holding `input_features` and `labels`. A
            `data_collator` passed to the trainer wins over both.
        max_length: the text collator's truncation length (encoder input and labels alike).
    """

    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"  # None for models without `input_ids` (Whisper), see `validate_model`
    collator: Seq2SeqQACollator | SpeechSeq2SeqCollator  # the side collator built with the objective

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.collator = (
            Seq2SeqQACollator(tokenizer, max_length=max_length) if tokenizer is not None else SpeechSeq2SeqCollator()
        )

    def collator_for(self, processing_class: Any | None, args: Any) -> Any:
        """Question/answer text rows when the trainer has the tokenizer of a text model (T5, BART), else the
        collator this objective was built with."""
        text_model = self.peft_task_type == "SEQ_2_SEQ_LM"  # set by `validate_model`: the encoder reads input_ids
        if self.tokenizer is None and text_model and isinstance(processing_class, PreTrainedTokenizerBase):
            return Seq2SeqQACollator(processing_class, max_length=args.max_length)
        return self.collator

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_seq2seq_lm(model)

    def validate_model(self, model: nn.Module) -> None:
        if not is_seq2seq_lm(model):
            got = type(unwrap_model(model)).__name__
            raise ValueError(
                f"The seq2seq objective needs an encoder-decoder model with a language-modelling head "
                f"(T5ForConditionalGeneration, BartForConditionalGeneration, WhisperForConditionalGeneration, ...), "
                f"got {got}. For a decoder-only LM use objective='causal_lm'; for class logits 'classification'."
            )
        # PEFT's seq2seq wrapper calls forward(input_ids=..., inputs_embeds=..., ...): a speech model whose encoder
        # reads input_features (Whisper) gets input_ids twice, so it is wrapped as a plain PeftModel instead
        forward = inspect.signature(type(unwrap_model(model)).forward).parameters
        self.peft_task_type = "SEQ_2_SEQ_LM" if "input_ids" in forward else None

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        if "labels" not in batch:
            raise ValueError(f"A seq2seq batch needs `labels` (the decoder targets); got keys {sorted(batch)}.")
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k not in _NOT_ENCODER_INPUTS}
        decoder_input_ids = batch.get("decoder_input_ids")
        if decoder_input_ids is None:
            decoder_input_ids = decoder_input_ids_from_labels(model, labels)
        if decoder_input_ids is None:
            inputs["labels"] = labels  # the model shifts them its own way (its loss is computed and ignored)
        else:
            inputs["decoder_input_ids"] = decoder_input_ids
        outputs = model(**inputs, use_cache=False, output_hidden_states=hidden_layer is not None)
        logits = outputs.logits
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"Decoder logits {tuple(logits.shape)} do not align with labels {tuple(labels.shape)}.")
        logprobs, mask = token_logprobs_from_logits(logits, labels)
        hidden = outputs.decoder_hidden_states[hidden_layer] if hidden_layer is not None else None
        return Scores(token_logprobs=logprobs, mask=mask, logits=logits, hidden_states=hidden)


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass(eq=False)
class Seq2SeqQACollator(SideCollator):
    """Question/answer text rows for an encoder-decoder model.

    The encoder reads the question as the tokenizer encodes it (with its own special tokens); `labels` are the answer
    tokens (no special tokens) followed by EOS, so `labels` never hold the decoder start token. Both are truncated
    on the right to `max_length`; padding is `pad_token_id` for `input_ids`, 0 for `attention_mask`, -100 for
    `labels`. Pre-tokenized rows (`input_ids`, `labels`) are padded as they are.
    """

    question_key: str = "question"
    answer_key: str = "answer"

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None or self.tokenizer.eos_token_id is None:
            raise ValueError("Seq2SeqQACollator needs a tokenizer with a pad token and an EOS token.")

    def tokenize(self, example: dict[str, Any]) -> dict[str, list[int]]:
        if "input_ids" in example and "labels" in example:
            return {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}
        missing = [k for k in (self.question_key, self.answer_key) if k not in example]
        if missing:
            raise ValueError(
                f"Seq2SeqQACollator reads {self.question_key!r}/{self.answer_key!r} text (or pre-tokenized "
                f"input_ids/labels); the row has {sorted(example)}."
            )
        input_ids = self.tokenizer(example[self.question_key])["input_ids"][: self.max_length]
        answer = self.tokenizer(example[self.answer_key], add_special_tokens=False)["input_ids"]
        labels = (answer + [self.tokenizer.eos_token_id])[: self.max_length]
        return {"input_ids": input_ids, "labels": labels}

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokenized = [self.tokenize(e) for e in examples]
        ids = [t["input_ids"] for t in tokenized]
        out = {
            "input_ids": _pad(ids, self.tokenizer.pad_token_id),
            "attention_mask": _pad([[1] * len(i) for i in ids], 0),
            "labels": _pad([t["labels"] for t in tokenized], -100),
        }
        return with_passthrough(examples, out)


class SpeechSeq2SeqCollator:
    """Rows already holding the encoder input (`input_features`, e.g. from `WhisperFeatureExtractor`) and `labels`
    (token ids). Features are stacked (a Whisper feature extractor pads every clip to the same length), an
    `attention_mask` is stacked when present, `labels` are padded with -100.

    `labels` must not begin with the decoder start token (a Whisper tokenizer writes it first: strip it), since the
    model prepends it. To leave the decoder prompt unscored (Whisper's forced `<|notimestamps|>`, language and task
    tokens), rows may carry `decoder_input_ids` (the full prompt + transcript, without the last token) next to
    `labels` (the same sequence shifted left, the prompt set to -100): they are padded with `pad_token_id`, a value
    the causal decoder never reads at the scored positions.
    """

    feature_key = "input_features"

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        first = examples[0]
        if self.feature_key not in first or "labels" not in first:
            raise ValueError(
                f"SpeechSeq2SeqCollator needs rows with {self.feature_key!r} and 'labels'; the row has "
                f"{sorted(first)}. For question/answer text rows pass data_collator=Seq2SeqQACollator(tokenizer) "
                "or objective=Seq2SeqObjective(tokenizer)."
            )
        features = [torch.as_tensor(e[self.feature_key], dtype=torch.float32) for e in examples]
        out = {self.feature_key: torch.stack(features), "labels": _pad([list(e["labels"]) for e in examples], -100)}
        if "decoder_input_ids" in first:
            decoder_ids = [list(e["decoder_input_ids"]) for e in examples]
            if any(len(d) != len(e["labels"]) for d, e in zip(decoder_ids, examples, strict=True)):
                raise ValueError("Each row's decoder_input_ids must be as long as its labels (one input per target).")
            out["decoder_input_ids"] = _pad(decoder_ids, self.pad_token_id)
        if "attention_mask" in first:
            out["attention_mask"] = torch.stack([torch.as_tensor(e["attention_mask"]) for e in examples])
        return with_passthrough(examples, out)
