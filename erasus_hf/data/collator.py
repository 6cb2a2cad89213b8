"""Tokenize causal-LM rows of any format (`formats.TextFormat`) with what is not scored masked, pad them, and nest
forget/retain batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .formats import TextFormat

PASSTHROUGH_KEYS = ("index", "slot")  # the pairing dataset's bookkeeping, carried through every side collator
NOT_MODEL_INPUTS = ("labels", "alternate", *PASSTHROUGH_KEYS)  # targets and bookkeeping: never passed to a model


def with_passthrough(examples: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with the examples' `index`/`slot` (when they carry them) as long tensors."""
    for key in PASSTHROUGH_KEYS:
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
    return batch


@dataclass(eq=False)
class SideCollator:
    """A side collator whose text rows are tokenized once, ahead of training: `tokenize(row)` gives the row's
    `input_ids` and `labels` (-100 where nothing is scored), `tokenize_rows(columns)` a batch of rows' examples (one
    row may give several, as a long text gives windows), `__call__` pads tokenized rows into a batch. The trainer maps
    `tokenize_rows` over the forget and retain rows up front and refuses rows with no scored token left within
    `max_length`; any other callable collates the rows as they are given. Subclasses check the tokenizer in
    `__post_init__`."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 512

    def tokenize(self, example: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def examples(self, example: dict[str, Any]) -> list[dict[str, Any]]:
        """Every tokenized example one row gives (one by default)."""
        return [self.tokenize(example)]

    def tokenize_rows(self, columns: dict[str, list]) -> dict[str, list]:
        """`datasets.map(batched=True)`: a batch of rows (as columns) -> their tokenized examples (as columns)."""
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        examples = [e for row in rows for e in self.examples(row)]
        return {key: [e[key] for e in examples] for key in examples[0]} if examples else {}

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass(eq=False)
class QACollator(SideCollator):
    """Collator for causal-LM rows of every format of `formats.TextFormat` (question/answer, prompt/completion,
    chat messages, raw text, pre-tokenized).

    A question/answer row becomes ``ids(prompt) + ids(" " + answer) + [eos]`` with the prompt's labels set to -100
    (or its chat-template rendering), truncated on the right to `max_length`; see `TextFormat` for the other formats.
    Padding follows `tokenizer.padding_side`; `position_ids` count only real tokens, so left and right padding give
    the same scores. Called on raw rows, a text row gives its first window only; the trainer tokenizes every window
    up front (`tokenize_rows`).
    """

    text_format: TextFormat = field(default_factory=TextFormat)

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set one (ensure_pad_token does it from EOS).")

    @property
    def question_key(self) -> str:
        return self.text_format.column("question")

    @property
    def answer_key(self) -> str:
        return self.text_format.column("answer")

    @property
    def prompt_template(self) -> str:
        return self.text_format.prompt_template

    def tokenize(self, example: dict[str, Any]) -> dict[str, Any]:
        """One row -> `input_ids` and `labels` (its first window, for a long text); an `alternate` answer (DPO-style
        strategies) becomes a nested `alternate` with its own ids and labels."""
        return self.examples(example)[0]

    def examples(self, example: dict[str, Any]) -> list[dict[str, Any]]:
        """One row -> every example it gives (the windows of a long text), each with its `alternate` if any."""
        alternate = example.get("alternate")
        if alternate is not None and not isinstance(alternate, dict):
            row = {k: v for k, v in example.items() if k != "alternate"}
            row_format = self.text_format.detect(row)
            answer = self.text_format.column("answer" if row_format == "qa" else "completion")
            if row_format == "conversational":
                alternate = [{"role": "assistant", "content": alternate}]
            (paired,) = self.text_format.encode(self.tokenizer, {**row, answer: alternate}, self.max_length)
            return [{**e, "alternate": paired} for e in self.text_format.encode(self.tokenizer, row, self.max_length)]
        return self.text_format.encode(self.tokenizer, example, self.max_length)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokenized = [self.tokenize(e) for e in examples]
        width = max(len(t["input_ids"]) for t in tokenized)
        left = self.tokenizer.padding_side == "left"
        batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
        for t in tokenized:
            n, pad = len(t["input_ids"]), width - len(t["input_ids"])

            def padded(seq: list[int], value: int, n: int = n, pad: int = pad) -> list[int]:
                return [value] * pad + seq if left else seq + [value] * pad

            batch["input_ids"].append(padded(t["input_ids"], self.tokenizer.pad_token_id))
            batch["attention_mask"].append(padded([1] * n, 0))
            batch["labels"].append(padded(t["labels"], -100))
            batch["position_ids"].append(padded(list(range(n)), 0))
        out = with_passthrough(examples, {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
        if examples[0].get("alternate") is not None:
            out["alternate"] = self([e["alternate"] for e in examples])
        return out


def default_side_collator(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the tensor-like fields of already-numeric examples (classifiers: pixel values, labels, ...)."""
    return {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in examples[0]}


class NestedCollator:
    """Collate `{"forget": ..., "retain": ...}` pairs with one side collator for each side."""

    def __init__(self, side_collator: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
        self.side_collator = side_collator

    def __call__(self, pairs: Sequence[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        batch = {"forget": self.side_collator([p["forget"] for p in pairs])}
        if pairs[0].get("retain") is not None:
            batch["retain"] = self.side_collator([p["retain"] for p in pairs])
        return batch
