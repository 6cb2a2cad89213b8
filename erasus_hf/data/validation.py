"""Refuse malformed forget/retain data before any compute, naming the side, the row, the column and the fix.

`to_dataset` turns what a user passes as one side into a `datasets.Dataset` (refusing paths, dicts of columns,
`DatasetDict`s and rows whose columns disagree), `eval_sides` does it for `eval_dataset`; `check_rows` checks the
rows a causal-LM `QACollator` will read, in any of the formats of `formats.TextFormat` (raw question/answer text,
prompt/completion, chat messages, raw text, or pre-tokenized ids that fit the model's vocabulary).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import PreTrainedTokenizerBase

from .formats import CHAT_FORMATS, FORMAT_FIELDS, RowFormatError, TextFormat

# how each side is passed to `UnlearningTrainer`, for messages
ARGUMENTS = {
    "forget": "forget_dataset",
    "retain": "retain_dataset",
    "eval forget": "eval_dataset['forget']",
    "eval retain": "eval_dataset['retain']",
}
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _argument(what: str) -> str:
    return ARGUMENTS.get(what, what)


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def to_dataset(data: Any, what: str = "dataset") -> Dataset:
    """One side's rows as a `datasets.Dataset`: a `Dataset` as it is, a list of row dicts converted; anything else
    (a path, a dict of columns, a `DatasetDict`, a streaming dataset) is refused with how to pass it."""
    if isinstance(data, Dataset):
        return data
    where = f"The {what} set ({_argument(what)})"
    if isinstance(data, (DatasetDict, IterableDatasetDict)):
        raise ValueError(f"{where} is a DatasetDict {_pass_a_split(data, _argument(what).split('[')[0])}")
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        loader = LOADERS.get(os.path.splitext(path)[1].lower(), "json")
        raise ValueError(
            f"{where} is a path, {path!r}, not a dataset: load the rows first, e.g. "
            f"datasets.load_dataset({loader!r}, data_files={path!r})['train']."
        )
    if isinstance(data, IterableDataset):
        raise ValueError(
            f"{where} is a streaming IterableDataset; unlearning pairs and re-reads rows by index: materialise it, "
            "e.g. Dataset.from_list(list(dataset))."
        )
    if isinstance(data, Mapping):
        keys = list(data)
        if keys and all(isinstance(v, (list, tuple)) for v in data.values()):
            raise ValueError(f"{where} is a dict of columns {keys}; pass datasets.Dataset.from_dict(columns).")
        raise ValueError(f"{where} is a single dict (columns {keys}); pass a list of rows, e.g. [row].")
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # a pandas DataFrame
        raise ValueError(f"{where} is a {type(data).__name__}; pass datasets.Dataset.from_pandas(frame).")
    try:
        rows = None if isinstance(data, (bytes, bytearray)) else list(data)  # a list, or any iterable of rows
    except TypeError:
        rows = None
    if rows is None:
        raise TypeError(f"{where} must be a datasets.Dataset or a list of row dicts, got {type(data).__name__}.")
    check_row_dicts(rows, what)
    try:
        return Dataset.from_list(rows)
    except Exception as err:  # pyarrow's conversion errors (ArrowInvalid, ArrowTypeError) name no row
        raise ValueError(f"{where}: its rows do not form one table ({type(err).__name__}: {err}).") from err


def _pass_a_split(splits: Mapping, argument: str) -> str:
    """'with splits [...]; pass one split, e.g. forget_dataset=dataset['train']' (the 'train' split when there is
    one, else the first)."""
    names = list(splits)
    split = "train" if "train" in names or not names else names[0]
    return f"with splits {names}; pass one split, e.g. {argument}=dataset[{split!r}]."


def eval_sides(eval_dataset: Any) -> dict[str, Dataset | None] | None:
    """`eval_dataset` as `{"forget": Dataset, "retain": Dataset or None}`: a `{"forget": ..., "retain": ...}` dict
    (retain optional), or one dataset (a `Dataset` or a list of rows): the forget side, as TRL users pass
    `eval_dataset`. A `DatasetDict` of other splits is refused with the split to pass; None stays None."""
    if eval_dataset is None:
        return None
    if not isinstance(eval_dataset, Mapping):
        eval_dataset = {"forget": eval_dataset}
    elif set(eval_dataset) - {"forget", "retain"} or "forget" not in eval_dataset:
        if isinstance(eval_dataset, (DatasetDict, IterableDatasetDict)):
            raise ValueError(
                f"The eval set (eval_dataset) is a DatasetDict {_pass_a_split(eval_dataset, 'eval_dataset')} One "
                "dataset is the eval forget side; {'forget': dataset, 'retain': dataset} gives both."
            )
        raise ValueError("eval_dataset must be {'forget': dataset, 'retain': dataset (optional)}, or one dataset.")
    retain = eval_dataset.get("retain")
    return {
        "forget": to_dataset(eval_dataset["forget"], "eval forget"),
        "retain": None if retain is None else to_dataset(retain, "eval retain"),
    }


def check_row_dicts(rows: list, what: str) -> None:
    """Every row is a dict with the first row's columns, and each column holds one kind of value (None aside: text,
    bytes, bools, numbers of any type, sequences, arrays and tensors, dicts), so the table `Dataset.from_list` builds
    is the one the user meant (it keeps only the first row's keys)."""
    where = f"The {what} set ({_argument(what)})"
    columns: list[str] | None = None
    kinds: dict[str, tuple[str, int, str]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: row {i} is a {type(row).__name__}, not a dict of column: value.")
        if columns is None:
            columns = list(row)
        elif set(row) != set(columns):
            raise ValueError(
                f"{where}: row {i} has columns {sorted(row)}, row 0 has {sorted(columns)}; give every row the same "
                "columns."
            )
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            if column not in kinds:
                kinds[column] = (kind, i, _type_name(value))
            elif kinds[column][0] != kind:
                _, first_row, first_type = kinds[column]
                raise ValueError(
                    f"{where}: column {column!r} mixes types: row {first_row} holds {first_type}, row {i} "
                    f"holds {_type_name(value)} ({value!r:.60}). Give the column one type."
                )


def check_rows(
    dataset: Dataset,
    what: str,
    text_format: TextFormat | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vocab_size: int | None = None,
) -> str:
    """The rows a causal-LM `QACollator` reads, in one of the formats of `formats.TextFormat` (question/answer,
    prompt/completion as text or chat messages, `messages`, raw text, pre-tokenized ids inside `[0, vocab_size)`),
    and a tokenizer that can render them. Returns the side's format; raises ValueError naming the side, the row, the
    column and the fix."""
    text_format = text_format or TextFormat()
    where = f"The {what} set ({_argument(what)})"
    rows = dataset.with_format(None)
    if len(rows) == 0:
        raise ValueError(f"{where} is empty: it has no rows to read.")
    try:
        row_format = text_format.detect(rows[0], what)
    except RowFormatError as err:
        raise RowFormatError(f"{where}: its rows {str(err).removeprefix(f'The {what} rows ')}") from None
    columns = rows.column_names
    if "alternate" in columns and row_format not in ("qa", "prompt_completion", "conversational"):
        kind = "pre-tokenized (input_ids)" if row_format == "tokenized" else f"{row_format!r} rows"
        raise ValueError(
            f"{where} is {kind}, but the strategy pairs each row with a text 'alternate' answer (dpo, idk_dpo), "
            "which replaces a row's answer or completion. Pass raw question/answer or prompt/completion rows."
        )
    if tokenizer is not None and row_format != "tokenized":
        text_format.check_tokenizer(tokenizer, row_format, what)
        text_format.training_template(tokenizer, row_format)  # refused now when no template marks the assistant
    if row_format == "tokenized":
        check_token_rows(rows, where, vocab_size)
    elif row_format in CHAT_FORMATS:
        check_chat_rows(rows, where, text_format, row_format)
    else:
        check_text_columns(rows, where, [text_format.column(f) for f in FORMAT_FIELDS[row_format]], row_format)
    return row_format


def check_qa_rows(
    dataset: Dataset,
    what: str,
    question_key: str = "question",
    answer_key: str = "answer",
    vocab_size: int | None = None,
) -> None:
    """Question/answer text rows (or pre-tokenized ids): `check_rows` with these two columns, refusing rows of the
    other formats (what a question/answer-only consumer, such as the TOFU command line, reads)."""
    text_format = TextFormat(columns={"question": question_key, "answer": answer_key})
    columns = dataset.column_names
    if "input_ids" not in columns and not {question_key, answer_key} <= set(columns):
        missing = [c for c in (question_key, answer_key) if c not in columns]
        raise ValueError(
            f"The {what} set ({_argument(what)}) has columns {columns}, without {missing}: it needs question/answer "
            f"text ({question_key!r}, {answer_key!r}) or pre-tokenized 'input_ids'. Rename the columns "
            "(dataset.rename_column)."
        )
    check_rows(dataset, what, text_format, vocab_size=vocab_size)


def check_text_columns(rows: Dataset, where: str, text_columns: list[str], row_format: str) -> None:
    """Each of `text_columns` (and a DPO-style `alternate`) holds non-empty text on every row."""
    if "alternate" in rows.column_names:
        text_columns = [*text_columns, "alternate"]
    for column in text_columns:
        for i, value in enumerate(rows[column]):
            problem = None
            if isinstance(value, (bytes, bytearray)):
                problem = "is bytes, not text: decode it (value.decode('utf-8'))"
            elif not isinstance(value, str):
                problem = f"is {_type_name(value)}, not text (str)"
            elif not value.strip():
                problem = "is empty" + (
                    ": an empty answer leaves only the closing EOS to train on"
                    if column == text_columns[-1] and row_format != "text"
                    else ""
                )
            if problem:
                raise ValueError(f"{where}: row {i}, column {column!r} {problem}. Fix or drop the row.")


def check_chat_rows(rows: Dataset, where: str, text_format: TextFormat, row_format: str) -> None:
    """Conversational rows: lists of `{'role', 'content'}` turns (ShareGPT `conversations` converted by TRL); a
    `messages` row with only assistant turns scored needs one; a completion is assistant turns."""
    sides = (
        {text_format.column("prompt"): "prompt", text_format.column("completion"): "completion"}
        if row_format == "conversational"
        else {text_format.column("messages"): "messages"}
    )
    for i, row in enumerate(rows):
        if row_format == "messages":
            row = {text_format.column("messages"): text_format.messages_of(row)}
        for column, side in sides.items():
            turns = row[column]
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"{where}: row {i}, column {column!r} must be a non-empty list of chat messages.")
            for turn in turns:
                if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str) or "content" not in turn:
                    raise ValueError(
                        f"{where}: row {i}, column {column!r} holds {turn!r:.80}; each message is a dict with "
                        "'role' and 'content'."
                    )
            roles = [turn["role"] for turn in turns]
            needs_assistant = side == "completion" or (side == "messages" and text_format.assistant_only_loss)
            if needs_assistant and "assistant" not in roles:
                fix = ": pass assistant_only_loss=False to score the whole conversation" if side == "messages" else ""
                raise ValueError(
                    f"{where}: row {i}, column {column!r} has no assistant turn (roles {roles}); only assistant "
                    f"turns are scored{fix}."
                )


def check_token_rows(rows: Dataset, where: str, vocab_size: int | None) -> None:
    """Pre-tokenized rows: non-empty integer `input_ids` inside the vocabulary, `labels` and `attention_mask` of the
    same length, labels ids or -100."""
    columns = rows.column_names
    labels = rows["labels"] if "labels" in columns else None
    masks = rows["attention_mask"] if "attention_mask" in columns else None
    for i, ids in enumerate(rows["input_ids"]):
        if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(t) for t in ids):
            raise ValueError(
                f"{where}: row {i}, column 'input_ids' must be a non-empty list of token ids, got {ids!r:.80}."
            )
        bad = [t for t in ids if not _in_vocabulary(t, vocab_size)]
        if bad:
            raise ValueError(
                f"{where}: row {i}, column 'input_ids' holds token id {bad[0]}, outside the model's vocabulary "
                f"[0, {vocab_size}). Tokenize with the model's own tokenizer (or resize its embeddings)."
            )
        if labels is not None and labels[i] is not None:
            row_labels = labels[i]
            if not isinstance(row_labels, (list, tuple)) or len(row_labels) != len(ids):
                length = len(row_labels) if isinstance(row_labels, (list, tuple)) else _type_name(row_labels)
                raise ValueError(
                    f"{where}: row {i}, column 'labels' has {length} entries, input_ids has {len(ids)}: labels are "
                    "per input token (-100 where not scored), the shift happens in the loss."
                )
            wrong = [t for t in row_labels if t != -100 and not _in_vocabulary(t, vocab_size)]
            if wrong:
                raise ValueError(
                    f"{where}: row {i}, column 'labels' holds {wrong[0]!r}: a label is a token id in "
                    f"[0, {vocab_size}) or -100 (not scored)."
                )
        if masks is not None and masks[i] is not None and len(masks[i]) != len(ids):
            raise ValueError(
                f"{where}: row {i}, column 'attention_mask' has {len(masks[i])} entries, input_ids has {len(ids)}."
            )


def _kind(value: Any) -> str:
    """A value's kind, coarse enough that what Arrow stores as one column type is one kind (an int beside a float,
    a numpy scalar beside a Python number, a list beside an array)."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Number):
        return "number"
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, (list, tuple)) or hasattr(value, "shape"):  # lists, numpy arrays, tensors
        return "sequence"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_vocabulary(token: Any, vocab_size: int | None) -> bool:
    return _is_int(token) and token >= 0 and (vocab_size is None or token < vocab_size)
