"""The model a command starts from: a saved model or PEFT adapter loaded (`load_model`), or, when none is named, the
tiny Llama trained here on the rows to unlearn (`starting_model`), in whatever format they come (question/answer,
prompt/completion, chat messages, raw text). The demo, `erasus-hf unlearn`, `evaluate` and `push --merge` all load
through these."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..data.collator import QACollator
from ..data.formats import TextFormat
from ..model_source import check_model_source, from_pretrained_kwargs, load_causal_lm

TOFU_EXTRA_TEXT = ("paraphrased_answer", "perturbed_answer")
"""TOFU's evaluation columns: their text joins the tokenizer's training text, so the evaluation answers tokenize as
compactly as the trained ones."""


def load_model(
    path: str, base_model: str | None = None, model_init_kwargs: dict[str, Any] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a full-model folder (or Hub id) or a PEFT adapter folder (its base from `base_model`
    or the adapter config), the model (an adapter's base) loaded with `model_init_kwargs` (`UnlearningConfig`'s:
    dtype, attn_implementation, trust_remote_code, quantization_config, ...; `trust_remote_code` and `revision` also
    apply to the tokenizer). A missing folder, a moved adapter base or a missing tokenizer is named before anything
    loads (`erasus_hf.model_source.check_model_source`)."""
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return load_causal_lm(path, model_init_kwargs=model_init_kwargs)
    check_model_source(path, base_model)  # also refuses an adapter config that names no base
    from peft import PeftConfig, PeftModel

    kwargs = from_pretrained_kwargs(model_init_kwargs)
    base = base_model or PeftConfig.from_pretrained(path).base_model_name_or_path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), path)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    shared = {key: kwargs[key] for key in ("trust_remote_code", "revision") if key in kwargs}
    return model, AutoTokenizer.from_pretrained(path if has_tokenizer else base, **shared)


def _texts(value: Any) -> list[str]:
    """The text in one cell: a string, or the `content` of each chat message of a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _texts(item.get("content") if isinstance(item, dict) else item)]
    return []


def row_texts(sides: Sequence[Dataset], text_format: TextFormat) -> list[str]:
    """The text of the rows of every side, field by field (questions, then answers, ...; chat messages' contents;
    raw text), then TOFU's paraphrased and perturbed answers when present: what the tiny tokenizer is trained on."""
    texts: list[str] = []
    fields = [text_format.column(f) for f in ("question", "answer", "prompt", "completion", "messages")]
    for column in [*fields, "conversations", text_format.column("text"), *TOFU_EXTRA_TEXT]:
        for side in sides:
            if column in side.column_names:
                texts += [t for value in side[column] for t in _texts(value)]
    return texts


def tiny_tokenizer(
    sides: Sequence[Dataset],
    text_format: TextFormat | None = None,
    chat_template: str | None = None,
) -> PreTrainedTokenizerBase:
    """The byte-level BPE tokenizer of the tiny Llama, trained on the rows' text (`row_texts`), with `chat_template`
    (whose own text it is also trained on, so its markers tokenize compactly) when one is given."""
    from .tiny import DEMO_MODEL, train_tokenizer

    text_format = text_format or TextFormat()
    texts = row_texts(sides, text_format)
    texts += [t for t in (chat_template, text_format.system_prompt) if t]
    tokenizer = train_tokenizer(texts, vocab_size=DEMO_MODEL.vocab_size)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def sft_rows(sides: Sequence[Dataset], tokenizer: PreTrainedTokenizerBase, text_format: TextFormat, max_length: int):
    """One dataset of the rows of every side for `sft_train`: the format's columns of the sides joined when they share
    a format and its features (TRL then reads them in its own format), else every side's collator examples
    pre-tokenized (a raw-text forget corpus beside question/answer retain rows, MUSE's setting)."""
    formats = [text_format.detect(side.with_format(None)[0], "SFT") for side in sides]
    if "tokenized" in formats:
        raise ValueError(
            "Pre-tokenized rows (input_ids) need the model whose vocabulary they use: pass model_name_or_path; a "
            "tiny model trained here has a tokenizer of its own."
        )
    columns = [_format_columns(side, text_format, row_format) for side, row_format in zip(sides, formats)]
    selected = [side.select_columns(cols) for side, cols in zip(sides, columns)]
    if len(set(formats)) == 1 and all(s.features == selected[0].features for s in selected):
        return concatenate_datasets(selected) if len(selected) > 1 else selected[0]
    collator = QACollator(tokenizer, max_length=max_length, text_format=text_format)
    examples = [e for side in sides for row in side.with_format(None) for e in collator.examples(row)]
    return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


def _format_columns(side: Dataset, text_format: TextFormat, row_format: str) -> list[str]:
    fields = {
        "qa": ("question", "answer"),
        "prompt_completion": ("prompt", "completion"),
        "conversational": ("prompt", "completion"),
        "messages": ("messages",),
        "text": ("text",),
    }[row_format]
    columns = [text_format.column(f) for f in fields]
    if row_format == "messages" and columns[0] not in side.column_names:
        columns = ["conversations"]  # ShareGPT rows
    return columns


def starting_model(
    model_name_or_path: str | None,
    forget: Dataset,
    retain: Dataset | None,
    output_dir: str,
    seed: int = 0,
    quiet: bool = False,
    *,
    text_format: TextFormat | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat_template: str | None = None,
    max_length: int | None = None,
    model_init_kwargs: dict[str, Any] | None = None,
    num_train_epochs: float | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model that knows the forget and retain rows: loaded (`load_model`, with `model_init_kwargs`), or (no model
    given) a tiny Llama trained here on them with TRL's SFTTrainer, in the layout `text_format` renders (default
    `TextFormat()`), and saved to `output_dir/starting_model`, the base the unlearning adapter applies to.

    For the tiny model: `tokenizer` is the one to train it with (default `tiny_tokenizer` on the rows, with
    `chat_template`); `max_length` is the run's (a text row's windows; the model's positions are at least that many);
    `num_train_epochs` its SFT epochs (default `tiny.DEMO_SFT`'s). `model_init_kwargs` only apply to a loaded model and
    are refused without one."""
    if model_name_or_path:
        return load_model(model_name_or_path, model_init_kwargs=model_init_kwargs)
    if model_init_kwargs:
        raise ValueError(
            f"model_init_kwargs ({sorted(model_init_kwargs)}) apply to a model loaded from model_name_or_path; "
            "without one a tiny float32 Llama is trained here: drop them, or name the model."
        )
    from .tiny import DEMO_MODEL, DEMO_SFT, build_tiny_llama, sft_train

    text_format = text_format or TextFormat()
    sides = [side for side in (forget, retain) if side is not None]
    if tokenizer is None:
        tokenizer = tiny_tokenizer(sides, text_format, chat_template)
    positions = max(DEMO_MODEL.max_position_embeddings, max_length or 0)
    length = max_length or positions
    rows = sft_rows(sides, tokenizer, text_format, length)
    model = build_tiny_llama(tokenizer, max_position_embeddings=positions, seed=seed)
    print(
        f"Training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama on "
        f"{_describe_sides(sides, text_format)} (TRL SFTTrainer)..."
    )
    with tempfile.TemporaryDirectory() as workdir:
        model = sft_train(
            model,
            tokenizer,
            rows,
            output_dir=workdir,
            text_format=text_format,
            max_length=length,
            num_train_epochs=num_train_epochs or DEMO_SFT.num_train_epochs,
            seed=seed,
            disable_tqdm=quiet,
        )
    # The adapter needs its base: keep the model trained here beside it, and point the adapter config at it.
    starting_dir = os.path.abspath(os.path.join(output_dir, "starting_model"))
    model.save_pretrained(starting_dir)
    tokenizer.save_pretrained(starting_dir)
    model.config._name_or_path = starting_dir
    model.name_or_path = starting_dir  # what PEFT writes as the adapter's base_model_name_or_path
    return model, tokenizer


def _describe_sides(sides: Iterable[Dataset], text_format: TextFormat) -> str:
    """'160 qa rows' / '8 text rows + 40 qa rows'."""
    parts = [f"{len(side)} {text_format.detect(side.with_format(None)[0], 'SFT')} rows" for side in sides]
    return " + ".join(parts)
