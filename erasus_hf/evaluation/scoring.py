"""Teacher-forced token statistics in one batched forward pass: what every likelihood metric reads.

One pass over a batch gives, for each scored token, its log-probability, the model's greedy prediction and the mean
and standard deviation of log p under the model's own next-token distribution (Min-K%++). Metrics (truth ratio, MIA
scores, exact memorization, ...) are functions of these, so a suite scores each example once.

The forward pass is the objective's (`Objective.score`, `CausalLMObjective` by default), the one the trainer's
strategies score with, so a metric means the same thing in training and in evaluation; the statistics are read from
its logits aligned with the targets (`Scores.logits`, `Scores.mask`).

Which tokens a metric scores. A QA row is ``prompt + " " + answer + EOS`` (the training layout of
``data.collator.QACollator``): its labelled tokens are the answer tokens and the closing EOS. A text row is
``BOS + text`` with every token after the BOS labelled (no EOS). ``TokenStats`` holds every labelled token and marks
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import is_progress_bar_enabled

from ..data.collator import QACollator
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


def qa_batches(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of question/answer rows in the training layout (prompt masked, EOS appended), each with a
    `closing_eos` flag per row (see `mark_closing_eos`)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers.")
    collator = QACollator(tokenizer, max_length=max_length)
    rows = [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    for start in range(0, len(rows), batch_size):
        yield mark_closing_eos(collator(rows[start : start + batch_size]), tokenizer.eos_token_id)


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


def row_format(dataset: Dataset, what: str) -> str:
    """`"qa"` for question/answer rows (the answer is scored given the question), `"text"` for rows with a `text`
    column (every token after the first is scored); QA wins when both are present. Raises on empty or unusable data."""
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty.")
    columns = set(dataset.column_names)
    if {"question", "answer"} <= columns:
        return "qa"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"{what} needs 'question' and 'answer' columns (QA rows) or a 'text' column; it has {dataset.column_names}."
    )


def dataset_batches(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32, max_length: int = 512
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `dataset` (QA rows via `qa_batches`, text rows via `text_batches`)."""
    if row_format(dataset, "The dataset") == "qa":
        return qa_batches(tokenizer, dataset["question"], dataset["answer"], batch_size, max_length)
    return text_batches(tokenizer, dataset["text"], batch_size, max_length)


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
