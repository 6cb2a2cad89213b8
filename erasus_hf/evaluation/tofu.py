"""TOFU's metrics (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv:2401.06121).

Per evaluation set (forget, retain, real_authors, world_facts; see ``erasus_hf.data.tofu.TOFUDataset``):

- **Prob.** ``P(a | q) = exp(-mean token NLL of a)`` (length-normalised), the mean over the answer tokens and the
  closing EOS (as open-unlearning's ``evaluate_probability``). Forget and retain: the mean of P of the ``answer``.
  Real authors and world facts (multiple choice in spirit): the mean of
  ``P(answer) / (P(answer) + sum_j P(perturbed_j))``.
- **ROUGE.** ROUGE-L recall of the greedy generation against the ``answer``, prompted with the question as the
  model was trained on it (``TextFormat.generation_prompt``: the chat template with its generation prompt, or the
  prompt template ``"Question: {question}\\nAnswer:"``). As
  open-unlearning's TOFU config (``configs/generation/default.yaml``): greedy, up to ``max_new_tokens`` = 200 new
  tokens, each row stopping at its EOS, 32 prompts per ``generate`` call (TOFU's own code caps prompt + answer at
  200 tokens, 30 per batch).
- **Truth ratio.** ``TR = P_wrong / P_true`` (P as for Prob, EOS included), ``P_wrong`` the geometric mean of the
  perturbed answers' P and
  ``P_true`` the paraphrased answer's P (the ``answer``'s on real authors / world facts, which have no paraphrase).
  Aggregate: ``mean(min(TR, 1/TR))`` on the forget set, ``mean(max(0, 1 - TR))`` on the others.
- **Forget quality.** The p-value of the two-sample Kolmogorov-Smirnov test between the forget-set truth ratios of
  the evaluated model and those of the reference (retain) model. TOFU's code tests ``1/TR``; the KS statistic and
  p-value are unchanged by a strictly monotone transform of both samples, so testing TR gives the same number. The
  reference must have scored the same forget rows (the fingerprints of ``result.rows["tofu/forget"]``, over the
  columns of ``TOFU_EVAL_COLUMNS``); another count or other rows are refused before any forward pass.
- **Model utility.** The harmonic mean of the Prob, ROUGE and truth-ratio values of retain, real authors and world
  facts (9 numbers when all sets are evaluated).

All the likelihoods of a set (answers, paraphrased answers and every perturbed answer) are scored in shared batches
in one no-grad pass (``scoring.token_stats``); generation is batched with left padding.

Formatting. Every question/answer pair is scored and every question asked in the layout training uses
(``text_format``, a ``data.formats.TextFormat``; by default the chat template when the tokenizer has one, else the
prompt template, the same rule as training), so a chat model's numbers are those of open-unlearning's TOFU on instruct
models (``apply_chat_template: true``). ``meta["text_format"]`` records which (``TextFormat.describe``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from scipy.stats import ks_2samp
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.fingerprint import describe_rows
from ..data.formats import TextFormat
from ..data.tofu import TOFU_EVAL_COLUMNS, TOFUDataset
from ..objectives import CausalLMObjective, Objective
from .base import Evaluator, SuiteData, register_evaluator
from .generation import greedy_generate, rouge_recall
from .likelihood import truth_ratio, truth_ratio_score
from .result import EvaluationResult
from .scoring import check_qa_format, evaluation_format, qa_batches, token_stats

PARAPHRASED_SPLITS = ("forget", "retain")
"""Sets whose true answer in the truth ratio is the paraphrased answer and whose Prob is not normalised."""

UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")


def normalised_probability(true_nll: torch.Tensor, wrong_nll: torch.Tensor) -> torch.Tensor:
    """[N] ``P_true / (P_true + sum_j P_wrong_j)`` with ``P = exp(-nll)``: TOFU's Prob on real authors and world
    facts. `true_nll` is [N], `wrong_nll` [N, K] (mean token NLLs)."""
    if wrong_nll.dim() != 2 or wrong_nll.shape[0] != true_nll.shape[0]:
        raise ValueError(
            f"true_nll is {tuple(true_nll.shape)}, wrong_nll must be [N, K], got {tuple(wrong_nll.shape)}"
        )
    # softmax over [-true, -wrong_1, ..., -wrong_K] is exactly P_true / (P_true + sum P_wrong), computed stably.
    logits = torch.cat([-true_nll[:, None], -wrong_nll], dim=1)
    return torch.softmax(logits, dim=1)[:, 0]


def harmonic_mean(values: Sequence[float]) -> float:
    """``n / sum(1 / v)``; 0 when any value is 0 (TOFU's model utility, as ``scipy.stats.hmean``)."""
    if len(values) == 0:
        raise ValueError("The harmonic mean of no values is undefined.")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"The harmonic mean needs finite non-negative values, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def forget_quality(truth_ratios: Sequence[float], reference_truth_ratios: Sequence[float]) -> float:
    """TOFU's forget quality: the p-value of ``scipy.stats.ks_2samp`` (two-sided) between the evaluated model's
    per-example forget truth ratios and the reference (retain) model's. High (near 1) = indistinguishable."""
    return float(_forget_ks(truth_ratios, reference_truth_ratios).pvalue)


def forget_ks_statistic(truth_ratios: Sequence[float], reference_truth_ratios: Sequence[float]) -> float:
    """The KS statistic behind forget quality: the largest gap between the two empirical distributions of truth
    ratios (0 = the same). On n rows the p-value moves in coarse steps and saturates near 1; the statistic tells
    methods apart where the p-value does not (it is reported beside forget quality, not in place of it)."""
    return float(_forget_ks(truth_ratios, reference_truth_ratios).statistic)


def _forget_ks(truth_ratios: Sequence[float], reference_truth_ratios: Sequence[float]):
    if len(truth_ratios) == 0 or len(reference_truth_ratios) == 0:
        raise ValueError(
            f"Forget quality needs truth ratios on both sides; got {len(truth_ratios)} and "
            f"{len(reference_truth_ratios)}."
        )
    return ks_2samp(list(truth_ratios), list(reference_truth_ratios))


RENDERING_KEYS = ("qa", "prompt_template", "chat_template_sha256", "system_prompt")
"""The keys of `TextFormat.describe` that change the tokens a QA row is scored on."""


def check_same_rendering(
    reference: EvaluationResult, described: dict[str, Any], what: str, name: str = "tofu"
) -> None:
    """Refuse a reference evaluation whose QA rows were rendered otherwise (its ``meta["{name}/text_format"]`` or
    ``meta["text_format"]``, when it records one): truth ratios of another rendering are not comparable. A reference
    without the record (written before it existed) is accepted."""
    theirs = reference.meta.get(f"{name}/text_format", reference.meta.get("text_format"))
    if not isinstance(theirs, dict):
        return
    differ = {k: (theirs.get(k), described.get(k)) for k in RENDERING_KEYS if theirs.get(k) != described.get(k)}
    if differ:
        where = f" ({reference.source})" if reference.source else ""
        listed = "; ".join(f"{k}: reference {a!r}, here {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"{what}: the reference evaluation{where} rendered the QA rows otherwise ({listed}), so its truth ratios "
            "are not comparable. Evaluate the reference model with the same text format (chat template or prompt "
            "template, system prompt)."
        )


@register_evaluator("tofu")
@dataclass(eq=False, repr=False)
class TOFUEvaluator(Evaluator):
    """Prob, ROUGE and truth ratio of every set of `data`, forget quality against a reference run, model utility.

    Summary keys ``{name}/{split}_prob``, ``{name}/{split}_rouge``, ``{name}/{split}_truth_ratio`` (aggregates),
    ``{name}/forget_quality`` and ``{name}/forget_ks_statistic`` (only with a reference evaluation holding
    ``{name}/forget_truth_ratio``) and ``{name}/model_utility``; per-example keys ``{name}/{split}_prob``,
    ``{name}/{split}_rouge`` and ``{name}/{split}_truth_ratio`` (the raw TR, what a later run's KS test reads);
    ``rows["{name}/{split}"]`` the count and fingerprints of each set scored (what a later run's reference check
    reads).

    Args:
        data: the evaluation sets.
        batch_size: examples per forward pass (likelihoods) and, unless ``generation_batch_size`` is given, per
            ``generate`` call (open-unlearning: 32 for both).
        max_new_tokens: most new tokens of a ROUGE generation (open-unlearning: 200); each row stops at its EOS and a
            batch stops once every row has.
        generation_batch_size: prompts per ``generate`` call; None = ``batch_size``.
        max_length: token limit of a scored question + answer (longer ones are truncated on the right).
        name: prefix of the metric names.
        rouge: False skips the greedy generation and the ROUGE metrics (model utility then uses Prob and truth
            ratio only): a cheap pass for forget quality, e.g. after every epoch.
        objective: scores the likelihoods; default `CausalLMObjective`.
        text_format: how the rows are rendered (`data.formats.TextFormat`; the trainer's, or
            `UnlearningConfig.text_format()`); None = `TextFormat()`: the chat template when the tokenizer has one.
    """

    data: TOFUDataset
    batch_size: int = 32
    max_new_tokens: int = 200
    max_length: int = 512
    name: str = "tofu"
    rouge: bool = True
    generation_batch_size: int | None = None
    objective: Objective = field(default_factory=CausalLMObjective)
    text_format: TextFormat | None = None

    def __post_init__(self) -> None:
        self.text_format = evaluation_format(self.text_format)
        if not isinstance(self.data, TOFUDataset):
            raise TypeError(f"data must be a TOFUDataset, got {type(self.data).__name__}")
        if self.generation_batch_size is None:
            self.generation_batch_size = self.batch_size
        if min(self.batch_size, self.max_new_tokens, self.generation_batch_size) < 1 or self.max_length < 2:
            raise ValueError(
                "batch_size, max_new_tokens and generation_batch_size must be >= 1 and max_length >= 2; got "
                f"{self.batch_size}, {self.max_new_tokens}, {self.generation_batch_size}, {self.max_length}"
            )

    @classmethod
    def from_suite_data(cls, data: SuiteData, **options: Any) -> TOFUEvaluator:
        """On the TOFU data given as `tofu=`."""
        return cls(*data.need("tofu"), **options)

    def split_scores(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, split: str, dataset: Dataset
    ) -> dict[str, list[float]]:
        """Per-example ``prob``, raw ``truth_ratio`` and (unless ``rouge=False``) ``rouge`` of one set."""
        questions = list(dataset["question"])
        answers = list(dataset["answer"])
        perturbed = list(dataset["perturbed_answer"])
        n, k = len(questions), len(perturbed[0])
        paraphrased = split in PARAPHRASED_SPLITS
        # One flat list: the answers, then the paraphrased answers (forget/retain), then the K perturbed per row.
        all_questions = questions + (questions if paraphrased else []) + [q for q in questions for _ in range(k)]
        all_answers = answers + (list(dataset["paraphrased_answer"]) if paraphrased else [])
        all_answers += [a for row in perturbed for a in row]
        batches = qa_batches(tokenizer, all_questions, all_answers, self.batch_size, self.max_length, self.text_format)
        stats = token_stats(model, batches, desc=f"TOFU {split}: likelihoods", objective=self.objective)
        nll = torch.tensor([s.nll for s in stats], dtype=torch.float64)
        answer_nll = nll[:n]
        true_nll = nll[n : 2 * n] if paraphrased else answer_nll
        perturbed_nll = nll[(2 * n if paraphrased else n) :].view(n, k)
        if paraphrased:
            prob = torch.exp(-answer_nll)
        else:
            prob = normalised_probability(answer_nll, perturbed_nll)
        scores = {"prob": prob.tolist(), "truth_ratio": truth_ratio(true_nll, perturbed_nll).tolist()}
        if not self.rouge:
            return scores
        generations = greedy_generate(
            model,
            tokenizer,
            [self.text_format.generation_prompt(tokenizer, q) for q in questions],
            max_new_tokens=self.max_new_tokens,
            batch_size=self.generation_batch_size,
            desc=f"TOFU {split}: generation",
        )
        scores["rouge"] = [rouge_recall(g, a) for g, a in zip(generations, answers, strict=True)]
        return scores

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        name = self.name
        rows = self.rows()
        reference_ratios = self._reference_ratios(reference, rows)  # checked before the expensive passes
        check_qa_format(self.text_format, tokenizer, "TOFU")
        described = self.text_format.describe(tokenizer)
        if reference_ratios is not None:
            check_same_rendering(reference, described, "Forget quality", name)
        meta = {f"{name}/forget_split": self.data.forget_split, "text_format": described}
        result = EvaluationResult(meta=meta, rows=rows)
        if self.rouge:
            result.meta[f"{name}/generation"] = {
                "max_new_tokens": self.max_new_tokens,
                "batch_size": self.generation_batch_size,
                "greedy": True,
            }
        for split, dataset in self.data.splits().items():
            scores = self.split_scores(model, tokenizer, split, dataset)
            ratios = torch.tensor(scores["truth_ratio"], dtype=torch.float64)
            for metric in ("prob", "rouge"):
                if metric in scores:
                    result.summary[f"{name}/{split}_{metric}"] = sum(scores[metric]) / len(scores[metric])
            result.summary[f"{name}/{split}_truth_ratio"] = truth_ratio_score(ratios, forget=split == "forget")
            for metric, values in scores.items():
                result.per_example[f"{name}/{split}_{metric}"] = values
            result.meta[f"{name}/{split}_rows"] = len(dataset)

        if reference_ratios is not None:
            key = f"{name}/forget_truth_ratio"
            result.summary[f"{name}/forget_quality"] = forget_quality(result.per_example[key], reference_ratios)
            statistic = forget_ks_statistic(result.per_example[key], reference_ratios)
            result.summary[f"{name}/forget_ks_statistic"] = statistic
        elif self.data.forget is None:
            result.meta[f"{name}/forget_quality_missing"] = "not computed: the forget set was not evaluated."
        else:
            result.meta[f"{name}/forget_quality_missing"] = (
                "not computed: no reference evaluation (evaluate the retain model with the same forget split and "
                "pass its result as `reference`)."
            )

        components = [
            f"{name}/{split}_{metric}"
            for split in UTILITY_SPLITS
            for metric in UTILITY_METRICS
            if f"{name}/{split}_{metric}" in result.summary
        ]
        if components:
            result.summary[f"{name}/model_utility"] = harmonic_mean([result.summary[c] for c in components])
            result.meta[f"{name}/model_utility_components"] = components
        else:
            result.meta[f"{name}/model_utility_missing"] = (
                f"not computed: none of {list(UTILITY_SPLITS)} was evaluated."
            )
        return result

    def rows(self) -> dict[str, dict]:
        """``{"{name}/{split}": describe_rows(...)}`` for every set, over the columns the metrics read."""
        return {
            f"{self.name}/{split}": describe_rows(dataset, TOFU_EVAL_COLUMNS[split], f"TOFU {split} set")
            for split, dataset in self.data.splits().items()
        }

    def check_reference(self, reference: EvaluationResult | None) -> None:
        """Raise unless `reference` can be forget quality's reference here (cheap: no forward pass)."""
        self._reference_ratios(reference, self.rows())

    def _reference_ratios(self, reference: EvaluationResult | None, rows: dict[str, dict]) -> list[float] | None:
        """The reference run's per-example forget truth ratios, or None when forget quality is not computed."""
        if reference is None or self.data.forget is None:
            return None
        reference_split = reference.meta.get(f"{self.name}/forget_split")
        if reference_split is not None and reference_split != self.data.forget_split:
            raise ValueError(
                f"The reference evaluation used the forget split {reference_split!r}, this one "
                f"{self.data.forget_split!r}; forget quality compares the same split."
            )
        ratios = reference.require(f"{self.name}/forget_truth_ratio", "forget quality")
        reference.check_same_rows(rows, [f"{self.name}/forget"], "Forget quality")
        if len(ratios) != rows[f"{self.name}/forget"]["count"]:
            raise ValueError(
                f"The reference's {self.name}/forget_truth_ratio log has {len(ratios)} values for "
                f"{rows[f'{self.name}/forget']['count']} forget rows; the reference JSON is inconsistent."
            )
        return ratios
