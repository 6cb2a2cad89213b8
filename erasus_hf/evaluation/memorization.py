"""Verbatim memorization of answers under teacher forcing: exact memorization and extraction strength.

Both read the greedy predictions of one `token_stats` pass (`TokenStats.argmax` against `TokenStats.targets`), over
the answer tokens of a QA row (the closing EOS left out by default, as open-unlearning's ``exact_memorization`` and
``extraction_strength`` leave it out, ``src/evals/metrics/memorization.py``) or every token after the BOS of a text
row. QA rows are laid out as training lays them out (``text_format``: the chat template when the tokenizer has one,
by default; ``meta["text_format"]`` records it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.formats import TextFormat
from ..objectives import CausalLMObjective, Objective
from .base import Evaluator, SuiteData, check_at_least_one, register_evaluator
from .result import EvaluationResult
from .scoring import TokenStats, check_rows_format, checked_format, dataset_batches, row_format, token_stats


def exact_memorization(stats: TokenStats, score_eos: bool = False) -> float:
    """Exact memorization (Tirumala et al. 2022, arXiv:2205.10770; open-unlearning's `exact_memorization`): the
    fraction of the answer tokens y_t whose teacher-forced greedy prediction argmax_z p(z | y_<t) equals y_t. The
    closing EOS is left out unless `score_eos` (open-unlearning leaves it out)."""
    stats = stats.scored(score_eos)
    return (stats.argmax == stats.targets).float().mean().item()


def extraction_strength(stats: TokenStats, score_eos: bool = False, allow_empty_suffix: bool = False) -> float:
    """Extraction strength (Carlini et al. 2021, used for unlearning by Wang et al. 2025, "Towards Effective
    Evaluations and Comparisons for LLM Unlearning Methods", ICLR; open-unlearning's `extraction_strength`): with
    teacher forcing, ES = 1 - k*/|y|, k* the smallest prefix length k such that the greedy prediction reproduces y_t
    for every t >= k, i.e. how short a prefix of the answer is enough for the model to continue it verbatim. |y|
    counts the answer tokens, the closing EOS left out unless `score_eos` (open-unlearning leaves it out).

    So k* = 1 + the index of the last wrong prediction (0 when none is wrong). Every token right -> ES = 1; only the
    first token wrong -> ES = 1 - 1/|y|. The last token wrong: open-unlearning's loop tries k = 0 .. |y| - 1 only, so
    k* = |y| - 1 and ES = 1/|y| (the default, the reference's number; a one-token answer thus always gets 1);
    `allow_empty_suffix=True` lets k* reach |y| (the empty suffix), ES = 0 there, the formula read literally.
    """
    stats = stats.scored(score_eos)
    n = len(stats.targets)
    if n == 0:
        raise ValueError("extraction_strength needs at least one scored token.")
    wrong = torch.nonzero(stats.argmax != stats.targets)
    k_star = 0 if wrong.numel() == 0 else int(wrong.max()) + 1
    if not allow_empty_suffix:
        k_star = min(k_star, n - 1)
    return 1 - k_star / n


@register_evaluator("memorization")
@dataclass(eq=False, repr=False)
class MemorizationEvaluator(Evaluator):
    """Exact memorization and extraction strength of every split of `splits` (name -> QA rows with `question`/
    `answer`, or text rows with `text`), one `token_stats` pass per split, scored by `objective` (default
    `CausalLMObjective`).

    Summary: `{name}/{split}_exact_memorization`, `{name}/{split}_extraction_strength` (means over the split); the
    per-example values under the same keys. `score_eos` and `allow_empty_suffix` are those of the metric functions
    (defaults: open-unlearning's numbers). `text_format` renders the QA rows (`data.formats.TextFormat`; the
    trainer's); None = `TextFormat()`.
    """

    splits: Mapping[str, Dataset]
    batch_size: int = 32
    max_length: int = 512
    name: str = "memorization"
    score_eos: bool = False
    allow_empty_suffix: bool = False
    objective: Objective = field(default_factory=CausalLMObjective)
    text_format: TextFormat | None = None

    def __post_init__(self) -> None:
        self.text_format = checked_format(self.text_format)  # renames kept: the trainer's rows use them
        if not self.splits:
            raise ValueError("MemorizationEvaluator needs at least one split (name -> Dataset).")
        check_at_least_one(batch_size=self.batch_size)
        for split, dataset in self.splits.items():
            row_format(dataset, f"Split {split!r}", self.text_format)
        self.splits = dict(self.splits)

    @classmethod
    def from_suite_data(cls, data: SuiteData, **options: Any) -> MemorizationEvaluator:
        """The splits: `forget` and `retain`, those given (the TOFU data's by default); at least `forget`."""
        splits = {k: data.get(k) for k in ("forget", "retain") if data.get(k) is not None}
        if not splits:
            data.need("forget")
        return cls(splits, **options)

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """Score every split (`reference` is unused)."""
        for split, dataset in self.splits.items():
            check_rows_format(dataset, self.text_format, tokenizer, f"Memorization split {split!r}")
        meta = {
            "splits": {s: len(d) for s, d in self.splits.items()},
            "score_eos": self.score_eos,
            "allow_empty_suffix": self.allow_empty_suffix,
        }
        result = EvaluationResult(meta={self.name: meta, "text_format": self.text_format.describe(tokenizer)})
        for split, dataset in self.splits.items():
            stats = token_stats(
                model,
                dataset_batches(dataset, tokenizer, self.batch_size, self.max_length, self.text_format),
                desc=f"{self.name}: {split}",
                objective=self.objective,
            )
            for metric, fn in (
                ("exact_memorization", lambda s: exact_memorization(s, self.score_eos)),
                ("extraction_strength", lambda s: extraction_strength(s, self.score_eos, self.allow_empty_suffix)),
            ):
                values = [fn(s) for s in stats]
                key = f"{self.name}/{split}_{metric}"
                result.summary[key] = sum(values) / len(values)
                result.per_example[key] = values
        return result
