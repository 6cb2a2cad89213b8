"""MUSE's metrics (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models",
arXiv:2407.06460): verbatim memorization, knowledge memorization and privacy leakage.

- **VerbMem.** The greedy continuation (``max_new_tokens_verbmem`` = 128 new tokens) of each ``verbmem/forget``
  ``prompt``, scored by ROUGE-L F1 against the true continuation ``gt``; the mean over prompts.
- **KnowMem.** Each ``knowmem`` question is asked after the few-shot examples (``*_qa_icl``) in the same
  question/answer format; the greedy answer (32 new tokens), cut before the model starts a new block (``"\\n\\n"``,
  ``"\\nQuestion"``, ``"Question:"``, as MUSE's code does), scored by ROUGE-L recall against ``answer``; the mean,
  on the forget and on the retain questions.
- **PrivLeak.** MUSE's convention (its ``eval.py`` and ``metrics/privleak.py``; open-unlearning's ``privleak`` metric
  follows it). Each ``privleak/forget`` and ``privleak/holdout`` text is scored by Min-K% Prob with k = 0.4 (MUSE's
  ``Min-40%``: the mean of the lowest 40% of the token log-probs; MUSE scores every token after its Llama BOS). MUSE's
  AUC is the *flipped* one: its ROC labels the holdout as the members (its key ``forget_holdout_Min-40%``), so it is
  ``AUC_muse = 1 - AUC``, AUC the conventional ROC AUC with the forget texts as members (the summary's
  ``privleak_auc``). Then ``PrivLeak = (AUC_muse(model) - AUC_muse(retain)) / AUC_muse(retain) x 100``, the
  denominator the retain (retrained) model's flipped AUC, i.e. ``(AUC_retain - AUC_model) / (1 - AUC_retain) x 100``.
  Near 0 = as private as retraining; strongly negative (down to -100) = the model still tells its forget set from
  the holdout (under-unlearning: MUSE's target models are near -100); positive = over-unlearning (the forget set
  looks *less* familiar than unseen text). The retain AUC: MUSE's code divides by a constant measured once on its
  retrained Llama-2 (``AUC_RETRAIN``: 0.4772 News, 0.5393 Books, flipped form), open-unlearning reads the retain
  model's evaluation logs (with a 0.5 fallback); here it is the reference run's ``{name}/privleak_auc`` and there is
  no fallback (PrivLeak is left out without a reference). Texts longer than ``max_length`` tokens are cut (MUSE
  scores whole texts, open-unlearning cuts at 2048 tokens, the default here). The reference must have scored the
  same forget and holdout texts (``result.rows["muse/privleak_forget"]`` / ``["muse/privleak_holdout"]``), checked
  before any forward pass. ``privleak_auc`` comes with a 95% confidence interval (``result.intervals``; the
  stratified percentile bootstrap of ``auc.auc_interval``), and fewer than ``auc.MIN_ROWS_PER_SIDE`` texts a side
  draw a warning.

Long inputs. VerbMem prompts run to 2,048 Llama tokens. MUSE's code (``swj0419/muse_bench``, ``metrics/verbmem.py``
and ``metrics/knowmem.py``) tokenizes each prompt whole (BOS included) and generates 128 (VerbMem) or 32 (KnowMem) new
tokens, with no cut: its models are Llama-2 7B, whose 4,096 positions hold a 2,048-token prompt and its continuation.
open-unlearning does the same for VerbMem (``MUSE_forget_verbmem``: its ``max_length`` of 2048 caps the true
continuation, not the prompt) and cuts its KnowMem prompts on the right at 512 tokens (``MUSE_forget_knowmem``,
``truncation=True``). Neither fits a prompt to a shorter context, where ``generate`` runs past
``max_position_embeddings`` (``transformers`` only warns). Here each prompt is cut from the LEFT to the model's
context minus the generation length (``generation.prompt_budget``; the BOS and the end of the prompt, where the
continuation starts, are kept), so on MUSE's own models (and any model whose context holds the prompt and its new
tokens) nothing is cut and the default matches MUSE's; a generation length that alone fills the context is an
error naming the option to lower, raised before any compute. PrivLeak texts are cut to ``min(max_length, context)``
tokens. ``meta["{name}/truncation"]`` records the context, each part's prompt budget and how many prompts (texts)
were cut.

- **Forget perplexity** (only with MUSE's raw forget corpus, ``raw/forget``, ``MUSEDataset.raw_forget``). Neither
  MUSE's code (``swj0419/muse_bench``: VerbMem, KnowMem, PrivLeak) nor open-unlearning's MUSE metrics report a
  perplexity, so it is defined here: each article is cut into windows as training cuts it
  (``TextFormat.encode`` of a ``text`` row: ``max_length`` tokens, capped at the model's positions, BOS first when
  the tokenizer adds one, ``window_stride`` apart, each token scored once), and
  ``forget_ppl = exp(sum of the NLL of every scored token / number of scored tokens)`` over the whole corpus (a
  token-weighted mean, as a corpus perplexity is; long articles weigh more). Unlearning raises it.

Prompt format. KnowMem asks its questions in the layout the model was trained on (``text_format``, a
``data.formats.TextFormat``; by default the chat template when the tokenizer has one, as training):

- through the prompt template: MUSE's code writes ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per example and ends
  the prompt with ``"Answer: "``. The models here are trained on ``PROMPT_TEMPLATE`` (``"Question: {q}\\nAnswer:"``)
  with the answer after one space, and a byte-level tokenizer encodes a trailing space on its own, so the prompt
  ends at ``"Answer:"`` and the model generates the space: each shot is ``format_prompt(q) + " " + a + "\\n\\n"``;
- through the chat template: each few-shot example is an earlier user/assistant exchange, the question the last user
  turn, then the template's generation prompt (``TextFormat.generation_prompt``); the answer ends at the model's EOS.

VerbMem continues raw text (an article's opening) and PrivLeak scores raw text: neither goes through a template.
``meta["text_format"]`` records the format (``TextFormat.describe``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.fingerprint import describe_rows
from ..data.formats import TextFormat
from ..data.formatting import format_completion, format_prompt
from ..data.muse import MUSE_PARTS, OPTIONAL_PARTS, MUSEDataset
from ..objectives import CausalLMObjective, Objective
from .attacks import min_k_score
from .auc import BOOTSTRAP_RESAMPLES, auc, auc_interval, interval_entry, warn_few_rows
from .base import Evaluator, SuiteData, check_at_least_one, check_fraction, register_evaluator
from .generation import count_longer, greedy_generate, model_context, prompt_budget, rouge_f1, rouge_recall
from .result import EvaluationResult
from .scoring import (
    check_qa_format,
    evaluation_format,
    example_batches,
    text_batches,
    token_nll_sums,
    token_stats,
)

STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")
"""A KnowMem answer ends where the model starts the next question/answer block."""


def check_retain_auc(auc_retain: float) -> None:
    """Raise unless `auc_retain` (conventional) can be PrivLeak's reference: in [0, 1) (its flip is the divisor)."""
    if not 0 <= auc_retain <= 1:
        raise ValueError(f"AUCs must lie in [0, 1]; got {auc_retain} for the retain model.")
    if auc_retain == 1:
        raise ValueError(
            "PrivLeak is undefined for a retain-model AUC of 1: MUSE divides by the flipped AUC 1 - AUC_retain = 0. "
            "Check that the reference run is a model that never saw the forget set."
        )


def privleak(auc_model: float, auc_retain: float) -> float:
    """MUSE's PrivLeak (percent) from two conventional AUCs (forget texts scored as the members): the model's and
    the retain model's ``privleak_auc``.

    MUSE reports the flipped AUC, ``1 - AUC`` (the holdout labelled as members), and divides by the retain model's:
    ``((1 - auc_model) - (1 - auc_retain)) / (1 - auc_retain) x 100``. A model that memorised its forget set
    (``auc_model`` near 1) is near -100, one as private as the retain model is 0, an over-unlearned one (forget
    texts less likely than unseen ones) is positive.
    """
    if not 0 <= auc_model <= 1:
        raise ValueError(f"AUCs must lie in [0, 1]; got {auc_model} for the model.")
    check_retain_auc(auc_retain)
    flipped_model, flipped_retain = 1 - auc_model, 1 - auc_retain
    return (flipped_model - flipped_retain) / flipped_retain * 100


def few_shot_prompt(question: str, icl_questions: Sequence[str] = (), icl_answers: Sequence[str] = ()) -> str:
    """The KnowMem prompt through the default prompt template: each shot ``format_prompt(q) + " " + a + "\\n\\n"``,
    then ``format_prompt(question)`` (the text `TextFormat.generation_prompt` tokenizes without a chat template)."""
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


@register_evaluator("muse")
@dataclass(eq=False, repr=False)
class MUSEEvaluator(Evaluator):
    """VerbMem, KnowMem (forget and retain) and PrivLeak of a model on MUSE data.

    Summary keys ``{name}/verbmem_forget_rouge_f1``, ``{name}/knowmem_forget_rouge_recall``,
    ``{name}/knowmem_retain_rouge_recall``, ``{name}/privleak_auc`` (conventional: forget = members),
    ``{name}/privleak_auc_flipped`` (``1 - privleak_auc``, the AUC MUSE reports) and ``{name}/privleak`` (MUSE's
    convention, see the module doc; only with a reference evaluation, the retain model's run, holding
    ``{name}/privleak_auc``) and ``{name}/forget_ppl`` (only with ``data.raw_forget``); per-example logs under the same
    names for
    the ROUGE scores and ``{name}/privleak_forget_min_k`` / ``{name}/privleak_holdout_min_k`` for the MIA scores;
    ``rows["{name}/{part}"]`` the count and fingerprints of every part scored (``MUSE_PARTS``); ``intervals``
    the confidence intervals of ``privleak_auc`` and ``privleak_auc_flipped``.

    Args:
        data: the MUSE splits.
        max_new_tokens_verbmem / max_new_tokens_knowmem: generation lengths (MUSE: 128 and 32).
        k: the Min-K% fraction of PrivLeak (MUSE: 0.4).
        batch_size: examples per forward pass / ``generate`` call.
        max_length: token limit of a PrivLeak text (longer ones are truncated on the right; never more than the
            model's ``max_position_embeddings``).
        name: prefix of the metric names.
        bootstrap_resamples / bootstrap_seed: the confidence interval of the PrivLeak AUC (`auc.auc_interval`).
        objective: scores the PrivLeak texts and the forget perplexity; default `CausalLMObjective`.
        text_format: how KnowMem questions are asked and the raw forget articles are windowed
            (`data.formats.TextFormat`; the trainer's, or `UnlearningConfig.text_format()`); None = `TextFormat()`:
            the chat template when the tokenizer has one.
    """

    data: MUSEDataset
    max_new_tokens_verbmem: int = 128
    max_new_tokens_knowmem: int = 32
    k: float = 0.4
    batch_size: int = 32
    max_length: int = 2048
    name: str = "muse"
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES
    bootstrap_seed: int = 0
    objective: Objective = field(default_factory=CausalLMObjective)
    text_format: TextFormat | None = None

    def __post_init__(self) -> None:
        self.text_format = evaluation_format(self.text_format)
        if not isinstance(self.data, MUSEDataset):
            raise TypeError(f"data must be a MUSEDataset, got {type(self.data).__name__}")
        check_fraction(self.k)
        if min(self.max_new_tokens_verbmem, self.max_new_tokens_knowmem, self.batch_size) < 1 or self.max_length < 2:
            raise ValueError("max_new_tokens_*, batch_size must be >= 1 and max_length >= 2.")
        check_at_least_one(bootstrap_resamples=self.bootstrap_resamples)

    @classmethod
    def from_suite_data(cls, data: SuiteData, **options: Any) -> MUSEEvaluator:
        """On the MUSE data given as `muse=`."""
        return cls(*data.need("muse"), **options)

    def rows(self) -> dict[str, dict]:
        """``{"{name}/{part}": describe_rows(...)}`` for every part scored, over the columns it reads."""
        parts = MUSE_PARTS | ({"raw_forget": OPTIONAL_PARTS["raw_forget"]} if self.data.raw_forget is not None else {})
        return {
            f"{self.name}/{part}": describe_rows(getattr(self.data, part), columns, f"MUSE {config}/{split}")
            for part, (config, split, columns) in parts.items()
        }

    def check_reference(self, reference: EvaluationResult | None, rows: dict[str, dict] | None = None) -> None:
        """Raise unless `reference` can be PrivLeak's reference here (cheap: no forward pass): it holds
        ``{name}/privleak_auc``, a usable one, and scored the same privleak forget and holdout texts."""
        if reference is None:
            return
        auc_key = f"{self.name}/privleak_auc"
        if auc_key not in reference.summary:
            raise KeyError(
                f"PrivLeak needs {auc_key!r} in the reference evaluation's summary; it has "
                f"{sorted(reference.summary)}. Evaluate the retain model with MUSEEvaluator on the same data."
            )
        check_retain_auc(float(reference.summary[auc_key]))
        names = [f"{self.name}/privleak_forget", f"{self.name}/privleak_holdout"]
        reference.check_same_rows(rows or self.rows(), names, "PrivLeak")

    def verbmem(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[float]:
        """Per-prompt ROUGE-L F1 of the greedy continuation against ``gt`` (prompts cut to fit, see the module doc)."""
        rows = self.data.verbmem_forget
        continuations = greedy_generate(
            model,
            tokenizer,
            list(rows["prompt"]),
            max_new_tokens=self.max_new_tokens_verbmem,
            batch_size=self.batch_size,
            desc="MUSE verbmem",
            max_prompt_tokens=prompt_budget(model, self.max_new_tokens_verbmem, "max_new_tokens_verbmem"),
        )
        return [rouge_f1(c, gt) for c, gt in zip(continuations, rows["gt"], strict=True)]

    def knowmem_prompts(self, tokenizer: PreTrainedTokenizerBase, side: str) -> list[list[int]]:
        """The few-shot prompt (token ids, `TextFormat.generation_prompt`) of every KnowMem question on ``side`` =
        ``"forget"`` or ``"retain"``."""
        qa = getattr(self.data, f"knowmem_{side}_qa")
        icl = getattr(self.data, f"knowmem_{side}_qa_icl")
        shots = list(zip(icl["question"], icl["answer"], strict=True)) if len(icl) else []
        return [self.text_format.generation_prompt(tokenizer, q, shots) for q in qa["question"]]

    def knowmem(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, side: str) -> list[float]:
        """Per-question ROUGE-L recall of the few-shot answer, on ``side`` = ``"forget"`` or ``"retain"`` (prompts
        cut to fit, see the module doc)."""
        generations = greedy_generate(
            model,
            tokenizer,
            self.knowmem_prompts(tokenizer, side),
            max_new_tokens=self.max_new_tokens_knowmem,
            batch_size=self.batch_size,
            desc=f"MUSE knowmem {side}",
            max_prompt_tokens=prompt_budget(model, self.max_new_tokens_knowmem, "max_new_tokens_knowmem"),
        )
        answers = getattr(self.data, f"knowmem_{side}_qa")["answer"]
        return [rouge_recall(cut_answer(g), a) for g, a in zip(generations, answers, strict=True)]

    def forget_windows(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, list[int]]]:
        """The raw forget articles cut as training cuts text rows (`TextFormat.encode`, windows of `text_length`
        tokens); refused when they hold no token to score. Tokenization only, no forward pass."""
        length = self.text_length(model)
        windows = [
            w for t in self.data.raw_forget["text"] for w in self.text_format.encode(tokenizer, {"text": t}, length)
        ]
        if not any(label != -100 for w in windows for label in w["labels"][1:]):  # a causal LM scores from position 1
            raise ValueError(
                f"MUSE raw/forget: its {len(self.data.raw_forget)} articles hold no token to score (empty texts?); "
                "drop the part (raw_forget=None) or pass the articles."
            )
        return windows

    def forget_perplexity(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, windows: list[dict[str, list[int]]] | None = None
    ) -> tuple[float, dict[str, Any]]:
        """(forget perplexity, what it was computed on) of the raw forget articles: ``exp(sum of the scored tokens'
        NLL / their number)`` over every window of `forget_windows` (see the module doc)."""
        windows = self.forget_windows(model, tokenizer) if windows is None else windows
        batches = example_batches(tokenizer, windows, self.batch_size)
        sums = token_nll_sums(model, batches, desc="MUSE forget perplexity", objective=self.objective)
        nll, tokens = sum(s for s, _ in sums), sum(n for _, n in sums)
        record = {
            "articles": len(self.data.raw_forget),
            "windows": len(windows),
            "tokens": tokens,
            "max_length": self.text_length(model),
            "window_stride": self.text_format.window_stride,
        }
        return math.exp(nll / tokens), record

    def text_length(self, model: nn.Module) -> int:
        """Token limit of a PrivLeak text on `model`: `max_length`, never more than the model's positions."""
        context = model_context(model)
        return self.max_length if context is None else min(self.max_length, context)

    def min_k_scores(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[float]:
        """Min-K% Prob of each text (every token after the first scored; cut to `text_length`)."""
        batches = text_batches(tokenizer, list(texts), self.batch_size, self.text_length(model))
        stats = token_stats(model, batches, desc="MUSE privleak", objective=self.objective)
        return [min_k_score(s, self.k) for s in stats]

    def truncation(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """What is cut to fit `model` (tokenization only, no forward pass): its context (None: no declared limit),
        per generation part the prompt budget and how many prompts exceed it, and the PrivLeak text limit with how
        many texts exceed it. Raises ValueError, naming the option, when a generation length alone fills the
        context (`generation.prompt_budget`)."""
        verbmem_budget = prompt_budget(model, self.max_new_tokens_verbmem, "max_new_tokens_verbmem")
        knowmem_budget = prompt_budget(model, self.max_new_tokens_knowmem, "max_new_tokens_knowmem")
        parts = {
            "verbmem_forget": (list(self.data.verbmem_forget["prompt"]), verbmem_budget),
            "knowmem_forget": (self.knowmem_prompts(tokenizer, "forget"), knowmem_budget),
            "knowmem_retain": (self.knowmem_prompts(tokenizer, "retain"), knowmem_budget),
        }
        record: dict[str, Any] = {"context": model_context(model)}
        for part, (prompts, budget) in parts.items():
            cut = count_longer(tokenizer, prompts, budget)
            record[part] = {"max_prompt_tokens": budget, "prompts_cut": cut, "prompts": len(prompts)}
        texts = list(self.data.privleak_forget["text"]) + list(self.data.privleak_holdout["text"])
        length = self.text_length(model)
        record["privleak"] = {"max_length": length, "texts_cut": count_longer(tokenizer, texts, length)}
        return record

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        name = self.name
        auc_key = f"{name}/privleak_auc"
        rows = self.rows()
        self.check_reference(reference, rows)  # before the expensive passes
        forget, holdout = self.data.privleak_forget, self.data.privleak_holdout
        warn_few_rows({"privleak forget": len(forget), "privleak holdout": len(holdout)}, "MUSE PrivLeak")
        check_qa_format(self.text_format, tokenizer, "MUSE KnowMem")
        truncation = self.truncation(model, tokenizer)  # raises before any compute when a prompt cannot fit
        windows = self.forget_windows(model, tokenizer) if self.data.raw_forget is not None else None
        meta = {
            f"{name}/corpus": self.data.corpus,
            f"{name}/min_k": self.k,
            f"{name}/truncation": truncation,
            "text_format": self.text_format.describe(tokenizer),
        }
        result = EvaluationResult(meta=meta, rows=rows)
        logs = {
            "verbmem_forget_rouge_f1": self.verbmem(model, tokenizer),
            "knowmem_forget_rouge_recall": self.knowmem(model, tokenizer, "forget"),
            "knowmem_retain_rouge_recall": self.knowmem(model, tokenizer, "retain"),
        }
        for metric, values in logs.items():
            result.summary[f"{name}/{metric}"] = sum(values) / len(values)
            result.per_example[f"{name}/{metric}"] = values

        forget_scores = self.min_k_scores(model, tokenizer, forget["text"])
        holdout_scores = self.min_k_scores(model, tokenizer, holdout["text"])
        result.per_example[f"{name}/privleak_forget_min_k"] = forget_scores
        result.per_example[f"{name}/privleak_holdout_min_k"] = holdout_scores
        model_auc = auc(forget_scores, holdout_scores)
        result.summary[auc_key] = model_auc
        result.summary[f"{name}/privleak_auc_flipped"] = 1 - model_auc
        low, high = auc_interval(forget_scores, holdout_scores, self.bootstrap_resamples, self.bootstrap_seed)
        result.intervals[auc_key] = interval_entry(low, high, self.bootstrap_resamples, self.bootstrap_seed)
        result.intervals[f"{name}/privleak_auc_flipped"] = interval_entry(
            1 - high, 1 - low, self.bootstrap_resamples, self.bootstrap_seed
        )

        if windows is not None:
            result.summary[f"{name}/forget_ppl"], result.meta[f"{name}/forget_ppl"] = self.forget_perplexity(
                model, tokenizer, windows
            )
        else:
            result.meta[f"{name}/forget_ppl_missing"] = (
                "not computed: no raw forget corpus (MUSE's raw/forget, MUSEDataset.raw_forget)."
            )
        if reference is None:
            result.meta[f"{name}/privleak_missing"] = (
                "not computed: no reference evaluation (evaluate the retain model on the same MUSE data and pass "
                "its result as `reference`); the AUC is reported."
            )
        else:
            result.summary[f"{name}/privleak"] = privleak(model_auc, float(reference.summary[auc_key]))
        return result
