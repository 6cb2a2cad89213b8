"""A tiny Llama and its tokenizer, built and trained from scratch on the rows to unlearn, offline and on CPU.

No weights can be downloaded in tests or in the offline demo, so the "finetuned model" that unlearning starts from is
made here: a byte-level BPE tokenizer trained in memory on the rows' text, a small ``LlamaForCausalLM`` from a config,
and TRL's ``SFTTrainer`` to memorise the rows. A model that has memorised its training rows gives a sharp forget
signal, so the differences between unlearning strategies show at this scale.

SFT trains the token layout unlearning and the evaluators score, ``erasus_hf.data.collator.QACollator`` with the run's
``TextFormat`` (question/answer rows through the prompt template or the chat template, prompt/completion, chat
messages, windows of raw text). For plain question/answer rows::

    input_ids = ids(prompt, with BOS) + ids(completion, no special tokens) + [eos]
    labels    = -100 on the prompt, the token ids on the completion and the EOS

TRL tokenizes ``prompt`` and ``prompt + completion + eos_token`` instead, so the two layouts agree only if tokenizing
the joined string equals concatenating the separately tokenized pieces. The tokenizer below is built so that it does
(byte-level BPE without prefix space; the completion starts with a space), and :func:`sft_train` checks it for every
format, training the collator's own tokens where TRL's differ.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from erasus_hf.data.collator import QACollator
from erasus_hf.data.formats import TextFormat
from erasus_hf.data.formatting import PROMPT_TEMPLATE, format_completion, format_prompt

logger = logging.getLogger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
"""In id order: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<pad>`` = 3 (the Llama convention for the first three)."""


@dataclass(frozen=True)
class TinyModelSettings:
    """Size of the demo Llama (arguments of :func:`build_tiny_llama`) and of its tokenizer's vocabulary."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class SFTSettings:
    """How the demo model is finetuned (arguments of :func:`sft_train`)."""

    num_train_epochs: int = 25
    learning_rate: float = 3e-3
    per_device_train_batch_size: int = 16


DEMO_MODEL = TinyModelSettings()
"""852,608 parameters with the 2048-token tokenizer. Measured on 2 shared CPU cores: trained with :data:`DEMO_SFT` on
``demo_splits(6)`` (160 QA, 250 steps) the mean answer NLL falls from 7.65 to 0.069 (worst row 0.13; seed 1: 0.083)
in 44 s with 2 torch threads, 59 s with 1. 20 epochs stop at 0.38, hence 25."""

DEMO_SFT = SFTSettings()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer in memory and wrap it for ``transformers``.

    ``tokenizer(text)`` prepends ``<s>`` (no EOS: the training layout appends it explicitly), ``decode`` is lossless
    (byte-level, no clean-up of spaces), padding is on the right. Any text encodes, including characters never seen
    in ``texts``. Saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    backend = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False: " answer" after "Answer:" tokenizes the same alone as inside the joined string.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    # In transformers 5 PreTrainedTokenizerFast is an alias of TokenizersBackend; the alias is the stable name.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = DEMO_MODEL.hidden_size,
    num_layers: int = DEMO_MODEL.num_layers,
    num_heads: int = DEMO_MODEL.num_heads,
    intermediate_size: int = DEMO_MODEL.intermediate_size,
    max_position_embeddings: int = DEMO_MODEL.max_position_embeddings,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised float32 ``LlamaForCausalLM`` sized for ``tokenizer`` (same seed, same weights)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def prompt_completion_dataset(
    dataset: Dataset,
    question_column: str = "question",
    answer_column: str = "answer",
    prompt_template: str = PROMPT_TEMPLATE,
) -> Dataset:
    """QA rows -> TRL's prompt/completion format via ``format_prompt`` / ``format_completion`` (other columns
    dropped)."""
    return dataset.map(
        lambda q, a: {"prompt": format_prompt(q, prompt_template), "completion": format_completion(a)},
        input_columns=[question_column, answer_column],
        remove_columns=dataset.column_names,
    )


def trl_rows(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, text_format: TextFormat) -> Dataset | None:
    """The rows in the format TRL's ``SFTTrainer`` reads (its own columns, the others dropped), or None for the
    formats TRL would not render as unlearning does: ``text`` rows (TRL appends an EOS and truncates where unlearning
    cuts windows) and pre-tokenized rows.

    QA rows become standard prompt/completion text through ``prompt_template``, or, when they go through the chat
    template (``text_format.chat(tokenizer)``), conversational prompt/completion with the question as the user turn
    (after the system prompt) and the answer as the assistant turn."""
    row_format = text_format.detect(dataset.with_format(None)[0], "SFT")
    column = text_format.column
    if row_format == "qa" and not text_format.chat(tokenizer):
        return prompt_completion_dataset(dataset, column("question"), column("answer"), text_format.prompt_template)
    if row_format == "qa":
        return dataset.map(
            lambda q, a: {
                "prompt": text_format.chat_prompt(q),
                "completion": [{"role": "assistant", "content": a}],
            },
            input_columns=[column("question"), column("answer")],
            remove_columns=dataset.column_names,
        )
    if row_format in ("prompt_completion", "conversational"):
        return _renamed(dataset, {column("prompt"): "prompt", column("completion"): "completion"})
    if row_format == "messages" and column("messages") in dataset.column_names:
        return _renamed(dataset, {column("messages"): "messages"})
    if row_format == "messages":  # ShareGPT `conversations`: TRL converts them to ChatML as the collator does
        return _renamed(dataset, {"conversations": "conversations"})
    return None


def _renamed(dataset: Dataset, columns: dict[str, str]) -> Dataset:
    dataset = dataset.select_columns(list(columns))
    return dataset.rename_columns({k: v for k, v in columns.items() if k != v})


def collator_examples(dataset: Dataset, collator: QACollator) -> list[dict[str, list[int]]]:
    """Every example the collator builds from the rows (a long text row gives several windows), in row order."""
    return [
        {"input_ids": e["input_ids"], "labels": e["labels"]}
        for row in dataset.with_format(None)
        for e in collator.examples(row)
    ]


def _count_layout_mismatches(prepared: Dataset, expected: list[dict[str, list[int]]]) -> int:
    """Examples where the ids/labels SFTTrainer prepared differ from what the unlearning collator builds."""
    if len(prepared) != len(expected):  # SFTTrainer drops rows whose completion was truncated away
        return abs(len(expected) - len(prepared))
    mismatches = 0
    for ids, labels, mine in zip(prepared["input_ids"], prepared["labels"], expected):
        mismatches += (list(ids), list(labels)) != (mine["input_ids"], mine["labels"])
    return mismatches


def sft_train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    output_dir: str,
    text_format: TextFormat | None = None,
    max_length: int | None = None,
    num_train_epochs: float = DEMO_SFT.num_train_epochs,
    learning_rate: float = DEMO_SFT.learning_rate,
    per_device_train_batch_size: int = DEMO_SFT.per_device_train_batch_size,
    seed: int = 0,
    disable_tqdm: bool = False,
    question_column: str = "question",
    answer_column: str = "answer",
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """Finetune ``model`` on the rows of ``dataset``, in any format of ``text_format`` (question/answer,
    prompt/completion, conversational, messages, raw text, pre-tokenized), with TRL's ``SFTTrainer`` (only the tokens
    unlearning scores carry loss) and return it.

    SFT trains the tokens unlearning and the evaluators score: those of
    ``QACollator(tokenizer, max_length, text_format)``. The rows go to TRL in its own format (`trl_rows`), and when
    TRL renders any of them otherwise (a chat template that does not end the answer with EOS, merges across the
    prompt/completion boundary) a warning says so and the collator's tokens are given to TRL pre-tokenized instead,
    as ``text`` windows and tokenized rows always are. ``text_format`` defaults to question/answer rows in
    ``question_column``/``answer_column`` through the plain prompt template, or the tokenizer's chat template when it
    has one (`TextFormat`'s rule); ``max_length`` (default: the model's ``max_position_embeddings``) is the
    collator's, so a text row's windows are those unlearning cuts when it is the run's ``max_length``.

    Nothing is saved to ``output_dir`` (no checkpoints); it is only the Trainer's working directory.
    ``config_overrides`` are further ``SFTConfig`` fields (``warmup_steps``, ``lr_scheduler_type``, ...) and win over
    the ones set here.
    """
    from trl import SFTConfig  # optional dependency (extra "trl")

    if text_format is None:
        renamed = {k: v for k, v in (("question", question_column), ("answer", answer_column)) if k != v}
        text_format = TextFormat(columns=renamed)
    row_format = text_format.detect(dataset.with_format(None)[0], "SFT")
    max_length = max_length or model.config.max_position_embeddings
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=per_device_train_batch_size,
        seed=seed,
        disable_tqdm=disable_tqdm,
        completion_only_loss=row_format == "qa" or text_format.completion_only_loss is not False,
        assistant_only_loss=row_format == "messages" and text_format.assistant_only_loss,
        max_length=max_length,
        # TRL defaults that suit large GPU models, not a tiny float32 model on CPU:
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=0.25,
        dataloader_pin_memory=False,
    )
    # transformers renamed gradient_checkpointing to activation_checkpointing; TRL turns it on by default
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    settings["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = False
    settings.update(config_overrides)
    args = SFTConfig(**settings)
    expected = collator_examples(dataset, QACollator(tokenizer, max_length=args.max_length, text_format=text_format))
    rows = trl_rows(dataset, tokenizer, text_format)
    trainer = _sft_trainer(model, tokenizer, rows if rows is not None else Dataset.from_list(expected), args)
    if rows is not None:
        mismatches = _count_layout_mismatches(trainer.train_dataset, expected)
        if mismatches:
            logger.warning(
                "%d of %d %r rows: the tokens SFTTrainer builds differ from the QACollator layout (what unlearning "
                "and evaluation score); SFT trains the collator's tokens instead, given to TRL pre-tokenized.",
                mismatches,
                len(dataset),
                row_format,
            )
            model.__dict__.pop("forward", None)  # the first trainer's patched forward (see below)
            trainer = _sft_trainer(model, tokenizer, Dataset.from_list(expected), args)
    trainer.train()
    # SFTTrainer patches `forward` on the instance (its fused LM head) with a closure over this very model: a deep
    # copy would keep running the original's weights. Restore the class's forward.
    model = trainer.model
    model.__dict__.pop("forward", None)
    return model


def _sft_trainer(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, rows: Dataset, args: Any) -> Any:
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (embedding and LM head counted separately when untied)."""
    return sum(p.numel() for p in model.parameters())
