"""Teacher-forced token statistics in one batched forward pass: what every likelihood metric reads.

One pass over a batch gives, for each scored token, its log-probability, the model's greedy prediction and the mean
and standard deviation of log p under the model's own next-token distribution (Min-K%++). Metrics (truth ratio, MIA
scores, exact memorization, ...) are functions of these, so a suite scores each example once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import is_progress_bar_enabled

from ..data.collator import QACollator
from ..reference import eval_mode
from .distributed import map_sharded


@dataclass
class TokenStats:
    """One example's scored tokens (answer tokens of a QA row; every token after the first of a text).

    `logprobs[t] = log p(y_t | y_<t)`, `targets[t] = y_t`, `argmax[t]` the model's greedy prediction at that
    position, `mean[t]` and `std[t]` the mean and standard deviation of log p(z) for z ~ p(. | y_<t).
    """

    logprobs: torch.Tensor
    targets: torch.Tensor
    argmax: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood over the scored tokens."""
        return -self.logprobs.mean().item()


def qa_batches(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of question/answer rows in the training layout (prompt masked, EOS appended)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers.")
    collator = QACollator(tokenizer, max_length=max_length)
    rows = [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    for start in range(0, len(rows), batch_size):
        yield collator(rows[start : start + batch_size])


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
        yield collator([{"input_ids": i, "labels": i} for i in ids])


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


def scored_texts(dataset: Dataset) -> list[str]:
    """The text each row's scored tokens come from: the answer of a QA row, the text of a text row."""
    return list(dataset["answer"] if row_format(dataset, "The dataset") == "qa" else dataset["text"])


def token_stats(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], desc: str | None = None
) -> list[TokenStats]:
    """TokenStats of every example of `batches` (collated causal-LM batches with `labels`), in order; the batches
    are split across processes when several run (`distributed.map_sharded`)."""
    batches = list(batches)
    per_batch = map_sharded(
        lambda block: [
            _batch_stats(model, b)
            for b in tqdm(block, desc=desc, disable=desc is None or not is_progress_bar_enabled(), leave=False)
        ],
        batches,
    )
    return [stats for batch in per_batch for stats in batch]


@torch.no_grad()
def _batch_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[TokenStats]:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with eval_mode(model):
        logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    out = []
    for b in range(labels.shape[0]):
        scored = logits[b][mask[b]].float()
        if scored.shape[0] == 0:
            raise ValueError("An example has no scored token (all labels are -100).")
        logp = torch.log_softmax(scored, dim=-1)
        probs = logp.exp()
        mean = (probs * logp).sum(-1)
        var = (probs * logp.square()).sum(-1) - mean.square()
        targets = labels[b][mask[b]]
        out.append(
            TokenStats(
                logprobs=logp.gather(-1, targets[:, None])[:, 0].cpu(),
                targets=targets.cpu(),
                argmax=scored.argmax(-1).cpu(),
                mean=mean.cpu(),
                std=var.clamp_min(0).sqrt().cpu(),
            )
        )
    return out
