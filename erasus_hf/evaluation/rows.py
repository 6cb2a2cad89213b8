"""The evaluation of a run on rows of any format without a benchmark: the run's own forget and retain rows, scored as
they were trained.

A benchmark's evaluators read benchmark data (TOFU's perturbed answers, MUSE's knowledge QA and MIA splits); a user's
own rows have none of that, and may be prompt/completion pairs, chat conversations or raw text. What any rows support
is teacher-forced scoring of the tokens unlearning targets, the `QACollator` layout of the run's `TextFormat`: the
forget NLL should rise and the retain NLL hold, and verbatim memorization (exact memorization, extraction strength;
`evaluation.memorization`) should fall on the forget rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.collator import QACollator
from ..data.formats import TextFormat
from .base import Evaluator, check_at_least_one
from .memorization import exact_memorization, extraction_strength
from .result import EvaluationResult
from .scoring import mark_closing_eos, token_stats


@dataclass(eq=False, repr=False)
class RowsEvaluator(Evaluator):
    """Per split (``forget``, ``retain``): the mean NLL of the scored tokens of each example (a text row's windows
    are examples), exact memorization and extraction strength (the closing EOS left out, as open-unlearning's), in the
    layout `text_format` gives them (the run's, with its column names).

    Summary keys ``{name}/{split}_nll``, ``{name}/{split}_exact_memorization``, ``{name}/{split}_extraction_strength``
    (means over the split's examples); per-example values under the same keys; ``meta[name]`` the rows and examples
    of each split."""

    splits: Mapping[str, Dataset]
    text_format: TextFormat
    max_length: int = 512
    batch_size: int = 32
    name: str = "rows"

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("RowsEvaluator needs at least one split (name -> Dataset).")
        check_at_least_one(batch_size=self.batch_size, max_length=self.max_length)
        self.splits = dict(self.splits)

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """Score every split (`reference` is unused: these rows have no retain-model comparison)."""
        collator = QACollator(tokenizer, max_length=self.max_length, text_format=self.text_format)
        meta: dict[str, Any] = {"max_length": self.max_length}
        result = EvaluationResult(meta={self.name: meta, "text_format": self.text_format.describe(tokenizer)})
        for split, dataset in self.splits.items():
            examples = [e for row in dataset.with_format(None) for e in collator.examples(row)]
            meta[split] = {"rows": len(dataset), "examples": len(examples)}
            batches = [
                mark_closing_eos(collator(examples[start : start + self.batch_size]), tokenizer.eos_token_id)
                for start in range(0, len(examples), self.batch_size)
            ]
            stats = token_stats(model, batches, desc=f"{self.name}: {split}")
            metrics = {
                "nll": [s.nll for s in stats],
                "exact_memorization": [exact_memorization(s) for s in stats],
                "extraction_strength": [extraction_strength(s) for s in stats],
            }
            for metric, values in metrics.items():
                key = f"{self.name}/{split}_{metric}"
                result.summary[key] = sum(values) / len(values)
                result.per_example[key] = values
        return result
