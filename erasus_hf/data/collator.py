"""Tokenize question/answer examples with the prompt masked, pad them, and nest forget/retain batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .formatting import PROMPT_TEMPLATE, format_completion, format_prompt

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
    """A side collator whose question/answer rows are tokenized once, ahead of training: `tokenize(row)` gives the
    row's `input_ids` and `labels` (-100 where nothing is scored), `__call__` pads tokenized rows into a batch. The
    trainer maps `tokenize` over the forget and retain rows up front and refuses rows with no scored token left
    within `max_length`; any other callable collates the rows as they are given. Subclasses check the tokenizer in
    `__post_init__`."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 512
    question_key: str = "question"
    answer_key: str = "answer"

    def tokenize(self, example: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass(eq=False)
class QACollator(SideCollator):
    """Collator for causal-LM question/answer data.

    Raw examples (`question`, `answer`) become ``ids(prompt) + ids(" " + answer) + [eos]`` with the prompt's labels
    set to -100, truncated on the right to `max_length`. Pre-tokenized examples (`input_ids`, optional `labels`,
    optional `attention_mask`) are padded as they are. Padding follows `tokenizer.padding_side`; `position_ids` count
    only real tokens, so left and right padding give the same scores.
    """

    prompt_template: str = PROMPT_TEMPLATE

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set one (ensure_pad_token does it from EOS).")

    def tokenize(self, example: dict[str, Any]) -> dict[str, Any]:
        """One QA example -> `input_ids` and `labels` (prompt masked with -100); an `alternate` answer (DPO-style
        strategies) becomes a nested `alternate` with its own ids and labels."""
        if example.get("alternate") is not None and not isinstance(example["alternate"], dict):
            alternate = self.tokenize(
                {self.question_key: example[self.question_key], self.answer_key: example["alternate"]}
            )
            return {**self.tokenize({k: v for k, v in example.items() if k != "alternate"}), "alternate": alternate}
        if "input_ids" in example:
            return {
                "input_ids": list(example["input_ids"]),
                "labels": list(example.get("labels") or example["input_ids"]),
            }
        prompt = format_prompt(example[self.question_key], self.prompt_template)
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        answer_ids = self.tokenizer(format_completion(example[self.answer_key]), add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        input_ids = (prompt_ids + answer_ids)[: self.max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[: self.max_length]
        return {"input_ids": input_ids, "labels": labels}

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
