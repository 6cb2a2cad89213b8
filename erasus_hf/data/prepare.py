"""One side's rows made ready for training: checked, tokenized once up front, and paired.

The trainer calls these in `__init__`, before any compute: a refused run costs no tokenization of the other side, no
reference pass and no copy of the model. Warnings are raised with the stack level of the user's call that built the
trainer (`UnlearningTrainer(...)` -> `__init__` -> here).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from .collator import QACollator, SideCollator
from .pairing import ForgetRetainDataset
from .validation import check_rows, to_dataset

logger = logging.getLogger(__name__)

# a strategy's alternate answers for the forget rows (`Strategy.alternate_answers`): one per row, or None
AlternateAnswers = Callable[[Dataset, int], Sequence[str] | None]


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Use EOS as the pad token when there is none (labels mask padding by position, not by id, so the EOS that
    ends each answer stays scored); fail when there is no EOS either."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning("The tokenizer has no pad token; using its EOS token %r for padding.", tokenizer.eos_token)


def embedding_rows(model: nn.Module) -> int | None:
    """The number of token ids the model's input embeddings accept (None when it has none)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embeddings, "num_embeddings", None)


def with_alternates(data: Dataset | list[dict], alternate_answers: AlternateAnswers, seed: int) -> Dataset:
    """The forget rows, with the strategy's alternate answers (DPO-style methods) as an `alternate` column."""
    dataset = to_dataset(data)
    alternates = alternate_answers(dataset, seed)
    if alternates is None or "alternate" in dataset.column_names:
        return dataset
    return dataset.add_column("alternate", alternates)


def side_format(dataset: Dataset, side_collator: Any, what: str, vocab_size: int | None = None) -> str | None:
    """The format of a side's rows (`formats.FORMATS`), checked (see `validation.check_rows`), when a `QACollator`
    reads them; None for other collators."""
    if not isinstance(side_collator, QACollator):
        return None
    return check_rows(dataset, what, side_collator.text_format, side_collator.tokenizer, vocab_size)


def prepare_side(
    data: Any, side_collator: Any, what: str, vocab_size: int | None = None
) -> tuple[Dataset, str | None]:
    """A `datasets.Dataset` of the side, checked for emptiness and its rows (`side_format`), tokenized once up front
    when the collator is a `SideCollator` (a long text row gives several windows), checked for examples with no
    scored token; and the rows' format (None when the collator is not a `QACollator`)."""
    dataset = to_dataset(data, what)
    if len(dataset) == 0:
        raise ValueError(f"The {what} set is empty.")
    row_format = side_format(dataset, side_collator, what, vocab_size)
    if not isinstance(side_collator, SideCollator):
        return dataset, row_format
    tokenized = dataset.map(
        side_collator.tokenize_rows, batched=True, remove_columns=dataset.column_names, desc=f"Tokenizing {what}"
    )
    empty = [i for i, labels in enumerate(tokenized["labels"]) if all(t == -100 for t in labels)]
    if empty:
        unit = "rows" if len(tokenized) == len(dataset) else "examples (windows)"
        cause = {
            "messages": "no assistant turn is left within max_length, or the chat template marks none",
            "text": "the text has no token after the BOS",
        }.get(row_format, "the prompt fills max_length or the answer is empty")
        raise ValueError(
            f"{len(empty)} {what} example(s) have no scored token left (all labels are -100), e.g. {unit} "
            f"{empty[:5]}: {cause} (max_length={side_collator.max_length})."
        )
    return tokenized, row_format


def warn_overlap(forget: Dataset, retain: Dataset | None) -> int:
    """Warn (with the count) when forget examples also appear in the retain set; return the count."""
    if retain is None or "input_ids" not in forget.column_names or "input_ids" not in retain.column_names:
        return 0
    retain_rows = {tuple(ids) for ids in retain["input_ids"]}
    overlap = sum(tuple(ids) in retain_rows for ids in forget["input_ids"])
    if overlap:
        warnings.warn(
            f"{overlap} forget example(s) also appear in the retain set; the two terms pull them both ways.",
            stacklevel=3,
        )
    return overlap


def warn_past_positions(model: nn.Module, side: Dataset | None, what: str, max_length: int) -> int:
    """Warn when `max_length` exceeds the model's `max_position_embeddings` and rows of the (tokenized) side are
    longer than that: they reach positions the model never saw (a learned position table fails on them). Return the
    number of such rows."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if side is None or not isinstance(positions, int) or max_length <= positions:
        return 0
    if "input_ids" not in side.column_names:
        return 0
    lengths = [len(ids) for ids in side.with_format(None)["input_ids"]]
    longer = [i for i, n in enumerate(lengths) if n > positions]
    if longer:
        warnings.warn(
            f"max_length={max_length} exceeds the model's max_position_embeddings={positions}, and {len(longer)} "
            f"{what} row(s) are longer (row {longer[0]}: {lengths[longer[0]]} tokens): they reach positions the model "
            f"never saw. Set max_length={positions} to truncate them.",
            stacklevel=3,
        )
    return len(longer)


def eval_pairs(
    eval_dataset: dict[str, Dataset | None],
    side_collator: Any,
    forget: Dataset,
    retain: Dataset | None,
    alternate_answers: AlternateAnswers,
    seed: int,
    pairing_seed: int,
) -> ForgetRetainDataset:
    """`{"forget": ds, "retain": ds or None}` (`validation.eval_sides`) -> pairs whose indices follow the training
    forget set's (one cache); the training `retain` side pairs with the eval forget rows when `eval_dataset` has no
    retain set."""
    eval_forget = with_alternates(eval_dataset["forget"], alternate_answers, seed)
    eval_retain = eval_dataset.get("retain")
    return ForgetRetainDataset(
        prepare_side(eval_forget, side_collator, "eval forget")[0],
        prepare_side(eval_retain, side_collator, "eval retain")[0] if eval_retain is not None else retain,
        seed=pairing_seed,
        index_offset=len(forget),
    )
