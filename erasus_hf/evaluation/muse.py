"""MUSE's metrics (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models",
arXiv:2407.06460): verbatim memorization, knowledge memorization and privacy leakage.

- **VerbMem.** The greedy continuation (``max_new_tokens_verbmem`` = 128 new tokens) of each ``verbmem/forget``
  ``prompt``, scored by ROUGE-L F1 against the true continuation ``gt``; the mean over prompts.
- **KnowMem.** Each ``knowmem`` question is asked after the few-shot examples (``*_qa_icl``) in the same
  question/answer format; the greedy answer (32 new tokens), cut before the model starts a new block (``"\\n\\n"``,
  ``"\\nQuestion"``, ``"Question:"``, as MUSE's code does), scored by ROUGE-L recall against ``answer``; the mean,
  on the forget and on the retain questions.
- **PrivLeak.** ``(AUC_model - AUC_retain) / AUC_retain x 100``, AUC the ROC AUC of Min-K% Prob (k = 0.4) telling
  ``privleak/forget`` (members) from ``privleak/holdout`` (non-members), ``AUC_retain`` that of the retain model (the
  reference run's ``{name}/privleak_auc``). Near 0 = as private as retraining; large positive = the forget set
  leaks (under-unlearning); large negative = over-unlearning.

Prompt format. MUSE's code writes ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per example and ends the prompt with
``"Answer: "``. The models here are trained on ``PROMPT_TEMPLATE`` (``"Question: {q}\\nAnswer:"``) with the answer
after one space, and a byte-level tokenizer encodes a trailing space on its own, so the prompt ends at
``"Answer:"`` and the model generates the space: each shot is ``format_prompt(q) + " " + a + "\\n\\n"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.formatting import format_completion, format_prompt
from ..data.muse import MUSEDataset
from .generation import greedy_generate, rouge_f1, rouge_recall
from .mia import auc, min_k_score
from .result import EvaluationResult
from .scoring import text_batches, token_stats

STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")
"""A KnowMem answer ends where the model starts the next question/answer block."""


def privleak(auc_model: float, auc_retain: float) -> float:
    """MUSE's PrivLeak: ``(AUC_model - AUC_retain) / AUC_retain x 100`` (percent)."""
    if not 0 < auc_retain <= 1 or not 0 <= auc_model <= 1:
        raise ValueError(f"AUCs must lie in [0, 1] (the retain AUC > 0); got {auc_model} and {auc_retain}.")
    return (auc_model - auc_retain) / auc_retain * 100


def few_shot_prompt(question: str, icl_questions: Sequence[str] = (), icl_answers: Sequence[str] = ()) -> str:
    """The KnowMem prompt: each shot ``format_prompt(q) + " " + a + "\\n\\n"``, then ``format_prompt(question)``."""
    if len(icl_questions) != len(icl_answers):
        raise ValueError(f"{len(icl_questions)} few-shot questions but {len(icl_answers)} answers.")
    shots = "".join(
        format_prompt(q) + format_completion(a) + "\n\n" for q, a in zip(icl_questions, icl_answers, strict=True)
    )
    return shots + format_prompt(question)


def cut_answer(generation: str) -> str:
    """The generated answer up to the first of `STOP_STRINGS` (stripped)."""
    for stop in STOP_STRINGS:
        generation = generation.split(stop)[0]
    return generation.strip()


class MUSEEvaluator:
    """VerbMem, KnowMem (forget and retain) and PrivLeak of a model on MUSE data.

    Summary keys ``{name}/verbmem_forget_rouge_f1``, ``{name}/knowmem_forget_rouge_recall``,
    ``{name}/knowmem_retain_rouge_recall``, ``{name}/privleak_auc`` and ``{name}/privleak`` (only with a reference
    evaluation, the retain model's run, holding ``{name}/privleak_auc``); per-example logs under the same names for
    the ROUGE scores and ``{name}/privleak_forget_min_k`` / ``{name}/privleak_holdout_min_k`` for the MIA scores.

    Args:
        data: the MUSE splits.
        max_new_tokens_verbmem / max_new_tokens_knowmem: generation lengths (MUSE: 128 and 32).
        k: the Min-K% fraction of PrivLeak (MUSE: 0.4).
        batch_size: examples per forward pass / ``generate`` call.
        max_length: token limit of a PrivLeak text (longer ones are truncated on the right).
        name: prefix of the metric names.
    """

    def __init__(
        self,
        data: MUSEDataset,
        max_new_tokens_verbmem: int = 128,
        max_new_tokens_knowmem: int = 32,
        k: float = 0.4,
        batch_size: int = 32,
        max_length: int = 2048,
        name: str = "muse",
    ) -> None:
        if not isinstance(data, MUSEDataset):
            raise TypeError(f"data must be a MUSEDataset, got {type(data).__name__}")
        if not 0 < k <= 1:
            raise ValueError(f"k is a fraction in (0, 1], got {k}")
        if min(max_new_tokens_verbmem, max_new_tokens_knowmem, batch_size) < 1 or max_length < 2:
            raise ValueError("max_new_tokens_*, batch_size must be >= 1 and max_length >= 2.")
        self.data = data
        self.max_new_tokens_verbmem = max_new_tokens_verbmem
        self.max_new_tokens_knowmem = max_new_tokens_knowmem
        self.k = k
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = name

    def verbmem(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[float]:
        """Per-prompt ROUGE-L F1 of the greedy continuation against ``gt``."""
        rows = self.data.verbmem_forget
        continuations = greedy_generate(
            model,
            tokenizer,
            list(rows["prompt"]),
            max_new_tokens=self.max_new_tokens_verbmem,
            batch_size=self.batch_size,
            desc="MUSE verbmem",
        )
        return [rouge_f1(c, gt) for c, gt in zip(continuations, rows["gt"], strict=True)]

    def knowmem(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, side: str) -> list[float]:
        """Per-question ROUGE-L recall of the few-shot answer, on ``side`` = ``"forget"`` or ``"retain"``."""
        qa = getattr(self.data, f"knowmem_{side}_qa")
        icl = getattr(self.data, f"knowmem_{side}_qa_icl")
        icl_questions = list(icl["question"]) if len(icl) else []
        icl_answers = list(icl["answer"]) if len(icl) else []
        prompts = [few_shot_prompt(q, icl_questions, icl_answers) for q in qa["question"]]
        generations = greedy_generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens_knowmem,
            batch_size=self.batch_size,
            desc=f"MUSE knowmem {side}",
        )
        return [rouge_recall(cut_answer(g), a) for g, a in zip(generations, qa["answer"], strict=True)]

    def min_k_scores(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[float]:
        """Min-K% Prob of each text (every token after the first scored)."""
        batches = text_batches(tokenizer, list(texts), self.batch_size, self.max_length)
        stats = token_stats(model, batches, desc="MUSE privleak")
        return [min_k_score(s, self.k) for s in stats]

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        name = self.name
        auc_key = f"{name}/privleak_auc"
        if reference is not None and auc_key not in reference.summary:  # checked before the expensive passes
            raise KeyError(
                f"PrivLeak needs {auc_key!r} in the reference evaluation's summary; it has "
                f"{sorted(reference.summary)}. Evaluate the retain model with MUSEEvaluator on the same data."
            )
        result = EvaluationResult(meta={f"{name}/corpus": self.data.corpus, f"{name}/min_k": self.k})
        logs = {
            "verbmem_forget_rouge_f1": self.verbmem(model, tokenizer),
            "knowmem_forget_rouge_recall": self.knowmem(model, tokenizer, "forget"),
            "knowmem_retain_rouge_recall": self.knowmem(model, tokenizer, "retain"),
        }
        for metric, values in logs.items():
            result.summary[f"{name}/{metric}"] = sum(values) / len(values)
            result.per_example[f"{name}/{metric}"] = values

        forget_scores = self.min_k_scores(model, tokenizer, self.data.privleak_forget["text"])
        holdout_scores = self.min_k_scores(model, tokenizer, self.data.privleak_holdout["text"])
        result.per_example[f"{name}/privleak_forget_min_k"] = forget_scores
        result.per_example[f"{name}/privleak_holdout_min_k"] = holdout_scores
        model_auc = auc(forget_scores, holdout_scores)
        result.summary[auc_key] = model_auc

        if reference is None:
            result.meta[f"{name}/privleak_missing"] = (
                "not computed: no reference evaluation (evaluate the retain model on the same MUSE data and pass "
                "its result as `reference`); the AUC is reported."
            )
        else:
            result.summary[f"{name}/privleak"] = privleak(model_auc, float(reference.summary[auc_key]))
        return result
