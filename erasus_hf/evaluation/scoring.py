"""Teacher-forced token statistics in one batched forward pass: what every likelihood metric reads.

One pass over a batch gives, for each scored token, its log-probability, the model's greedy prediction and the mean
and standard deviation of log p under the model's own next-token distribution (Min-K%++). Metrics (truth ratio, MIA
scores, exact memorization, ...) are functions of these, so a suite scores each example once.

The forward pass is the objective's (`Objective.score`, `CausalLMObjective` by default), the one the trainer's
strategies score with, so a metric means the same thing in training and in evaluation; the statistics are read from
its logits aligned with the targets (`Scores.logits`, `Scores.mask`).

Which tokens a metric scores. A QA row is laid out as training lays it out (``data.collator.QACollator`` with the
evaluator's ``data.formats.TextFormat``, `evaluation_format`): ``prompt + " " + answer + EOS`` through the plain
prompt template, or the question as the user turn and the answer as the assistant turn through the chat template
(the default when the tokenizer has one, as in training); its labelled tokens are the answer tokens (a chat
template's: the assistant turn as the template closes it) and the closing EOS. A text row is ``BOS + text`` with
every token after the BOS labelled (no EOS). ``TokenStats`` holds every labelled token and marks
the closing EOS (``closing_eos``); each metric then takes the tokens its reference implementation scores
(open-unlearning, ``locuslab/open-unlearning``, ``src/evals/metrics/utils.py``):

- Prob, truth ratio, LOSS, ZLib and Reference average the NLL over every labelled token, the EOS included
  (open-unlearning's ``evaluate_probability``);
- Min-K%, Min-K%++, GradNorm, exact memorization and extraction strength leave the closing EOS out
  (open-unlearning's ``tokenwise_logprobs`` / ``tokenwise_vocab_logprobs``, "-1 to ignore eos prediction").

``TokenStats.scored(score_eos)`` gives either view; each metric function takes ``score_eos`` with its reference's
choice as the default. Text rows have no EOS, so every text token is scored: MUSE's own Min-K% (``swj0419/muse_bench``,
``metrics/privleak.py``) scores every token after the BOS. (open-unlearning's "-1" drops the last labelled token
whatever it is, so its port of MUSE's PrivLeak also drops the last real token of each text; we follow MUSE there.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import is_progress_bar_enabled

from ..data.collator import QACollator
from ..data.formats import RowFormatError, TextFormat
from ..objectives import CausalLMObjective, Objective, Scores
from ..reference import eval_mode
from .distributed import map_sharded


@dataclass
class TokenStats:
    """One example's labelled tokens (the answer tokens and closing EOS of a QA row; every token after the BOS of a
    text row).

    `logprobs[t] = log p(y_t | y_<t)`, `targets[t] = y_t`, `argmax[t]` the model's greedy prediction at that
    position, `mean[t]` and `std[t]` the mean and standard deviation of log p(z) for z ~ p(. | y_<t).
    `closing_eos` is True when the last token is the EOS closing a QA row (see the module doc); `scored` drops it.
    """

    logprobs: torch.Tensor
    targets: torch.Tensor
    argmax: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    closing_eos: bool = False

    def scored(self, score_eos: bool) -> TokenStats:
        """The tokens a metric scores: all of them with `score_eos`, else all but the closing EOS (if there is one).
        Raises when no token is left (a QA row whose answer has no token)."""
        if score_eos or not self.closing_eos:
            return self
        if len(self.targets) < 2:
            raise ValueError(
                "An example has no scored token once its closing EOS is left out (an empty answer); drop the row "
                "or pass score_eos=True."
            )
        fields = (self.logprobs, self.targets, self.argmax, self.mean, self.std)
        return TokenStats(*(f[:-1] for f in fields), closing_eos=False)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood over all the tokens held (the closing EOS included)."""
        return -self.logprobs.mean().item()


def checked_format(text_format: TextFormat | None) -> TextFormat:
    """`text_format` as an evaluator holds it: None is `TextFormat()` (the chat template when the tokenizer has one,
    else the prompt template: training's own default); anything else but a `TextFormat` is refused."""
    if text_format is None:
        return TextFormat()
    if not isinstance(text_format, TextFormat):
        raise TypeError(
            f"text_format must be an erasus_hf.data.formats.TextFormat (e.g. UnlearningConfig.text_format()) or None, "
            f"got {type(text_format).__name__}."
        )
    return text_format


def evaluation_format(text_format: TextFormat | None) -> TextFormat:
    """The format benchmark rows are rendered with: `checked_format(text_format)` on the column names of evaluation
    data (``question``/``answer``, ``text``). A training format's column renames (`columns`, `text_field`) name the
    training set's columns, not the benchmark's, so they are dropped; everything else (chat template or not, the
    prompt template, the system prompt, the window stride) is kept."""
    return replace(checked_format(text_format), columns={}, text_field="text")


def check_qa_format(text_format: TextFormat, tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    """Refuse, before any forward pass, a format that cannot render question/answer rows with this tokenizer (the
    chat template asked for and absent, no EOS to close an answer)."""
    text_format.check_tokenizer(tokenizer, "qa", what)


def qa_batches(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
    text_format: TextFormat | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of question/answer rows in the training layout of `text_format` (`evaluation_format`: prompt
    masked, EOS appended; the chat template when the format renders QA rows through it), each with a `closing_eos`
    flag per row (see `mark_closing_eos`)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers.")
    collator = QACollator(tokenizer, max_length=max_length, text_format=evaluation_format(text_format))
    rows = [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    for start in range(0, len(rows), batch_size):
        yield mark_closing_eos(collator(rows[start : start + batch_size]), tokenizer.eos_token_id)


def example_batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict[str, list[int]]], batch_size: int = 32
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of already tokenized examples (`input_ids`, `labels`), e.g. the windows of
    `TextFormat.encode`, padded as the collator pads."""
    collator = QACollator(tokenizer, max_length=max((len(e["input_ids"]) for e in examples), default=1))
    for start in range(0, len(examples), batch_size):
        chunk = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[start : start + batch_size]]
        yield mark_closing_eos(collator(chunk), tokenizer.eos_token_id)


def text_batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 32, max_length: int = 512
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of plain texts, every token after the first scored (membership inference on raw text)."""
    collator = QACollator(tokenizer, max_length=max_length)
    for start in range(0, len(texts), batch_size):
        ids = [
            tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
            for t in texts[start : start + batch_size]
        ]
        yield mark_closing_eos(collator([{"input_ids": i, "labels": i} for i in ids]), tokenizer.eos_token_id)


def mark_closing_eos(batch: dict[str, torch.Tensor], eos_token_id: int | None) -> dict[str, torch.Tensor]:
    """`batch` with `closing_eos` [B] (bool): whether each row's last labelled token is `eos_token_id`. True for a QA
    row unless truncation cut its EOS off; False for a text row (unless the tokenizer itself appends EOS)."""
    flags = []
    for row in batch["labels"]:
        labelled = row[row != -100]
        flags.append(eos_token_id is not None and len(labelled) > 0 and int(labelled[-1]) == eos_token_id)
    batch["closing_eos"] = torch.tensor(flags)
    return batch


def rows_text_format(dataset: Dataset, text_format: TextFormat | None) -> TextFormat:
    """The format `dataset`'s rows are read with: `text_format` as given when the rows carry its (renamed) columns
    (the trainer's own forget and retain rows), else `evaluation_format(text_format)` (benchmark rows, under the
    standard names)."""
    if isinstance(text_format, TextFormat) and len(dataset):
        try:
            text_format.detect(dataset.with_format(None)[0])
            return text_format
        except RowFormatError:
            pass  # not the training columns: benchmark rows, read under the standard names below
    return evaluation_format(text_format)


def row_format(dataset: Dataset, what: str, text_format: TextFormat | None = None) -> str:
    """The format of `dataset`'s rows (`erasus_hf.data.formats.FORMATS`: question/answer, prompt/completion,
    conversational, messages, text, tokenized), read as `rows_text_format` reads them. Raises on empty data or rows
    that fit no format."""
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty.")
    return rows_text_format(dataset, text_format).detect(dataset.with_format(None)[0], what)


def scored_columns(dataset: Dataset, text_format: TextFormat | None = None) -> tuple[str, ...]:
    """The columns whose content is scored (what `describe_rows` fingerprints for a later run's reference check)."""
    fmt, kind = rows_text_format(dataset, text_format), row_format(dataset, "The dataset", text_format)
    fields = {
        "qa": ("question", "answer"),
        "prompt_completion": ("prompt", "completion"),
        "conversational": ("prompt", "completion"),
        "text": ("text",),
    }
    if kind == "messages":
        return (fmt.column("messages"),) if fmt.column("messages") in dataset.column_names else ("conversations",)
    if kind == "tokenized":
        return tuple(c for c in ("input_ids", "labels") if c in dataset.column_names)
    return tuple(fmt.column(f) for f in fields[kind])


def check_rows_format(
    dataset: Dataset, text_format: TextFormat | None, tokenizer: PreTrainedTokenizerBase, what: str
) -> None:
    """Refuse, before any forward pass, rows this tokenizer cannot render in their format."""
    fmt, kind = rows_text_format(dataset, text_format), row_format(dataset, what, text_format)
    if kind not in ("text", "tokenized"):
        fmt.check_tokenizer(tokenizer, kind, what)
        fmt.training_template(tokenizer, kind)


def dataset_batches(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 32,
    max_length: int = 512,
    text_format: TextFormat | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `dataset` in its format, as training renders it (`rows_text_format`): text rows via
    `text_batches` (every token after the first, cut to `max_length`), every other format through the training
    collator (`QACollator`) in `text_format`'s layout; each with its `closing_eos` flags."""
    fmt = rows_text_format(dataset, text_format)
    rows = dataset.with_format(None)
    if row_format(dataset, "The dataset", text_format) == "text":
        return text_batches(tokenizer, rows[fmt.text_field], batch_size, max_length)
    collator = QACollator(tokenizer, max_length=max_length, text_format=fmt)
    return (
        mark_closing_eos(
            collator(rows.select(range(start, min(start + batch_size, len(rows)))).to_list()), tokenizer.eos_token_id
        )
        for start in range(0, len(rows), batch_size)
    )


def token_stats(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    desc: str | None = None,
    objective: Objective | None = None,
) -> list[TokenStats]:
    """TokenStats of every example of `batches` (collated batches with `labels`), in order, scored by `objective`
    (default: `CausalLMObjective`, for the causal-LM batches of `qa_batches` / `text_batches`); the batches are split
    across processes when several run (`distributed.map_sharded`). A batch's `closing_eos` (as `qa_batches` /
    `text_batches` give) sets `TokenStats.closing_eos`; batches without it mark no EOS."""
    objective = CausalLMObjective() if objective is None else objective
    batches = list(batches)
    per_batch = map_sharded(
        lambda block: [
            _batch_stats(model, b, objective)
            for b in tqdm(block, desc=desc, disable=desc is None or not is_progress_bar_enabled(), leave=False)
        ],
        batches,
    )
    return [stats for batch in per_batch for stats in batch]


def token_nll_sums(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    desc: str | None = None,
    objective: Objective | None = None,
) -> list[tuple[float, int]]:
    """(sum of the NLL over its labelled tokens, their number) of every example of `batches`, in order: what a
    perplexity over many examples (the windows of long texts) adds up. The NLL is a float32 cross-entropy over the
    objective's aligned logits, one example at a time (a batch of long windows never holds its float32 logits at
    once); the batches are split across processes as in `token_stats`."""
    objective = CausalLMObjective() if objective is None else objective
    batches = list(batches)
    per_batch = map_sharded(
        lambda block: [
            _batch_nll_sums(model, b, objective)
            for b in tqdm(block, desc=desc, disable=desc is None or not is_progress_bar_enabled(), leave=False)
        ],
        batches,
    )
    return [sums for batch in per_batch for sums in batch]


def _batch_nll_sums(model: nn.Module, batch: dict[str, torch.Tensor], objective: Objective) -> list[tuple[float, int]]:
    batch, scores = score_batch(model, batch, objective)
    targets = scored_targets(batch["labels"], scores.mask)
    out = []
    for b in range(targets.shape[0]):
        mask = scores.mask[b]
        nll = F.cross_entropy(scores.logits[b][mask].float(), targets[b][mask], reduction="sum")
        out.append((nll.item(), int(mask.sum())))
    return out


@torch.no_grad()
def score_batch(
    model: nn.Module, batch: dict[str, torch.Tensor], objective: Objective
) -> tuple[dict[str, torch.Tensor], Scores]:
    """`objective.score` of `batch` in eval mode and without gradients, on the model's device; returns the batch as
    moved there (its `closing_eos` bookkeeping left out: it is no model input) and the scores."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k != "closing_eos"}
    with eval_mode(model):
        return batch, objective.score(model, batch)


def scored_targets(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The labels that `Scores` of `labels` score, aligned with its `mask` [B, T]: the last T label positions (a causal
    LM's objective scores `labels[:, 1:]`, a seq2seq decoder's all of them)."""
    targets = labels[:, labels.shape[1] - mask.shape[1] :]
    if targets.shape != mask.shape or not torch.equal(targets != -100, mask):
        raise ValueError(
            f"The scores' mask {tuple(mask.shape)} does not line up with the labels {tuple(labels.shape)}: the "
            "objective must score the last label positions."
        )
    return targets


def mean_token_nll(scores: Scores, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One mean NLL over the tokens of the whole batch that `mask` selects (default: every token `scores` scores),
    with its graph, from the aligned logits in float32 (as transformers' own causal-LM loss upcasts them)."""
    targets = scored_targets(labels, scores.mask)
    mask = scores.mask if mask is None else mask
    return F.cross_entropy(scores.logits.float()[mask], targets[mask])


def _batch_stats(model: nn.Module, batch: dict[str, torch.Tensor], objective: Objective) -> list[TokenStats]:
    """The TokenStats of one batch, from the objective's aligned logits and the batch's labels. The log-probabilities
    come from a float32 log-softmax over the vocabulary (which the mean and std need anyway), not from the fused
    cross-entropy of `Scores.token_logprobs` in the logits' dtype: the same numbers, to the bit, as the direct
    full-vocabulary computation the metrics were checked against."""
    closing_eos = batch.get("closing_eos")
    batch, scores = score_batch(model, batch, objective)
    targets = scored_targets(batch["labels"], scores.mask)
    out = []
    for b in range(targets.shape[0]):
        mask = scores.mask[b]
        scored = scores.logits[b][mask].float()
        if scored.shape[0] == 0:
            raise ValueError("An example has no scored token (all labels are -100).")
        logp = torch.log_softmax(scored, dim=-1)
        probs = logp.exp()
        mean = (probs * logp).sum(-1)
        var = (probs * logp.square()).sum(-1) - mean.square()
        kept = targets[b][mask]
        out.append(
            TokenStats(
                logprobs=logp.gather(-1, kept[:, None])[:, 0].cpu(),
                targets=kept.cpu(),
                argmax=scored.argmax(-1).cpu(),
                mean=mean.cpu(),
                std=var.clamp_min(0).sqrt().cpu(),
                closing_eos=bool(closing_eos[b]) if closing_eos is not None else False,
            )
        )
    return out
