"""The options `erasus-hf unlearn` and `evaluate` share: which rows each side reads (a benchmark's, or any dataset's),
how they become tokens, and how the model loads.

The side options are TRL's `ScriptArguments` (`dataset_name`, `dataset_config`, `dataset_train_split`), one set per
side: `--forget_dataset_name`, `--forget_dataset_config`, `--forget_dataset_split` and the same for `--retain_`. A TRL
user passes the value they pass to `trl sft --dataset_name` (a Hub id, a local folder, or here also a .json/.jsonl/
.parquet/.csv file); the TOFU options keep their names (`--forget_split forget10` is a TOFU configuration).

The model options are TRL's `ModelConfig` names (`--dtype`, `--attn_implementation`, `--trust_remote_code`); they
go into `UnlearningConfig.model_init_kwargs`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import DTYPES, UnlearningConfig
from ..data.formats import TextFormat, chat_template_of
from ..data.loading import DataSource, one_line
from ..data.validation import check_rows
from .parsing import UsageError

BENCHMARKS = ("tofu", "muse")
SIDES = ("forget", "retain")
MUSE_SIDES = {"forget": ("raw", "forget"), "retain": ("knowmem", "retain_qa")}
"""MUSE's training rows, (config, split): the raw forget articles (column `text`) and the retain knowledge QA
(`question`/`answer`): a raw-text forget corpus with a QA retain set."""

_SIDE_HELP = {
    "name": "The {side} rows, as TRL's --dataset_name: a .json/.jsonl/.parquet/.csv file, a folder "
    "({{config}}/{{split}}.json files, or any folder load_dataset reads) or a Hub dataset id. Rows of any format: "
    "question/answer, prompt/completion (text or chat messages), messages, raw text (--dataset_text_field).{extra}",
    "config": "The configuration of --{side}_dataset_name (load_dataset's name), as TRL's --dataset_config.{extra}",
    "split": "The split of --{side}_dataset_name, sliced as datasets slices one ('train[:100]'); default 'train' "
    "(a file's only split).{extra}",
}
_SIDE_EXTRA = {
    ("forget", "name"): " Given without --benchmark, the run is evaluated on these rows themselves (NLL, exact "
    "memorization, extraction strength of forget and retain); with --benchmark, they replace its forget rows.",
    ("retain", "name"): " Optional when the strategy has no retain term (or --retain_loss none).",
    ("forget", "config"): " With --benchmark muse and no --forget_dataset_name: the MUSE config (default raw).",
    ("forget", "split"): " With --benchmark muse and no --forget_dataset_name: the MUSE split (default forget, e.g. "
    "'forget[:8]').",
    ("retain", "config"): " With --benchmark muse and no --retain_dataset_name: the MUSE config (default knowmem).",
    ("retain", "split"): " With --benchmark muse and no --retain_dataset_name: the MUSE split (default retain_qa).",
}


def side_field(side: str, part: str) -> Any:
    """The dataclass field of option `--{side}_dataset_{part}` (`part`: name, config or split), default None."""
    text = _SIDE_HELP[part].format(side=side, extra=_SIDE_EXTRA.get((side, part), ""))
    return dataclasses.field(default=None, metadata={"help": text})


MODEL_INIT_HELP = {
    "dtype": "The dtype the model loads in (TRL's --dtype; into model_init_kwargs): auto, bfloat16, float16, float32. "
    "Default: transformers' (float32).",
    "attn_implementation": "The attention implementation (TRL's --attn_implementation; into model_init_kwargs): e.g. "
    "sdpa, eager, flash_attention_2.",
    "trust_remote_code": "Run the model's own code from its repository (TRL's --trust_remote_code; into "
    "model_init_kwargs, also for the tokenizer). Only for repositories you trust.",
}


TOKENIZER_HELP = (
    "Where the tokenizer loads from when it is not beside the model (default: the model's folder or repository). "
    "MUSE's target models use Llama-2's, meta-llama/Llama-2-7b-hf, as open-unlearning loads them."
)


def model_init_field(name: str) -> Any:
    """The dataclass field of `--dtype`, `--attn_implementation` or `--trust_remote_code`."""
    if name == "trust_remote_code":
        return dataclasses.field(default=False, metadata={"help": MODEL_INIT_HELP[name]})
    metadata: dict[str, Any] = {"help": MODEL_INIT_HELP[name]}
    if name == "dtype":
        metadata["choices"] = list(DTYPES)
    return dataclasses.field(default=None, metadata=metadata)


def merged_model_init_kwargs(args: Any, model_init_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """`model_init_kwargs` with the `--dtype`, `--attn_implementation`, `--trust_remote_code` values of `args` added;
    a flag that disagrees with the same key of `--model_init_kwargs` is refused naming both."""
    merged = dict(model_init_kwargs or {})
    for key in MODEL_INIT_HELP:
        value = getattr(args, key)
        if value is None or value is False:
            continue
        if key in merged and merged[key] != value:
            raise UsageError(
                f"--{key} {value!r} and --model_init_kwargs {{{key!r}: {merged[key]!r}}} disagree; give one of them."
            )
        merged[key] = value
    return merged or None


# ---- the formatting options, which `erasus-hf evaluate` takes from UnlearningConfig's fields ----

FORMAT_OPTIONS = (
    "dataset_text_field",
    "dataset_columns",
    "chat_template_path",
    "use_chat_template",
    "prompt_template",
    "system_prompt",
    "completion_only_loss",
    "assistant_only_loss",
    "window_stride",
)
"""`UnlearningConfig`'s TRL-style options of how rows become tokens (`UnlearningConfig.text_format`)."""

DATA_OPTIONS = (
    "benchmark",
    *(f"{side}_dataset_{part}" for side in SIDES for part in ("name", "config", "split")),
    "dataset",
    "data_dir",
    "forget_split",
    "retain_split",
    "num_retain_authors",
    "holdout_split",
    "muse_data_dir",
    "muse_corpus",
    *FORMAT_OPTIONS,
)
"""The options `--help` lists together under "data options" (those a command has)."""


def _format_arguments() -> type:
    """A dataclass of `UnlearningConfig`'s `FORMAT_OPTIONS` and `max_length`, same types, defaults and help: how
    `erasus-hf evaluate` renders rows, as `unlearn` trained them."""
    hints = typing.get_type_hints(UnlearningConfig)
    fields = {f.name: f for f in dataclasses.fields(UnlearningConfig)}
    specs = []
    for name in ("max_length", *FORMAT_OPTIONS):
        source = fields[name]
        specs.append((name, hints[name], dataclasses.field(default=source.default, metadata=source.metadata)))
    cls = dataclasses.make_dataclass("FormatArguments", specs)
    cls.__module__ = __name__
    cls.__doc__ = "How rows become tokens (`UnlearningConfig`'s options of the same names; `text_format_of`)."
    return cls


FormatArguments = _format_arguments()


def text_format_of(args: Any) -> TextFormat:
    """The `TextFormat` of an `UnlearningConfig` or a `FormatArguments` (a bad value is a `UsageError`)."""
    if isinstance(args, UnlearningConfig):
        return args.text_format()
    columns = args.dataset_columns
    try:
        if isinstance(columns, str):
            columns = json.loads(columns)
        return TextFormat(
            columns=columns or {},
            text_field=args.dataset_text_field,
            prompt_template=args.prompt_template,
            use_chat_template=args.use_chat_template,
            system_prompt=args.system_prompt,
            completion_only_loss=args.completion_only_loss,
            assistant_only_loss=args.assistant_only_loss,
            window_stride=args.window_stride,
        )
    except ValueError as err:  # json.JSONDecodeError and RowFormatError are ValueErrors
        raise UsageError(one_line(err)) from err


def chat_template_option(args: Any) -> str | None:
    """The template `--chat_template_path` names (None without it), read as the trainer reads it
    (`formats.chat_template_of`); one that cannot be read is a `UsageError`."""
    if args.chat_template_path is None:
        return None
    try:
        return chat_template_of(args.chat_template_path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--chat_template_path {args.chat_template_path!r}: {one_line(err)}") from err


# ---- the rows of one side ----


def check_side(
    rows: Dataset,
    side: str,
    source: DataSource | str,
    text_format: TextFormat,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vocab_size: int | None = None,
) -> str:
    """`validation.check_rows` on one side's rows, its refusal raised as a `UsageError` naming the option the rows
    came from (`--forget_dataset_name rows.jsonl: ...`); returns the rows' format."""
    try:
        return check_rows(rows, side, text_format, tokenizer, vocab_size)
    except ValueError as err:
        where = f"{source.flags[0]} {source.name!r}" if isinstance(source, DataSource) else source
        raise UsageError(f"{where}: {one_line(err)}") from err


DATA_HELP = (
    "Each side's rows are named as TRL's ScriptArguments name a training set (dataset_name, dataset_config, a split), "
    "one set per side, --forget_dataset_* and --retain_dataset_*: the value a TRL user gives `trl sft --dataset_name` "
    "works here. The TOFU options keep their names (--forget_split forget10 is a TOFU configuration). How rows become "
    "tokens follows TRL's SFTConfig (dataset_text_field, chat_template_path, completion_only_loss, "
    "assistant_only_loss)."
)
OPTION_GROUPS = {"data options (which rows each side reads, and how they become tokens)": (DATA_HELP, DATA_OPTIONS)}
"""`make_parser`'s groups of `unlearn` and `evaluate`: after the command's own options, before TrainingArguments'."""
