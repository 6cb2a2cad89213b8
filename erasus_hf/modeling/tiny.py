"""A tiny Llama and its tokenizer, built and trained from scratch on TOFU, offline and on CPU.

No weights can be downloaded in tests or in the offline demo, so the "finetuned model" that unlearning starts from is
made here: a byte-level BPE tokenizer trained in memory on the TOFU text, a small ``LlamaForCausalLM`` from a config,
and TRL's ``SFTTrainer`` to memorise the question/answer pairs. A model that has memorised its training rows gives a
sharp forget signal, so the differences between unlearning strategies show at this scale.

Token layout (that of ``erasus_hf.data.collator.QACollator``, shared by unlearning and the evaluators)::

    input_ids = ids(prompt, with BOS) + ids(completion, no special tokens) + [eos]
    labels    = -100 on the prompt, the token ids on the completion and the EOS

TRL tokenizes ``prompt`` and ``prompt + completion + eos_token`` instead, so the two layouts agree only if tokenizing
the joined string equals concatenating the separately tokenized pieces. The tokenizer below is built so that it does
(byte-level BPE without prefix space; the completion starts with a space), and :func:`sft_train` checks it.
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
from erasus_hf.data.formatting import format_completion, format_prompt

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
    dataset: Dataset, question_column: str = "question", answer_column: str = "answer"
) -> Dataset:
    """QA rows -> TRL's prompt/completion format via ``format_prompt`` / ``format_completion`` (other columns
    dropped)."""
    return dataset.map(
        lambda q, a: {"prompt": format_prompt(q), "completion": format_completion(a)},
        input_columns=[question_column, answer_column],
        remove_columns=dataset.column_names,
    )


def _count_layout_mismatches(prepared: Dataset, rows: Dataset, collator: QACollator) -> int:
    """Rows where the ids/labels SFTTrainer prepared differ from what the unlearning collator builds."""
    if len(prepared) != len(rows):  # SFTTrainer drops rows whose completion was truncated away
        return abs(len(rows) - len(prepared))
    mismatches = 0
    for ids, labels, row in zip(prepared["input_ids"], prepared["labels"], rows):
        mine = collator.tokenize(row)
        mismatches += (list(ids), list(labels)) != (mine["input_ids"], mine["labels"])
    return mismatches


def sft_train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    output_dir: str,
    num_train_epochs: float = DEMO_SFT.num_train_epochs,
    learning_rate: float = DEMO_SFT.learning_rate,
    per_device_train_batch_size: int = DEMO_SFT.per_device_train_batch_size,
    seed: int = 0,
    disable_tqdm: bool = False,
    question_column: str = "question",
    answer_column: str = "answer",
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """Finetune ``model`` on the QA rows of ``dataset`` with TRL's ``SFTTrainer`` (completion-only loss) and return it.

    Nothing is saved to ``output_dir`` (no checkpoints); it is only the Trainer's working directory. Logs a warning
    when the tokens TRL trains on differ from the layout of ``erasus_hf.data.collator.QACollator`` (what unlearning
    and the evaluators score). ``config_overrides`` are further ``SFTConfig`` fields (``warmup_steps``,
    ``lr_scheduler_type``, ...) and win over the ones set here.
    """
    from trl import SFTConfig, SFTTrainer  # optional dependency (extra "trl")

    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=per_device_train_batch_size,
        seed=seed,
        disable_tqdm=disable_tqdm,
        completion_only_loss=True,
        max_length=model.config.max_position_embeddings,
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
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prompt_completion_dataset(dataset, question_column, answer_column),
        processing_class=tokenizer,
    )
    collator = QACollator(
        tokenizer, max_length=args.max_length, question_key=question_column, answer_key=answer_column
    )
    qa_rows = dataset.select_columns([question_column, answer_column])
    mismatches = _count_layout_mismatches(trainer.train_dataset, qa_rows, collator)
    if mismatches:
        logger.warning(
            "%d of %d rows: the tokens SFTTrainer trains on differ from the QACollator layout (prompt with BOS + "
            "completion + EOS), so unlearning and evaluation score slightly different sequences than were trained.",
            mismatches,
            len(dataset),
        )
    trainer.train()
    # SFTTrainer patches `forward` on the instance (its fused LM head) with a closure over this very model: a deep
    # copy would keep running the original's weights. Restore the class's forward.
    model = trainer.model
    model.__dict__.pop("forward", None)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (embedding and LM head counted separately when untied)."""
    return sum(p.numel() for p in model.parameters())
