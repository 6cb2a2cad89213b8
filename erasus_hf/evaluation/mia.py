"""Membership inference: `MIAEvaluator` runs the attacks of `attacks.py` on members and non-members and reports the
AUC of each (`auc.py`), with its confidence interval.

In unlearning, members are the forget set and non-members a holdout the model never trained on: an AUC near 0.5
after unlearning means the forget set looks unseen. ``MIAEvaluator(score_eos=True/False)`` forces one choice of
scoring the closing EOS of a QA row for every attack (by default each attack follows open-unlearning, `EOS_SCORED`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.fingerprint import describe_rows
from ..data.formats import TextFormat
from ..objectives import CausalLMObjective, Objective
from .attacks import (
    GRADNORM_REDUCTIONS,
    gradnorm_scores,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    reference_score,
    zlib_score,
)
from .auc import BOOTSTRAP_RESAMPLES, auc, auc_interval, interval_entry, warn_few_rows
from .base import Evaluator, SuiteData, check_at_least_one, check_fraction, register_evaluator
from .result import EvaluationResult
from .scoring import check_rows_format, checked_format, dataset_batches, row_format, scored_columns, token_stats

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
"""The attacks `MIAEvaluator` runs, by name."""

EOS_SCORED = {
    "loss": True,
    "zlib": True,
    "reference": True,
    "min_k": False,
    "min_k_plus_plus": False,
    "gradnorm": False,
}
"""Whether each attack scores the closing EOS of a QA row by default (open-unlearning's choice for that attack)."""


@register_evaluator("mia")
@dataclass(eq=False, repr=False)
class MIAEvaluator(Evaluator):
    """Membership-inference AUCs of telling `members` (the forget set) from `nonmembers` (a holdout never trained
    on), one per attack in `attacks` (names in `ATTACKS`; by default all of them, "reference" only with `ref_model`).

    Rows are QA (`question`/`answer`: the answer is scored given the question) or plain text (`text`). One
    `token_stats` pass per set serves loss, zlib, min_k, min_k_plus_plus and reference (the reference model
    `ref_model`, scored with the same tokenizer, gets its own pass); gradnorm runs one backward per example. QA rows
    are laid out as training lays them out (`text_format`: the chat template when the tokenizer has one, by default),
    so the attack scores the tokens the unlearning loss saw; text rows as `scoring.text_batches`. The ZLib
    text is the scored tokens decoded without special tokens (open-unlearning's), i.e. `" " + answer` with the
    package's byte-level tokenizers, the text itself for a text row. Summary: `{name}/{attack}_auc`; per example:
    `{name}/{attack}_members`, `{name}/{attack}_nonmembers` (the scores, higher = member); `intervals`: the 95%
    confidence interval of every AUC (`auc_interval`); `rows`: `{name}/members`, `{name}/nonmembers` (counts and
    fingerprints of the scored columns). An empty side is refused; fewer than `MIN_ROWS_PER_SIDE` rows a side warn.

    Args:
        k: the Min-K% / Min-K%++ fraction (open-unlearning's TOFU and MUSE configs: 0.4).
        score_eos: None (default) scores the closing EOS of a QA row where open-unlearning's attack does (loss,
            zlib, reference; see `EOS_SCORED`) and leaves it out elsewhere (min_k, min_k_plus_plus, gradnorm);
            True or False forces one choice for every attack.
        gradnorm_reduction / gradnorm_p: `gradnorm_scores`' `reduction` and `p` (default: the reference's mean of
            the per-tensor 2-norms).
        bootstrap_resamples / bootstrap_seed: the bootstrap of the AUC intervals (`auc_interval`: 1000, seed 0).
        objective: scores the rows (of the model and of `ref_model`); default `CausalLMObjective`.
        text_format: how QA rows are rendered (`data.formats.TextFormat`; the trainer's); None = `TextFormat()`.
    """

    members: Dataset
    nonmembers: Dataset
    attacks: Sequence[str] | None = None
    k: float = 0.4
    ref_model: nn.Module | None = None
    batch_size: int = 32
    max_length: int = 512
    name: str = "mia"
    score_eos: bool | None = None
    gradnorm_reduction: Literal["mean", "global"] = "mean"
    gradnorm_p: float = 2.0
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES
    bootstrap_seed: int = 0
    objective: Objective = field(default_factory=CausalLMObjective)
    text_format: TextFormat | None = None

    def __post_init__(self) -> None:
        self.text_format = checked_format(self.text_format)  # renames kept: the trainer's rows use them
        attacks, ref_model = self.attacks, self.ref_model
        if attacks is None:  # every attack; "reference" only when there is a reference model
            attacks = tuple(a for a in ATTACKS if a != "reference" or ref_model is not None)
        if isinstance(attacks, str):
            attacks = (attacks,)
        attacks = tuple(attacks)
        if not attacks:
            raise ValueError(f"No attack requested; choose from {list(ATTACKS)}.")
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"Unknown MIA attack(s) {unknown}; valid attacks are {list(ATTACKS)}.")
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"An attack is listed twice: {list(attacks)}.")
        if "reference" in attacks and ref_model is None:
            raise ValueError(
                "The 'reference' attack needs ref_model (a model that never saw the members, same tokenizer); "
                "pass ref_model=... or drop 'reference' from attacks."
            )
        self.attacks = attacks
        check_fraction(self.k)
        check_at_least_one(batch_size=self.batch_size)
        if self.gradnorm_reduction not in GRADNORM_REDUCTIONS:
            raise ValueError(
                f"gradnorm_reduction must be one of {list(GRADNORM_REDUCTIONS)}, got {self.gradnorm_reduction!r}"
            )
        if self.gradnorm_p not in (1, 2, math.inf):
            raise ValueError(f"gradnorm_p must be 1, 2 or math.inf, got {self.gradnorm_p}")
        if self.score_eos is not None and not isinstance(self.score_eos, bool):
            raise TypeError(f"score_eos must be None, True or False, got {self.score_eos!r}")
        check_at_least_one(bootstrap_resamples=self.bootstrap_resamples)
        sides = (
            (self.members, "members", "`members`: the forget set"),
            (self.nonmembers, "non-members", "`nonmembers`: the holdout, `holdout=` of MetricSuite.run"),
        )
        for dataset, side, origin in sides:
            if len(dataset) == 0:
                raise ValueError(
                    f"Membership inference: the {side} dataset is empty ({origin}); an AUC needs rows on both sides."
                )
            row_format(dataset, f"The {side} dataset", self.text_format)

    @classmethod
    def from_suite_data(cls, data: SuiteData, **options: Any) -> MIAEvaluator:
        """Members: the forget rows (`forget=`, or the TOFU data's forget split); non-members: `holdout=`."""
        members, nonmembers = data.need("forget", "holdout")
        return cls(members, nonmembers, **options)

    def rows(self) -> dict[str, dict]:
        """``{"{name}/members": ..., "{name}/nonmembers": ...}``: `describe_rows` over the columns scored."""
        out = {}
        for side, dataset in (("members", self.members), ("nonmembers", self.nonmembers)):
            columns = scored_columns(dataset, self.text_format)
            out[f"{self.name}/{side}"] = describe_rows(dataset, columns, f"MIA {side} set")
        return out

    def eos_scored(self, attack: str) -> bool:
        """Whether `attack` scores the closing EOS of a QA row here (`score_eos`, else the reference's choice)."""
        return EOS_SCORED[attack] if self.score_eos is None else self.score_eos

    def _batches(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Iterator[dict[str, torch.Tensor]]:
        return dataset_batches(dataset, tokenizer, self.batch_size, self.max_length, self.text_format)

    def _scores(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, which: str
    ) -> dict[str, list[float]]:
        desc = f"{self.name}: {which}"
        stats = token_stats(model, self._batches(dataset, tokenizer), desc=desc, objective=self.objective)
        scores: dict[str, list[float]] = {}
        for attack in self.attacks:
            eos = self.eos_scored(attack)
            if attack == "loss":
                scores[attack] = [loss_score(s, eos) for s in stats]
            elif attack == "zlib":
                texts = [tokenizer.decode(s.targets.tolist(), skip_special_tokens=True) for s in stats]
                scores[attack] = [zlib_score(s, t, eos) for s, t in zip(stats, texts, strict=True)]
            elif attack == "min_k":
                scores[attack] = [min_k_score(s, self.k, eos) for s in stats]
            elif attack == "min_k_plus_plus":
                scores[attack] = [min_k_plus_plus_score(s, self.k, eos) for s in stats]
            elif attack == "gradnorm":
                batches = self._batches(dataset, tokenizer)
                scores[attack] = gradnorm_scores(
                    model,
                    batches,
                    desc=f"{desc} gradnorm",
                    score_eos=eos,
                    reduction=self.gradnorm_reduction,
                    p=self.gradnorm_p,
                    objective=self.objective,
                )
            elif attack == "reference":
                batches = self._batches(dataset, tokenizer)
                ref = token_stats(self.ref_model, batches, desc=f"{desc} reference model", objective=self.objective)
                scores[attack] = [reference_score(s, r, eos) for s, r in zip(stats, ref, strict=True)]
        return scores

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """AUC, its confidence interval and per-example scores of every attack (`reference` is unused)."""
        warn_few_rows({"member": len(self.members), "non-member": len(self.nonmembers)}, "Membership inference")
        rows = self.rows()
        for dataset in (self.members, self.nonmembers):
            check_rows_format(dataset, self.text_format, tokenizer, "Membership inference")
        members = self._scores(model, tokenizer, self.members, "members")
        nonmembers = self._scores(model, tokenizer, self.nonmembers, "non-members")
        meta = {
            "attacks": list(self.attacks),
            "k": self.k,
            "eos_scored": {a: self.eos_scored(a) for a in self.attacks},
            "num_members": len(self.members),
            "num_nonmembers": len(self.nonmembers),
            "rows": row_format(self.members, "The members dataset", self.text_format),
            "scores": "higher = member; AUC 0.5 = members indistinguishable from non-members",
        }
        if "gradnorm" in self.attacks:
            meta["gradnorm"] = {"reduction": self.gradnorm_reduction, "p": self.gradnorm_p}
        result = EvaluationResult(
            meta={self.name: meta, "text_format": self.text_format.describe(tokenizer)}, rows=rows
        )
        for attack in self.attacks:
            key = f"{self.name}/{attack}_auc"
            result.summary[key] = auc(members[attack], nonmembers[attack])
            resamples, seed = self.bootstrap_resamples, self.bootstrap_seed
            low, high = auc_interval(members[attack], nonmembers[attack], resamples, seed)
            result.intervals[key] = interval_entry(low, high, resamples, seed)
            result.per_example[f"{self.name}/{attack}_members"] = members[attack]
            result.per_example[f"{self.name}/{attack}_nonmembers"] = nonmembers[attack]
        return result
