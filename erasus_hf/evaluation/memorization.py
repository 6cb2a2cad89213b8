"""Verbatim memorization of answers under teacher forcing: exact memorization and extraction strength.

Both read the greedy predictions of one `token_stats` pass (`TokenStats.argmax` against `TokenStats.targets`), over
the scored tokens (the answer tokens and the EOS of a QA row; every token after the first of a text row).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from .result import EvaluationResult
from .scoring import TokenStats, dataset_batches, row_format, token_stats


def exact_memorization(stats: TokenStats) -> float:
    """Exact memorization (Tirumala et al. 2022, arXiv:2205.10770; the open-unlearning `exact_memorization`): the
    fraction of scored tokens y_t whose teacher-forced greedy prediction argmax_z p(z | y_<t) equals y_t."""
    return (stats.argmax == stats.targets).float().mean().item()


def extraction_strength(stats: TokenStats) -> float:
    """Extraction strength (open-unlearning's `extraction_strength`, after Carlini et al. 2021's extraction): with
    teacher forcing, ES = 1 - k*/|y|, k* the smallest prefix length k in [0, |y|] such that the greedy prediction
    reproduces y_t for every t >= k, i.e. how short a prefix of the answer is enough for the model to continue it
    verbatim.

    So k* = 1 + the index of the last wrong prediction (0 when none is wrong). Edge cases: every token right -> ES = 1;
    the last token wrong -> k* = |y|, ES = 0 (the empty suffix; open-unlearning's loop stops at k = |y| - 1 and gives
    1/|y| there); only the first token wrong -> ES = 1 - 1/|y|.
    """
    n = len(stats.targets)
    if n == 0:
        raise ValueError("extraction_strength needs at least one scored token.")
    wrong = torch.nonzero(stats.argmax != stats.targets)
    k_star = 0 if wrong.numel() == 0 else int(wrong.max()) + 1
    return 1 - k_star / n


class MemorizationEvaluator:
    """Exact memorization and extraction strength of every split of `splits` (name -> QA rows with `question`/
    `answer`, or text rows with `text`), one `token_stats` pass per split.

    Summary: `{name}/{split}_exact_memorization`, `{name}/{split}_extraction_strength` (means over the split); the
    per-example values under the same keys.
    """

    def __init__(
        self, splits: Mapping[str, Dataset], batch_size: int = 32, max_length: int = 512, name: str = "memorization"
    ) -> None:
        if not splits:
            raise ValueError("MemorizationEvaluator needs at least one split (name -> Dataset).")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for split, dataset in splits.items():
            row_format(dataset, f"Split {split!r}")
        self.splits = dict(splits)
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = name

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """Score every split. `reference` is unused (kept for the evaluator interface)."""
        result = EvaluationResult(meta={self.name: {"splits": {s: len(d) for s, d in self.splits.items()}}})
        for split, dataset in self.splits.items():
            stats = token_stats(
                model,
                dataset_batches(dataset, tokenizer, self.batch_size, self.max_length),
                desc=f"{self.name}: {split}",
            )
            for metric, fn in (
                ("exact_memorization", exact_memorization),
                ("extraction_strength", extraction_strength),
            ):
                values = [fn(s) for s in stats]
                key = f"{self.name}/{split}_{metric}"
                result.summary[key] = sum(values) / len(values)
                result.per_example[key] = values
        return result
